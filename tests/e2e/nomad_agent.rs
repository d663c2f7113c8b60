//! The real Nomad agent loads, configures and fingerprints our driver, and
//! rejects bad plugin and task configs with messages that name the key.

use std::sync::Arc;
use std::time::Duration;

use microvm_e2e::{Agent, AgentOpts, Netns, open_tempdir, require_root, wait_until};

fn plugin_config(state: &std::path::Path, extra: &str) -> String {
    format!("    state_dir = \"{}\"\n{extra}", state.display())
}

#[test]
fn driver_is_detected_healthy_and_reports_attributes() {
    if !require_root("driver_is_detected_healthy_and_reports_attributes") {
        return;
    }
    let dir = open_tempdir();
    let netns = Arc::new(Netns::new("fp"));
    let opts = AgentOpts { plugin_config: Some(plugin_config(&dir.path().join("state"), "")), ..Default::default() };
    let agent = Agent::start(netns, dir.path(), opts);

    let node: serde_json::Value = serde_json::from_str(&agent.nomad_ok(&["node", "status", "-self", "-json"])).unwrap();
    let drv = &node["Drivers"]["microvm"];
    assert_eq!(drv["Detected"], true, "{drv}");
    assert_eq!(drv["Healthy"], true, "{drv}");
    let description = drv["HealthDescription"].as_str().unwrap();
    assert!(description.starts_with("Healthy"), "{description}");
    let attrs = &node["Attributes"];
    assert_eq!(attrs["driver.microvm"], "1");
    assert_eq!(attrs["driver.microvm.version"], env!("CARGO_PKG_VERSION"));
    assert!(matches!(attrs["driver.microvm.kvm"].as_str(), Some("true" | "false")), "{}", attrs["driver.microvm.kvm"]);
    assert!(attrs["driver.microvm.hypervisors"].as_str().unwrap().contains("qemu"), "qemu is installed here");

    // The human view too.
    let verbose = agent.nomad_ok(&["node", "status", "-self", "-verbose"]);
    assert!(verbose.contains("driver.microvm.version"), "{verbose}");
    // Drivers table: "microvm   true      true     Healthy…"
    let row: Vec<&str> = verbose.lines().find(|l| l.starts_with("microvm ")).unwrap_or("").split_whitespace().collect();
    assert_eq!(row.get(1..3), Some(&["true", "true"][..]), "{verbose}");
    assert!(row.get(3).is_some_and(|m| m.starts_with("Healthy")), "{verbose}");
}

#[test]
fn missing_vmm_user_makes_it_unhealthy_with_our_description() {
    if !require_root("missing_vmm_user_makes_it_unhealthy_with_our_description") {
        return;
    }
    let dir = open_tempdir();
    let netns = Arc::new(Netns::new("fpbad"));
    let config = plugin_config(&dir.path().join("state"), "    vmm_user = \"no-such-vmm-user\"\n");
    let agent = Agent::start(netns, dir.path(), AgentOpts { plugin_config: Some(config), ..Default::default() });
    let drv = wait_until("the driver to be fingerprinted", Duration::from_secs(30), Duration::from_millis(500), || {
        let node: serde_json::Value =
            serde_json::from_str(&agent.nomad_ok(&["node", "status", "-self", "-json"])).map_err(|e| e.to_string())?;
        let drv = node["Drivers"]["microvm"].clone();
        if drv["Detected"] == true { Ok(drv) } else { Err(drv.to_string()) }
    });
    assert_eq!(drv["Healthy"], false);
    let description = drv["HealthDescription"].as_str().unwrap();
    assert!(description.contains("VMM user \"no-such-vmm-user\" does not exist"), "{description}");
}

#[test]
fn bad_plugin_config_stops_the_agent_with_the_key_named() {
    if !require_root("bad_plugin_config_stops_the_agent_with_the_key_named") {
        return;
    }
    let dir = open_tempdir();
    let state = dir.path().join("state");
    let cases = [
        // Unknown key: Nomad's decoder, driven by our schema, names it.
        (
            "unknown",
            plugin_config(&state, "    state_dri = \"/srv\"\n"),
            vec!["No argument or block type is named \"state_dri\""],
        ),
        // Wrong type for our schema.
        (
            "type",
            plugin_config(&state, "    allowed_bridges = true\n"),
            vec!["Inappropriate value for attribute \"allowed_bridges\": list of string required, but have bool"],
        ),
        // Right type, wrong meaning: our SetConfig error reaches the agent log.
        (
            "meaning",
            plugin_config(&state, "    default_stop_timeout = \"soon\"\n"),
            vec!["`default_stop_timeout`: \"soon\" is not a duration"],
        ),
    ];
    for (name, config, wanted) in cases {
        let case_dir = dir.path().join(name);
        std::fs::create_dir_all(&case_dir).unwrap();
        let netns = Arc::new(Netns::new("badcfg"));
        let log = Agent::start_expecting_failure(
            netns,
            &case_dir,
            AgentOpts { plugin_config: Some(config), ..Default::default() },
        );
        // hclog writes an error value quoted (`\"`) on one line and raw when it
        // spans lines, and the agent's stderr repeats it raw: compare unquoted.
        let unquoted = log.replace("\\\"", "\"");
        for w in wanted {
            assert!(unquoted.contains(w), "case {name}: agent log lacks {w:?}:\n{log}");
        }
    }
}

#[test]
fn task_config_typos_and_wrong_types_fail_validation_naming_the_key() {
    if !require_root("task_config_typos_and_wrong_types_fail_validation_naming_the_key") {
        return;
    }
    let dir = open_tempdir();
    let netns = Arc::new(Netns::new("valid"));
    let opts = AgentOpts { plugin_config: Some(plugin_config(&dir.path().join("state"), "")), ..Default::default() };
    let agent = Agent::start(netns, dir.path(), opts);
    let cases = [
        (
            "typo",
            "runer = \"/nix/store/x-microvm-qemu-a\"",
            vec!["No argument or block type is named \"runer\"", "Did you mean \"runner\""],
        ),
        ("type", "runner = [\"/nix/store/x\"]", vec!["runner", "string required"]),
        ("missing", "bridge = \"br0\"", vec!["The argument \"runner\" is required"]),
    ];
    for (name, config, wanted) in cases {
        let job = microvm_e2e::vm::job_hcl(name, config, 0);
        // Nomad servers do not know driver schemas: the job is accepted and
        // the client refuses the task before StartTask, naming the key.
        let out = agent.run_job(name, &job);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let events = wait_until(
            &format!("job {name} to fail validation"),
            Duration::from_secs(60),
            Duration::from_millis(500),
            || {
                let allocs = agent.allocs(name);
                let a = allocs.first().ok_or("no allocation yet")?;
                let id = a["ID"].as_str().unwrap_or_default();
                let events = agent.task_events(id, "vm");
                if events.contains("Failed Validation") { Ok(events) } else { Err(events) }
            },
        );
        for w in wanted {
            assert!(events.contains(w), "case {name}: events lack {w:?}:\n{events}");
        }
    }
}

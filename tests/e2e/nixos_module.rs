//! The NixOS module (nixos-module.nix) and the flake, checked without
//! nixpkgs: every tracked `.nix` file parses and is formatted; the plugin
//! config the module renders (driver/plugin-config.nix, builtins only) is
//! exactly what the driver accepts, key for key, and what a real Nomad agent
//! loads from the JSON NixOS writes; no option takes a secret inline.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::Duration;

use microvm_e2e::{Group, Netns, driver_bin, nomad_bin, open_tempdir, repo_root, require_root, wait_until};

// ---------------------------------------------------------------------------
// Nix, without nixpkgs

fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e} (scripts/install-deps.sh installs it)"))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `nix-instantiate --eval --strict --json` of `expr` in the repo root, where
/// `p` is driver/plugin-config.nix.
fn nix_eval_raw(expr: &str) -> Output {
    let expr = format!("let p = import ./driver/plugin-config.nix; in {expr}");
    run(Command::new("nix-instantiate").current_dir(repo_root()).args(["--eval", "--strict", "--json", "-E", &expr]))
}

fn nix_eval(expr: &str) -> serde_json::Value {
    let out = nix_eval_raw(expr);
    assert!(out.status.success(), "nix-instantiate failed on {expr}:\n{}", text(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{expr}: not JSON ({e}): {}", text(&out.stdout)))
}

/// The error of an evaluation that must fail.
fn nix_eval_err(expr: &str) -> String {
    let out = nix_eval_raw(expr);
    assert!(!out.status.success(), "{expr} evaluated but should have failed: {}", text(&out.stdout));
    text(&out.stderr)
}

/// Every `.nix` file of the repo (tracked, or new and not ignored).
fn nix_files() -> Vec<PathBuf> {
    let out = run(Command::new("git").current_dir(repo_root()).args([
        "ls-files",
        "--cached",
        "--others",
        "--exclude-standard",
        "*.nix",
    ]));
    assert!(out.status.success(), "git ls-files: {}", text(&out.stderr));
    let files: Vec<PathBuf> = text(&out.stdout)
        .lines()
        .map(|l| repo_root().join(l))
        .filter(|p| p.exists())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    for wanted in ["flake.nix", "nixos-module.nix", "driver/plugin-config.nix"] {
        assert!(files.contains(&repo_root().join(wanted)), "{wanted} is missing from {files:?}");
    }
    files
}

/// scripts/install-deps.sh installs nixpkgs-fmt (crates.io) here.
fn nixpkgs_fmt() -> PathBuf {
    if let Some(p) = std::env::var_os("NIXPKGS_FMT") {
        return PathBuf::from(p);
    }
    let cached = std::env::var_os("HOME")
        .map(|h| PathBuf::from(h).join(".cache/nomad-microvm/nixpkgs-fmt/bin/nixpkgs-fmt"))
        .filter(|p| p.exists());
    cached.unwrap_or_else(|| PathBuf::from("nixpkgs-fmt"))
}

#[test]
fn every_nix_file_parses_and_is_formatted() {
    let files = nix_files();
    for file in &files {
        let out = run(Command::new("nix-instantiate").arg("--parse").arg(file).stdout(Stdio::null()));
        assert!(out.status.success(), "{} does not parse:\n{}", file.display(), text(&out.stderr));
    }
    let out = run(Command::new(nixpkgs_fmt()).arg("--check").args(&files));
    assert!(
        out.status.success(),
        "not formatted (run `nixpkgs-fmt {}`):\n{}{}",
        files
            .iter()
            .map(|f| f.strip_prefix(repo_root()).unwrap_or(f).display().to_string())
            .collect::<Vec<_>>()
            .join(" "),
        text(&out.stdout),
        text(&out.stderr)
    );
}

// ---------------------------------------------------------------------------
// The driver's plugin config

/// Every driver option set, each to something other than its default.
const SAMPLE: &str = r#"{
  stateDir = "/srv/vms";
  vmmUser = "vmm";
  vmmGroup = "vmmgroup";
  allowRootVmm = true;
  defaultBridge = "br-vms";
  allowedBridges = [ "br-lab" "br-dmz" ];
  virtiofsd = "/opt/virtiofsd/bin/virtiofsd";
  nix = "/opt/nix/bin/nix";
  substituters = [ "file:///srv/cache" "https://cache.example.org" ];
  trustedPublicKeys = [ "cache.example.org-1:c2FtcGxlIGtleQ==" ];
  defaultStopTimeout = "1m30s";
  gcrootsDir = null;
  allowedRunnerRoots = [ "/nix/store" "/srv/runners" ];
  allowedShareRoots = [ "/srv/shares" ];
  fingerprintPeriod = "45s";
}"#;

fn driver_keys() -> BTreeSet<String> {
    let out = run(Command::new(driver_bin()).arg("config-keys"));
    assert!(out.status.success(), "config-keys: {}", text(&out.stderr));
    text(&out.stdout).lines().map(str::to_string).collect()
}

/// `nomad-driver-microvm check-config` on `json`: Ok(its dump) or Err(its error).
fn check_config(json: &serde_json::Value) -> Result<String, String> {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("config.json");
    std::fs::write(&file, serde_json::to_vec_pretty(json).unwrap()).expect("write config");
    let out = run(Command::new(driver_bin()).arg("check-config").arg(&file));
    if out.status.success() { Ok(text(&out.stdout)) } else { Err(text(&out.stderr)) }
}

#[test]
fn module_renders_exactly_the_driver_keys() {
    let driver = driver_keys();
    let nix: BTreeSet<String> = serde_json::from_value(nix_eval("p.keys")).unwrap();
    let missing: Vec<_> = driver.difference(&nix).collect();
    let unknown: Vec<_> = nix.difference(&driver).collect();
    assert!(missing.is_empty(), "driver keys with no option in driver/plugin-config.nix: {missing:?}");
    assert!(unknown.is_empty(), "driver/plugin-config.nix renders keys the driver does not know: {unknown:?}");
    // What render writes is exactly that set, for any values.
    let rendered: serde_json::Map<String, serde_json::Value> =
        serde_json::from_value(nix_eval(&format!("p.render {SAMPLE}"))).unwrap();
    assert_eq!(rendered.keys().cloned().collect::<BTreeSet<_>>(), driver);
}

#[test]
fn every_option_set_is_accepted_and_taken_by_the_driver() {
    // The sample really sets everything away from the defaults.
    let same: Vec<String> = serde_json::from_value(nix_eval(&format!(
        "builtins.filter (n: ({SAMPLE}).${{n}} == p.defaults.${{n}}) p.names"
    )))
    .unwrap();
    assert!(same.is_empty(), "SAMPLE leaves these at their defaults: {same:?}");

    let rendered = nix_eval(&format!("p.render {SAMPLE}"));
    let dump = check_config(&rendered).unwrap_or_else(|e| panic!("the driver refuses what the module renders: {e}"));
    // `{:#?}` of the parsed config, without the layout.
    let compact =
        |s: &str| s.split_whitespace().collect::<String>().replace(",)", ")").replace(",]", "]").replace(",}", "}");
    let dumped = compact(&dump);
    for want in [
        r#"state_dir: "/srv/vms""#,
        r#"vmm_user: "vmm""#,
        r#"vmm_group: "vmmgroup""#,
        "allow_root_vmm: true",
        r#"default_bridge: Some("br-vms")"#,
        r#""br-lab""#,
        r#""br-dmz""#,
        r#"virtiofsd: "/opt/virtiofsd/bin/virtiofsd""#,
        r#"nix: "/opt/nix/bin/nix""#,
        r#""file:///srv/cache""#,
        r#""https://cache.example.org""#,
        r#""cache.example.org-1:c2FtcGxlIGtleQ==""#,
        "default_stop_timeout: 90s",
        "gcroots_dir: None",
        r#""/srv/runners""#,
        r#""/srv/shares""#,
        "fingerprint_period: 45s",
    ] {
        assert!(dumped.contains(&compact(want)), "check-config did not take {want}:\n{dump}");
    }
}

#[test]
fn module_defaults_are_the_driver_defaults() {
    let from_nix = check_config(&nix_eval("p.render p.defaults")).expect("defaults accepted");
    let driver = check_config(&serde_json::json!({})).expect("empty config accepted");
    assert_eq!(from_nix, driver, "driver/plugin-config.nix's defaults differ from driver/src/config.rs's");
}

#[test]
fn option_types_refuse_what_the_driver_refuses() {
    let cases = [
        ("stateDir", r#""relative/dir""#),
        ("gcrootsDir", r#""var/gcroots""#),
        ("defaultStopTimeout", r#""soon""#),
        ("defaultStopTimeout", r#""30""#),
        ("fingerprintPeriod", r#""5 s""#),
        ("defaultBridge", r#""a bridge""#),
        ("defaultBridge", r#""0123456789abcdef""#),
        ("defaultBridge", r#"".""#),
        ("allowedBridges", r#"[ "br/0" ]"#),
        ("allowedRunnerRoots", r#"[ "nix" ]"#),
        ("allowedShareRoots", r#"[ "srv" ]"#),
        ("substituters", r#"[ "/srv/cache" ]"#),
    ];
    for (name, value) in cases {
        let v =
            nix_eval(&format!("{{ key = p.options.{name}.key; value = {value}; ok = p.valid \"{name}\" ({value}); }}"));
        assert_eq!(v["ok"], false, "the module's type for {name} accepts {value}");
        let key = v["key"].as_str().unwrap();
        let err = check_config(&serde_json::json!({ key: v["value"] }))
            .expect_err(&format!("the driver accepts {key} = {value}, the module refuses it"));
        assert!(err.contains(&format!("`{key}`")), "{key} = {value}: {err}");
        // And render refuses it rather than writing it.
        let err = nix_eval_err(&format!("p.render (p.defaults // {{ {name} = {value}; }})"));
        assert!(err.contains(&format!("invalid values for: {name}")), "{err}");
    }
    // Good values of the same shapes pass both.
    for (name, value) in [("defaultStopTimeout", r#""1.5h""#), ("defaultBridge", r#"".br""#), ("gcrootsDir", "null")] {
        assert_eq!(nix_eval(&format!("p.valid \"{name}\" ({value})")), true, "{name} = {value}");
    }
}

#[test]
fn render_refuses_missing_and_unknown_options() {
    let err = nix_eval_err("p.render (removeAttrs p.defaults [ \"stateDir\" ])");
    assert!(err.contains("missing driver options: stateDir"), "{err}");
    let err = nix_eval_err("p.render (p.defaults // { stateDri = \"/srv\"; })");
    assert!(err.contains("not driver options: stateDri"), "{err}");
    // A submodule's `_module` is not an option.
    nix_eval("p.render (p.defaults // { _module = { }; })");
}

// ---------------------------------------------------------------------------
// A real Nomad agent reads the JSON NixOS writes (/etc/nomad.json)

#[test]
fn nomad_agent_loads_the_plugin_block_the_module_writes() {
    if !require_root("nomad_agent_loads_the_plugin_block_the_module_writes") {
        return;
    }
    let dir = open_tempdir();
    let state = dir.path().join("state");
    // The sample, with what this host has: the VMM identity install-deps.sh
    // creates, a state dir we own.
    let values = format!(
        "({SAMPLE}) // {{ stateDir = \"{}\"; vmmUser = \"microvm\"; vmmGroup = \"kvm\"; allowRootVmm = false; \
         virtiofsd = \"virtiofsd\"; nix = \"nix\"; }}",
        state.display()
    );
    let settings = nix_eval(&format!("p.agentSettings ({values})"));
    let plugin_dir = dir.path().join("plugins");
    std::fs::create_dir_all(&plugin_dir).unwrap();
    std::os::unix::fs::symlink(driver_bin(), plugin_dir.join("nomad-driver-microvm")).unwrap();
    let base = serde_json::json!({
        "disable_update_check": true,
        "bind_addr": "127.0.0.1",
        "advertise": { "http": "127.0.0.1", "rpc": "127.0.0.1", "serf": "127.0.0.1" },
        "client": {
            "enabled": true,
            "network_interface": "lo",
            "options": { "fingerprint.denylist": "env_aws,env_gce,env_azure,env_digitalocean" }
        }
    });
    std::fs::write(dir.path().join("base.json"), serde_json::to_vec_pretty(&base).unwrap()).unwrap();
    std::fs::write(dir.path().join("plugin.json"), serde_json::to_vec_pretty(&settings).unwrap()).unwrap();

    let netns = Arc::new(Netns::new("nixos"));
    let log = std::fs::File::create(dir.path().join("agent.log")).unwrap();
    let mut cmd = netns.command(nomad_bin());
    cmd.arg("agent")
        .arg("-dev")
        .arg(format!("-config={}", dir.path().join("base.json").display()))
        .arg(format!("-config={}", dir.path().join("plugin.json").display()))
        .arg(format!("-plugin-dir={}", plugin_dir.display()))
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    let _agent = Group::spawn("nomad agent", &mut cmd);
    let agent_log = || std::fs::read_to_string(dir.path().join("agent.log")).unwrap_or_default();

    let nomad = |args: &[&str]| -> Output {
        run(netns.command(nomad_bin()).args(args).env("NOMAD_ADDR", "http://127.0.0.1:4646").env_remove("NOMAD_TOKEN"))
    };
    let node =
        wait_until("the driver to be fingerprinted", Duration::from_secs(90), Duration::from_millis(500), || {
            let out = nomad(&["node", "status", "-self", "-json"]);
            if !out.status.success() {
                return Err(text(&out.stderr));
            }
            let node: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())?;
            if node["Drivers"]["microvm"]["Detected"] == true { Ok(node) } else { Err(node["Drivers"].to_string()) }
        });
    let drv = &node["Drivers"]["microvm"];
    assert_eq!(drv["Healthy"], true, "{drv}\n{}", agent_log());
    // The config reached the driver: its default bridge is an attribute.
    assert_eq!(node["Attributes"]["driver.microvm.default_bridge"], "br-vms", "{}", node["Attributes"]);
    assert!(state.is_dir(), "state_dir {} was not created", state.display());

    // The agent's view of the plugin block: every key, as rendered.
    let out = nomad(&["operator", "api", "/v1/agent/self"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let me: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let plugins = me["config"]["Plugins"].as_array().cloned().unwrap_or_default();
    let ours = plugins.iter().find(|p| p["Name"] == "nomad-driver-microvm").unwrap_or_else(|| panic!("{plugins:?}"));
    let config = &ours["Config"];
    let keys: BTreeSet<String> = config.as_object().map(|o| o.keys().cloned().collect()).unwrap_or_default();
    assert_eq!(keys, driver_keys(), "the agent's plugin config: {config}");
    assert_eq!(config["default_stop_timeout"], "1m30s", "{config}");
    assert_eq!(config["allowed_bridges"], serde_json::json!(["br-lab", "br-dmz"]), "{config}");
}

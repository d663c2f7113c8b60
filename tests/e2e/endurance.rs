//! Many restarts and many cycles: no VM lost, nothing leaked.

use std::time::Duration;

use microvm_e2e::plugin::{connect, start_plugin_in};
use microvm_e2e::vm::{BRIDGE, HOST_ADDR, World, pgrep, plugin_config};
use microvm_e2e::{Netns, open_tempdir, require_root, wait_until};
use microvm_proto::base::{SetConfigRequest, base_plugin_client::BasePluginClient};
use microvm_proto::drivers::{
    DestroyTaskRequest, StartTaskRequest, StopTaskRequest, TaskConfig, driver_client::DriverClient,
};

const BOOT: Duration = Duration::from_secs(180);

#[test]
fn twenty_agent_restarts_lose_no_vm() {
    if !require_root("twenty_agent_restarts_lose_no_vm") {
        return;
    }
    let mut w = World::new("restarts", false, "");
    let hosts = ["ra", "rb", "rc"];
    for (i, host) in hosts.iter().enumerate() {
        let runner = w.runner(host, 71 + i as u8, &[]);
        assert!(w.run_vm_job(host, &runner, 0).status.success());
    }
    let allocs: Vec<String> = hosts.iter().map(|h| w.agent.wait_running(h, "vm", BOOT)).collect();
    for a in &allocs {
        w.wait_console(a, "microvm-test-guest: ready", BOOT);
    }
    let vmms = |w: &World| -> Vec<Vec<i32>> { hosts.iter().map(|h| w.vmm_pids(h)).collect() };
    let before = vmms(&w);
    assert!(before.iter().all(|p| p.len() == 1), "{before:?}");

    for round in 0..20 {
        if round % 2 == 0 {
            w.agent.stop();
        } else {
            w.agent.crash();
        }
        w.agent.restart();
        for a in &allocs {
            let alloc = w.agent.api(&format!("/v1/allocation/{a}"));
            assert_eq!(alloc["TaskStates"]["vm"]["State"], "running", "round {round}: {}", alloc["TaskStates"]["vm"]);
        }
        assert_eq!(vmms(&w), before, "round {round}: the same VMM processes");
    }

    for h in hosts {
        w.agent.nomad_ok(&["job", "stop", "-detach", h]);
    }
    for a in &allocs {
        wait_until("the alloc to complete", Duration::from_secs(120), Duration::from_millis(500), || {
            let alloc = w.agent.api(&format!("/v1/allocation/{a}"));
            if alloc["ClientStatus"] == "complete" { Ok(()) } else { Err(alloc["ClientStatus"].to_string()) }
        });
        let events = w.agent.task_events(a, "vm");
        assert!(events.contains("VM exited with code 0"), "{events}");
    }
    assert!(vmms(&w).iter().all(|p| p.is_empty()));
}

fn fd_count(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

fn msgpack_task_config(runner: &std::path::Path) -> Vec<u8> {
    let v = rmpv::Value::Map(vec![
        (rmpv::Value::from("bridge"), rmpv::Value::Nil),
        (rmpv::Value::from("runner"), rmpv::Value::from(runner.to_str().unwrap())),
    ]);
    let mut buf = Vec::new();
    rmpv::encode::write_value(&mut buf, &v).unwrap();
    buf
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_start_stop_cycles_leak_nothing() {
    if !require_root("hundred_start_stop_cycles_leak_nothing") {
        return;
    }
    let dir = open_tempdir();
    let netns = Netns::new("cycles");
    netns.add_bridge(BRIDGE, &format!("{HOST_ADDR}/24"));
    let runner = microvm_e2e::runner::make_runner(
        &dir.path().join("runners"),
        &["--hostname", "cy", "--tap", "vm-cy", "--share", "data:data", "--store"],
    );
    let plugin = start_plugin_in(dir.path(), Some(&netns));
    let channel = connect(plugin.socket.clone()).await;
    let state_dir = dir.path().join("state");
    // The same config the agent tests use, as go-cty msgpack.
    let hcl = plugin_config(&state_dir, "");
    let mut pairs = Vec::new();
    for line in hcl.lines() {
        let (k, v) = line.trim().split_once(" = ").unwrap();
        pairs.push((rmpv::Value::from(k), rmpv::Value::from(v.trim_matches('"'))));
    }
    let mut config = Vec::new();
    rmpv::encode::write_value(&mut config, &rmpv::Value::Map(pairs)).unwrap();
    BasePluginClient::new(channel.clone())
        .set_config(SetConfigRequest { msgpack_config: config, nomad_config: None, plugin_api_version: "0.1.0".into() })
        .await
        .expect("SetConfig");
    let driver = DriverClient::new(channel);
    let pid = plugin.process.pid();

    let cycle = |i: u32| {
        let mut driver = driver.clone();
        let runner = runner.clone();
        async move {
            let id = format!("cccccccc-0000-0000-0000-000000000000/vm/{i:08x}");
            let task = TaskConfig {
                id: id.clone(),
                name: "vm".into(),
                alloc_id: "cccccccc-0000-0000-0000-000000000000".into(),
                job_id: "cycles".into(),
                task_group_name: "g".into(),
                namespace: "default".into(),
                msgpack_driver_config: msgpack_task_config(&runner),
                ..Default::default()
            };
            let handle = driver.start_task(StartTaskRequest { task: Some(task) }).await;
            let handle = handle.unwrap_or_else(|e| panic!("cycle {i}: StartTask: {}", e.message()));
            assert!(handle.into_inner().handle.is_some());
            driver
                .stop_task(StopTaskRequest { task_id: id.clone(), timeout: None, signal: String::new() })
                .await
                .unwrap_or_else(|e| panic!("cycle {i}: StopTask: {}", e.message()));
            driver
                .destroy_task(DestroyTaskRequest { task_id: id, force: true })
                .await
                .unwrap_or_else(|e| panic!("cycle {i}: DestroyTask: {}", e.message()));
        }
    };
    // Warm up (lazy runtime structures, the first connection), then count.
    for i in 0..3 {
        cycle(i).await;
    }
    let fds_before = fd_count(pid);
    let started = std::time::Instant::now();
    for i in 3..103 {
        cycle(i).await;
    }
    eprintln!("100 cycles in {:?}", started.elapsed());
    let fds_after = fd_count(pid);
    assert_eq!(fds_after, fds_before, "plugin file descriptors before and after");

    let work_dirs: Vec<_> = std::fs::read_dir(state_dir.join("vms")).unwrap().filter_map(|e| e.ok()).collect();
    assert_eq!(work_dirs.len(), 1, "one VM work dir, kept for its volumes");
    let work = work_dirs[0].path();
    let leftovers = [
        microvm_e2e::vm::vmm_pids_under("cy", &state_dir),
        pgrep(&format!("supervise {}", state_dir.display())),
        pgrep(&format!("--shared-dir={}", work.display())),
    ]
    .concat();
    assert!(leftovers.is_empty(), "processes left: {leftovers:?}");
    assert_eq!(netns.links().iter().filter(|l| l.starts_with("vm-")).count(), 0, "{:?}", netns.links());
    assert_eq!(std::fs::read_dir(state_dir.join("tasks")).unwrap().count(), 0, "task dirs left");
    assert_eq!(std::fs::read_dir(state_dir.join("claims")).unwrap().count(), 0, "claims left");
    let sockets: Vec<String> = std::fs::read_dir(&work)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.contains(".sock") || n == "booted")
        .collect();
    assert!(sockets.is_empty(), "left in the work dir: {sockets:?}");
    let slug = work.file_name().unwrap().to_string_lossy().to_string();
    assert!(!std::path::Path::new("/nix/var/nix/gcroots/nomad-microvm").join(&slug).exists(), "GC root left");
    drop(plugin);
}

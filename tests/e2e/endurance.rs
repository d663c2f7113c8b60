//! Many restarts and many cycles: no VM lost, nothing leaked.

use std::time::Duration;

use microvm_e2e::plugin::{DirectWorld, vm_task};
use microvm_e2e::vm::{World, leftovers};
use microvm_e2e::{require_root, wait_until};
use microvm_proto::drivers::{DestroyTaskRequest, StartTaskRequest, StopTaskRequest};

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
    // A reattach that failed in a late round would show up after the loop:
    // give it time, then the VMs must still be the same, each started once.
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(vmms(&w), before, "the same VMM processes after the last restart");
    for a in &allocs {
        let events = w.agent.task_events(a, "vm");
        assert_eq!(events.matches("Started: Task started by client").count(), 1, "started once: {events}");
        assert!(!events.contains("Restarting"), "{events}");
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
        assert!(events.contains("Terminated: Exit Code: 0"), "{events}");
    }
    assert!(vmms(&w).iter().all(|p| p.is_empty()));
}

fn fd_count(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_start_stop_cycles_leak_nothing() {
    if !require_root("hundred_start_stop_cycles_leak_nothing") {
        return;
    }
    let w = DirectWorld::new("cycles", "cy").await;
    let (driver, runner, state_dir) = (w.driver.clone(), w.runner.clone(), w.state_dir.clone());
    let pid = w.plugin.process.pid();

    let cycle = |i: u32| {
        let mut driver = driver.clone();
        let runner = runner.clone();
        let state_dir = state_dir.clone();
        async move {
            let task = vm_task("cccccccc-0000-0000-0000-000000000000", "cycles", i, &runner);
            let id = task.id.clone();
            let handle = driver.start_task(StartTaskRequest { task: Some(task) }).await;
            let handle = handle.unwrap_or_else(|e| panic!("cycle {i}: StartTask: {}", e.message()));
            assert!(handle.into_inner().handle.is_some());
            if i == 0 {
                // The GC root exists while the task lives, so "none left" below means removed.
                let roots = std::fs::read_dir("/nix/var/nix/gcroots/nomad-microvm").map(|d| {
                    d.flatten()
                        .filter(|e| std::fs::read_link(e.path()).is_ok_and(|t| t.starts_with(&state_dir)))
                        .count()
                });
                assert_eq!(roots.ok(), Some(1), "one GC root for the running task");
            }
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
    let left = leftovers(&w.netns, &state_dir, "cy");
    assert!(left.is_empty(), "left behind: {left:?}");
}

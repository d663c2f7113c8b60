//! microVMs under the real Nomad agent, end to end: boot, console in
//! `nomad alloc logs`, virtiofs share, network, graceful stop, restarts,
//! plugin and agent restarts, and clear failures for bad runners.

use std::time::Duration;

use microvm_e2e::vm::{World, pgrep};
use microvm_e2e::{require_root, wait_until};

const BOOT: Duration = Duration::from_secs(120);

#[test]
fn vm_boots_logs_shares_pings_and_stops_gracefully() {
    if !require_root("vm_boots_logs_shares_pings_and_stops_gracefully") {
        return;
    }
    let w = World::new("life", true, "");
    let runner = w.runner("alpha", 2, &[]);
    let out = w.run_vm_job("alpha", &runner, 0);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let alloc = w.agent.wait_running("alpha", "vm", BOOT);

    // Console in `nomad alloc logs`, the share, and the network.
    let console = w.wait_console(&alloc, "microvm-test-guest: ready", BOOT);
    assert!(console.contains("microvm-test-guest: booted alpha"), "{console}");
    assert!(console.contains("microvm-test-guest: share data mounted"), "{console}");
    assert!(console.contains("microvm-test-guest: ping 192.0.2.1 ok"), "{console}");
    let work = w.work_dir("alpha");
    let marker = std::fs::read_to_string(work.join("data/microvm-marker")).expect("marker written by the guest");
    assert!(marker.contains("hostname=alpha"), "{marker}");
    assert!(w.netns.links().contains(&"vm-alpha".to_string()), "tap exists");
    let events = w.agent.task_events(&alloc, "vm");
    assert!(events.contains("virtiofsd ready for share(s) data"), "{events}");

    // Graceful stop: the guest's own shutdown message, before any signal.
    w.agent.nomad_ok(&["job", "stop", "-detach", "alpha"]);
    wait_until("the alloc to complete", Duration::from_secs(60), Duration::from_millis(500), || {
        let a = w.agent.api(&format!("/v1/allocation/{alloc}"));
        if a["ClientStatus"] == "complete" { Ok(()) } else { Err(a["ClientStatus"].to_string()) }
    });
    let console = w.agent.alloc_logs(&alloc, "vm", false);
    assert!(console.contains("microvm-test-guest: graceful shutdown"), "{console}");
    let events = w.agent.task_events(&alloc, "vm");
    assert!(events.contains("graceful shutdown: running microvm-shutdown"), "{events}");
    assert!(!events.contains("timed out"), "{events}");
    assert!(events.contains("VM exited with code 0"), "{events}");

    // Nothing of the task remains: processes, tap, sockets, task dir.
    wait_until("cleanup", Duration::from_secs(20), Duration::from_millis(500), || {
        let left: Vec<i32> = [pgrep("microvm@alpha"), pgrep(&format!("supervise {}", w.state_dir.display()))].concat();
        let links = w.netns.links();
        let tasks = std::fs::read_dir(w.state_dir.join("tasks")).map(|d| d.count()).unwrap_or(0);
        if left.is_empty() && !links.contains(&"vm-alpha".to_string()) && tasks == 0 {
            Ok(())
        } else {
            Err(format!("processes {left:?}, links {links:?}, task dirs {tasks}"))
        }
    });
    let sockets: Vec<_> = std::fs::read_dir(&work)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".sock"))
        .map(|e| e.file_name())
        .collect();
    assert!(sockets.is_empty(), "sockets left: {sockets:?}");
    assert!(work.join("data/microvm-marker").exists(), "VM data stays");
}

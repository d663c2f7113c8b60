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

    // The booted runner is a GC root while the task lives (nix lists the
    // indirect root by the link it goes through: the work dir's `booted`).
    let roots = nix_roots(&runner);
    assert!(roots.contains(&format!("{}/booted ->", work.display())), "{roots}");

    // TaskStats: real CPU and memory of the VMM and its helpers.
    let stats = wait_until("non-zero stats", Duration::from_secs(30), Duration::from_secs(1), || {
        let s = w.agent.api(&format!("/v1/client/allocation/{alloc}/stats"));
        let usage = &s["ResourceUsage"];
        let rss = usage["MemoryStats"]["RSS"].as_u64().unwrap_or(0);
        let cpu = usage["CpuStats"]["TotalTicks"].as_f64().unwrap_or(0.0);
        if rss > 0 && cpu > 0.0 { Ok(s) } else { Err(s.to_string()) }
    });
    // Every process of the VM is counted: the VMM and both virtiofsd
    // processes (its `--sandbox=namespace` child does the work).
    let counted: Vec<String> =
        stats["Tasks"]["vm"]["Pids"].as_object().map(|p| p.keys().cloned().collect()).unwrap_or_default();
    let vmm = w.vmm_pids("alpha");
    let virtiofsd = pgrep(&format!("--shared-dir={}", work.display()));
    assert_eq!(vmm.len(), 1, "one VMM: {vmm:?}");
    assert!(virtiofsd.len() >= 2, "virtiofsd and its sandbox child: {virtiofsd:?}");
    for pid in vmm.iter().chain(&virtiofsd) {
        assert!(counted.contains(&pid.to_string()), "pid {pid} not in the stats: {counted:?}");
    }

    // The VMM runs as the VMM user, never as root.
    let status = std::fs::read_to_string(format!("/proc/{}/status", vmm[0])).expect("VMM status");
    let uid_line = status.lines().find(|l| l.starts_with("Uid:")).expect("Uid line").to_string();
    let microvm_uid = nix::unistd::User::from_name("microvm").unwrap().expect("user microvm").uid.as_raw();
    let uids: Vec<u32> = uid_line.split_whitespace().skip(1).map(|u| u.parse().unwrap()).collect();
    assert!(uids.iter().all(|u| *u == microvm_uid), "VMM uids {uid_line:?}, want {microvm_uid}");

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
        let left: Vec<i32> = [
            w.vmm_pids("alpha"),
            pgrep(&format!("supervise {}", w.state_dir.display())),
            pgrep(&format!("--shared-dir={}", work.display())),
        ]
        .concat();
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
    assert!(!nix_roots(&runner).contains("/booted ->"), "GC root removed");

    // The same job run again on this node gets the same work dir back, with
    // what the guest wrote there (volumes, shares): this is its second boot.
    let out = w.run_vm_job("alpha", &runner, 0);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    wait_until("the VM's second boot", BOOT, Duration::from_millis(500), || {
        let m = std::fs::read_to_string(work.join("data/microvm-marker")).unwrap_or_default();
        if m.contains("boot=2") { Ok(()) } else { Err(m) }
    });
    assert_eq!(w.work_dir("alpha"), work, "the same work dir");
    w.agent.nomad_ok(&["job", "stop", "-detach", "alpha"]);
}

/// `nix-store --query --roots`: what keeps a store path alive.
fn nix_roots(path: &std::path::Path) -> String {
    let out = std::process::Command::new("nix-store").args(["--query", "--roots"]).arg(path).output().unwrap();
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn vmm_pid(w: &World, host: &str) -> i32 {
    let pids = w.vmm_pids(host);
    assert_eq!(pids.len(), 1, "exactly one VMM for {host}: {pids:?}");
    pids[0]
}

#[test]
fn two_vms_at_once_each_with_its_own_tap_and_share() {
    if !require_root("two_vms_at_once_each_with_its_own_tap_and_share") {
        return;
    }
    let w = World::new("two", true, "    allowed_bridges = [\"br1\"]\n");
    // The second VM is on a bridge of its own, named by its task config
    // instead of the plugin's default_bridge (br0), with its own subnet.
    w.netns.add_bridge("br1", "192.0.2.129/25");
    // The first one with two vCPUs: microvm.nix then asks for a multi-queue tap.
    let r1 = w.runner("one", 11, &["--vcpu", "2"]);
    // The second one in the legacy layout (data files only, no hypervisor file).
    let r2 = w.runner(
        "two",
        12,
        &["--legacy", "--no-hypervisor-file", "--guest-ip", "192.0.2.140/25", "--ping", "192.0.2.129"],
    );
    assert!(w.run_vm_job("one", &r1, 0).status.success());
    let job = microvm_e2e::vm::vm_job("two", &r2, 0, "bridge = \"br1\"");
    assert!(w.agent.run_job("two", &job).status.success());
    let a1 = w.agent.wait_running("one", "vm", BOOT);
    let a2 = w.agent.wait_running("two", "vm", BOOT);
    let c1 = w.wait_console(&a1, "microvm-test-guest: ready", BOOT);
    let c2 = w.wait_console(&a2, "microvm-test-guest: ready", BOOT);
    assert!(c1.contains("booted one") && c1.contains("ping 192.0.2.1 ok"), "{c1}");
    assert!(c2.contains("booted two") && c2.contains("ping 192.0.2.129 ok"), "{c2}");
    assert!(!c1.contains("booted two") && !c2.contains("booted one"), "each console is its own VM's");
    let links = w.netns.links();
    assert!(links.contains(&"vm-one".to_string()) && links.contains(&"vm-two".to_string()), "{links:?}");
    let master = |tap: &str| {
        let out = w.netns.command("ip").args(["-o", "link", "show", tap]).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        text.split_whitespace().skip_while(|w| *w != "master").nth(1).unwrap_or_default().to_string()
    };
    assert_eq!(master("vm-one"), "br0", "the plugin's default bridge");
    assert_eq!(master("vm-two"), "br1", "the task's own bridge");
    let details = |tap: &str| {
        let out = w.netns.command("ip").args(["-d", "-o", "link", "show", tap]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    assert!(details("vm-one").contains("vnet_hdr on multi_queue"), "{}", details("vm-one"));
    assert!(!details("vm-two").contains("multi_queue"), "{}", details("vm-two"));
    let m1 = std::fs::read_to_string(w.work_dir("one").join("data/microvm-marker")).unwrap();
    let m2 = std::fs::read_to_string(w.work_dir("two").join("data/microvm-marker")).unwrap();
    assert!(m1.contains("hostname=one") && m2.contains("hostname=two"), "{m1} / {m2}");
    assert_ne!(vmm_pid(&w, "one"), vmm_pid(&w, "two"));
}

#[test]
fn guest_reboot_is_restarted_by_nomad_with_virtiofsd_back() {
    if !require_root("guest_reboot_is_restarted_by_nomad_with_virtiofsd_back") {
        return;
    }
    let w = World::new("reboot", true, "");
    let (_, alloc) = w.boot("rb", 21, 2);
    let first_pid = vmm_pid(&w, "rb");
    let work = w.work_dir("rb");
    assert!(std::fs::read_to_string(work.join("data/microvm-marker")).unwrap().contains("boot=1"));

    // The guest reboots itself: qemu (-no-reboot) exits, Nomad restarts the task.
    std::fs::write(work.join("data/reboot-request"), "").unwrap();
    wait_until("the VM to boot a second time", BOOT, Duration::from_millis(500), || {
        let m = std::fs::read_to_string(work.join("data/microvm-marker")).unwrap_or_default();
        if m.contains("boot=2") { Ok(()) } else { Err(m) }
    });
    let events = w.agent.task_events(&alloc, "vm");
    assert!(events.contains("Restarting"), "{events}");
    assert!(events.matches("virtiofsd ready for share(s) data").count() >= 2, "virtiofsd relaunched:\n{events}");
    let second_pid = vmm_pid(&w, "rb");
    assert_ne!(first_pid, second_pid);
    let console = w.wait_console(&alloc, "rebooting on request", BOOT);
    assert!(console.matches("microvm-test-guest: booted rb").count() >= 2, "{console}");
}

#[test]
fn bad_runners_fail_with_the_problem_named_and_leave_nothing() {
    if !require_root("bad_runners_fail_with_the_problem_named_and_leave_nothing") {
        return;
    }
    let w = World::new("bad", true, "");
    let not_a_runner = w.dir.path().join("runners/not-a-runner");
    std::fs::create_dir_all(&not_a_runner).unwrap();
    // A store path that is a directory but no runner:
    let store_dir = {
        let out = std::process::Command::new("nix-store").args(["--add"]).arg(&not_a_runner).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    // A runner whose share socket name cannot fit in a unix socket path.
    let long_host = "h".repeat(60);
    let long = microvm_e2e::runner::make_runner(
        &w.dir.path().join("runners"),
        &["--hostname", &long_host, "--tap", "vm-long", "--share", "data:data", "--store"],
    );
    let cases = [
        (
            "missing",
            "/nix/store/00000000000000000000000000000000-microvm-qemu-gone".to_string(),
            "is not on this node and no substituters are configured",
        ),
        ("notrunner", store_dir, "bin/microvm-run is missing"),
        ("longsock", long.display().to_string(), "over the 107-byte limit of unix sockets"),
        ("outside", not_a_runner.display().to_string(), "refused by `allowed_runner_roots`"),
    ];
    for (job, runner, wanted) in cases {
        assert!(w.run_vm_job(job, std::path::Path::new(&runner), 0).status.success());
        let events = w.agent.wait_failed(job, "vm");
        assert!(events.contains(wanted), "case {job}: events lack {wanted:?}:\n{events}");
    }
    // Nothing left behind: no task dirs, no claims, no VMM, no tap.
    let tasks = std::fs::read_dir(w.state_dir.join("tasks")).map(|d| d.count()).unwrap_or(0);
    assert_eq!(tasks, 0, "task dirs left");
    let claims = std::fs::read_dir(w.state_dir.join("claims")).map(|d| d.count()).unwrap_or(0);
    assert_eq!(claims, 0, "claims left");
    assert!(w.vmm_pids(&long_host).is_empty());
    assert!(!w.netns.links().contains(&"vm-long".to_string()), "{:?}", w.netns.links());
}

#[test]
fn vm_survives_plugin_crash_and_agent_restarts_then_stops_cleanly() {
    if !require_root("vm_survives_plugin_crash_and_agent_restarts_then_stops_cleanly") {
        return;
    }
    let mut w = World::new("recover", false, "");
    let (_, alloc) = w.boot("rec", 41, 0);
    let vmm = vmm_pid(&w, "rec");

    // 1. kill -9 of the plugin: Nomad relaunches it and recovers the task.
    let plugins = w.agent.plugin_pids();
    assert_eq!(plugins.len(), 1, "one long-lived plugin: {plugins:?}");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(plugins[0]), nix::sys::signal::Signal::SIGKILL).unwrap();
    wait_until("a new plugin", Duration::from_secs(60), Duration::from_millis(500), || {
        let now = w.agent.plugin_pids();
        if !now.is_empty() && !now.contains(&plugins[0]) { Ok(()) } else { Err(format!("{now:?}")) }
    });
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(vmm_pid(&w, "rec"), vmm, "same VM after the plugin crash");
    assert_eq!(w.agent.api(&format!("/v1/allocation/{alloc}"))["TaskStates"]["vm"]["State"], "running");

    // 2. graceful agent restart (the agent kills its plugin; a new one recovers).
    // The agent log is appended to across restarts: count the recoveries.
    let recoveries = |agent: &microvm_e2e::Agent| agent.log().matches("recovered task").count();
    let before = recoveries(&w.agent);
    w.agent.stop();
    assert_eq!(vmm_pid(&w, "rec"), vmm, "the VM outlives the agent");
    w.agent.restart();
    wait_until("the task to be recovered", Duration::from_secs(60), Duration::from_millis(500), || {
        if recoveries(&w.agent) > before { Ok(()) } else { Err("no new recovery logged yet".to_string()) }
    });
    assert_eq!(vmm_pid(&w, "rec"), vmm, "same VM after the agent restart");

    // 3. agent crash (kill -9 of the agent only): the next agent reattaches.
    w.agent.crash();
    w.agent.restart();
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(vmm_pid(&w, "rec"), vmm, "same VM after the agent crash");
    assert_eq!(w.agent.api(&format!("/v1/allocation/{alloc}"))["TaskStates"]["vm"]["State"], "running");

    // 4. A stop still works and is graceful; the exit code is the guest's 0.
    w.agent.nomad_ok(&["job", "stop", "-detach", "rec"]);
    wait_until("the alloc to complete", Duration::from_secs(90), Duration::from_millis(500), || {
        let a = w.agent.api(&format!("/v1/allocation/{alloc}"));
        if a["ClientStatus"] == "complete" { Ok(()) } else { Err(a["ClientStatus"].to_string()) }
    });
    let events = w.agent.task_events(&alloc, "vm");
    assert!(events.contains("VM exited with code 0"), "{events}");
    assert!(events.contains("Terminated: Exit Code: 0"), "Nomad got the exit code: {events}");
    // Printed after all the restarts: the console still reaches `nomad alloc logs`.
    let console = w.agent.alloc_logs(&alloc, "vm", false);
    assert!(console.contains("microvm-test-guest: graceful shutdown"), "{console}");
    wait_until("the VMM to be gone", Duration::from_secs(20), Duration::from_millis(500), || {
        if w.vmm_pids("rec").is_empty() { Ok(()) } else { Err("still running".into()) }
    });
}

#[test]
fn a_runner_missing_on_the_node_is_fetched_from_the_binary_cache() {
    if !require_root("a_runner_missing_on_the_node_is_fetched_from_the_binary_cache") {
        return;
    }
    let cache_dir = microvm_e2e::open_tempdir();
    let cache = format!("file://{}", cache_dir.path().display());
    let w = World::new("fetch", true, &format!("    substituters = [\"{cache}\"]\n"));
    let runner = w.runner("fe", 91, &[]);
    let nix = |args: &[&str]| {
        let out = std::process::Command::new("nix")
            .args(["--extra-experimental-features", "nix-command", "--option", "substituters", ""])
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "nix {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    };
    nix(&["copy", "--to", &cache, runner.to_str().unwrap()]);
    // Drop it from the local store (and the out-link keeping it alive).
    std::fs::remove_file(w.dir.path().join("runners/microvm-qemu-fe")).unwrap();
    let out = std::process::Command::new("nix-store").arg("--delete").arg(&runner).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!runner.exists());

    assert!(w.run_vm_job("fe", &runner, 0).status.success());
    let alloc = w.agent.wait_running("fe", "vm", BOOT);
    w.wait_console(&alloc, "microvm-test-guest: ready", BOOT);
    let events = w.agent.task_events(&alloc, "vm");
    assert!(events.contains("runner not on this node: fetching"), "{events}");
    assert!(events.contains(&format!("fetched the runner from {cache}")), "{events}");
    assert!(runner.exists());

    // A runner the cache does not have either: the task fails saying so,
    // with the cache it tried, and leaves nothing behind.
    let absent = "/nix/store/00000000000000000000000000000000-microvm-qemu-absent";
    assert!(w.run_vm_job("absent", std::path::Path::new(absent), 0).status.success());
    let events = w.agent.wait_failed("absent", "vm");
    assert!(events.contains("runner not on this node: fetching"), "{events}");
    assert!(events.contains(&format!("cannot fetch runner {absent} from {cache}")), "{events}");
    let tasks = std::fs::read_dir(w.state_dir.join("tasks")).unwrap().count();
    assert_eq!(tasks, 1, "only fe's task dir: the failed start left none");
}

#[test]
fn a_guest_that_ignores_the_shutdown_is_killed_after_the_kill_timeout() {
    if !require_root("a_guest_that_ignores_the_shutdown_is_killed_after_the_kill_timeout") {
        return;
    }
    let w = World::new("hang", true, "");
    let runner = w.runner("hang", 42, &[]);
    let job =
        microvm_e2e::vm::vm_job("hang", &runner, 0, "").replace("kill_timeout = \"25s\"", "kill_timeout = \"4s\"");
    assert!(w.agent.run_job("hang", &job).status.success());
    let alloc = w.agent.wait_running("hang", "vm", BOOT);
    w.wait_console(&alloc, "microvm-test-guest: ready", BOOT);
    std::fs::write(w.work_dir("hang").join("data/ignore-shutdown"), b"").unwrap();

    w.agent.nomad_ok(&["job", "stop", "-detach", "hang"]);
    wait_until("the alloc to complete", Duration::from_secs(60), Duration::from_millis(500), || {
        let a = w.agent.api(&format!("/v1/allocation/{alloc}"));
        if a["ClientStatus"] == "complete" { Ok(()) } else { Err(a["ClientStatus"].to_string()) }
    });
    let console = w.agent.alloc_logs(&alloc, "vm", false);
    assert!(console.contains("microvm-test-guest: ignoring the shutdown request"), "{console}");
    assert!(!console.contains("microvm-test-guest: graceful shutdown"), "{console}");
    let events = w.agent.task_events(&alloc, "vm");
    assert!(events.contains("graceful shutdown: running microvm-shutdown"), "{events}");
    assert!(events.contains("graceful shutdown timed out after 4s, killing"), "{events}");
    // qemu exits 0 on SIGTERM, saying so on its stderr.
    let stderr = w.agent.alloc_logs(&alloc, "vm", true);
    assert!(stderr.contains("terminating on signal 15"), "SIGTERM ended qemu: {stderr}");
    wait_until("cleanup", Duration::from_secs(20), Duration::from_millis(500), || {
        let left = microvm_e2e::vm::leftovers(&w.netns, &w.state_dir, "hang");
        if left.is_empty() { Ok(()) } else { Err(format!("{left:?}")) }
    });
}

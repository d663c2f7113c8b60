//! Faults survived: a VMM or a virtiofsd killed, the plugin killed in the
//! middle of a start or a stop, the agent hanging up during a start.
//! Afterwards Nomad's view and the host agree.

use std::time::Duration;

use microvm_e2e::plugin::{DirectWorld, vm_task};
use microvm_e2e::vm::{World, leftovers, pgrep, vmm_pids_under};
use microvm_e2e::{require_root, wait_until};
use microvm_proto::drivers::{DestroyTaskRequest, StartTaskRequest};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

const BOOT: Duration = Duration::from_secs(120);

fn boot_count(w: &World, job: &str) -> String {
    std::fs::read_to_string(w.work_dir(job).join("data/microvm-marker")).unwrap_or_default()
}

/// The first entry of `dir` (a task or work dir: the tests here have one).
fn first_entry(dir: &std::path::Path) -> Option<std::path::PathBuf> {
    std::fs::read_dir(dir).ok()?.next()?.ok().map(|e| e.path())
}

/// The file `name` below [`first_entry`] of `dir`, or "" while there is none.
fn read_in_first_entry(dir: &std::path::Path, name: &str) -> String {
    first_entry(dir).and_then(|e| std::fs::read_to_string(e.join(name)).ok()).unwrap_or_default()
}

fn one_vmm(w: &World, host: &str) -> i32 {
    let pids = w.vmm_pids(host);
    assert_eq!(pids.len(), 1, "exactly one VMM for {host}: {pids:?}");
    pids[0]
}

#[test]
fn killed_vmm_fails_the_task_with_the_reason_and_nomad_restarts_it() {
    if !require_root("killed_vmm_fails_the_task_with_the_reason_and_nomad_restarts_it") {
        return;
    }
    let w = World::new("killvmm", true, "");
    let (_, alloc) = w.boot("kv", 61, 2);
    let vmm = one_vmm(&w, "kv");
    kill(Pid::from_raw(vmm), Signal::SIGKILL).unwrap();
    wait_until("the VM to boot again", BOOT, Duration::from_millis(500), || {
        let m = boot_count(&w, "kv");
        if m.contains("boot=2") { Ok(()) } else { Err(m) }
    });
    let events = w.agent.task_events(&alloc, "vm");
    assert!(events.contains("VM killed by signal 9"), "{events}");
    assert!(events.contains("Restarting"), "{events}");
    assert_ne!(one_vmm(&w, "kv"), vmm);
}

#[test]
fn killed_virtiofsd_is_reported_and_the_vm_restarted() {
    if !require_root("killed_virtiofsd_is_reported_and_the_vm_restarted") {
        return;
    }
    let w = World::new("killvfs", true, "");
    let (_, alloc) = w.boot("kf", 62, 2);
    let work = w.work_dir("kf");
    // The virtiofsd the supervisor started (its sandbox has a child too).
    let pids = w.task_pids();
    let virtiofsd = pids["virtiofsd"][0][1]["pid"].as_i64().expect("virtiofsd pid") as i32;
    assert!(pgrep(&format!("--shared-dir={}/data", work.display())).contains(&virtiofsd));
    kill(Pid::from_raw(virtiofsd), Signal::SIGKILL).unwrap();
    wait_until("the VM to boot again", Duration::from_secs(180), Duration::from_millis(500), || {
        let m = boot_count(&w, "kf");
        if m.contains("boot=2") { Ok(()) } else { Err(m) }
    });
    let events = w.agent.task_events(&alloc, "vm");
    assert!(events.contains("virtiofsd for share \"data\" exited"), "{events}");
    assert!(events.contains("Restarting"), "{events}");
    let again = w.task_pids()["virtiofsd"][0][1]["pid"].as_i64().expect("virtiofsd pid") as i32;
    assert_ne!(again, virtiofsd);
    assert!(pgrep(&format!("--shared-dir={}/data", work.display())).contains(&again), "virtiofsd is back");
}

/// Starts job `host`, kills the plugin once `now(task dir)` holds during the
/// start, and checks that in the end exactly one VM runs: the one Nomad
/// knows. Returns whether the kill came before the start was committed
/// (the supervisor then removes its VM itself).
fn kill_the_plugin_during_a_start(
    extra_plugin_config: &str,
    tag: &str,
    host: &str,
    ip: u8,
    now: impl Fn(&World, &std::path::Path) -> bool,
) -> bool {
    let w = World::new(tag, true, extra_plugin_config);
    let runner = w.runner(host, ip, &[]);
    assert!(w.run_vm_job(host, &runner, 3).status.success());
    let tasks = w.state_dir.join("tasks");
    let plugin = w.agent.plugin_pids();
    assert_eq!(plugin.len(), 1);
    let task_dir = wait_until("the moment to kill", Duration::from_secs(60), Duration::from_millis(1), || {
        match first_entry(&tasks) {
            Some(d) if now(&w, &d) => Ok(d),
            _ => Err(String::new()),
        }
    });
    kill(Pid::from_raw(plugin[0]), Signal::SIGKILL).unwrap();
    let uncommitted = !task_dir.join("committed").exists();
    eprintln!("{host}: plugin killed {} the start was committed", if uncommitted { "before" } else { "after" });

    // Nomad retries with a new plugin; in the end exactly one VM runs, the one Nomad knows.
    let alloc = w.agent.wait_running(host, "vm", BOOT);
    wait_until("the guest to be ready", BOOT, Duration::from_secs(1), || {
        let console = w.agent.alloc_logs(&alloc, "vm", false);
        if console.contains("microvm-test-guest: ready") {
            Ok(())
        } else {
            let events = w.agent.task_events(&alloc, "vm");
            Err(format!("console {console:?}; events:\n{events}\nVMMs {:?}", w.vmm_pids(host)))
        }
    });
    std::thread::sleep(Duration::from_secs(3));
    let vmm = one_vmm(&w, host);
    let pids = w.task_pids();
    assert_eq!(pids["vmm"]["pid"].as_i64(), Some(vmm as i64), "the VM that runs is the task's: {pids}");
    let task_dirs = std::fs::read_dir(&tasks).unwrap().count();
    assert_eq!(task_dirs, 1, "only the running task's dir is left");
    let supervisors = pgrep(&format!("supervise {}", tasks.display()));
    assert_eq!(supervisors.len(), 1, "{supervisors:?}");
    uncommitted
}

#[test]
fn plugin_killed_during_start_leaves_no_orphan() {
    if !require_root("plugin_killed_during_start_leaves_no_orphan") {
        return;
    }
    // Before taps and the supervisor exist: the task dir just appeared.
    let uncommitted = kill_the_plugin_during_a_start("", "killstart", "ks", 63, |_, _| true);
    assert!(uncommitted);
}

#[test]
fn plugin_killed_once_the_vmm_runs_but_before_nomad_has_its_handle_leaves_no_orphan() {
    if !require_root("plugin_killed_once_the_vmm_runs_but_before_nomad_has_its_handle_leaves_no_orphan") {
        return;
    }
    // The VMM runs, but the plugin has not committed the start: it is
    // frozen (SIGSTOP) once it has spawned the supervisor, which boots the VM
    // on its own while the commit never comes. Killed then, the plugin leaves
    // a VM no handle names, which its supervisor must remove. A virtiofsd
    // that takes 3 s to start holds the window open long enough to freeze
    // the plugin in it.
    let slow = microvm_e2e::open_tempdir();
    let virtiofsd = slow.path().join("slow-virtiofsd");
    std::fs::write(
        &virtiofsd,
        format!("#!/bin/sh\nsleep 3\nexec {} \"$@\"\n", microvm_e2e::runner::virtiofsd_bin().display()),
    )
    .unwrap();
    let mut perms = std::fs::metadata(&virtiofsd).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
    std::fs::set_permissions(&virtiofsd, perms).unwrap();
    let config = format!("    virtiofsd = \"{}\"\n", virtiofsd.display());
    let frozen = std::cell::Cell::new(false);
    let uncommitted = kill_the_plugin_during_a_start(&config, "killvmm0", "kw", 65, |w, task_dir| {
        if !frozen.get() && !pgrep(&format!("supervise {}", task_dir.display())).is_empty() {
            for p in w.agent.plugin_pids() {
                kill(Pid::from_raw(p), Signal::SIGSTOP).unwrap();
            }
            frozen.set(true);
        }
        !w.vmm_pids("kw").is_empty()
    });
    assert!(uncommitted, "the frozen plugin cannot have committed the start");
}

#[test]
fn plugin_killed_during_stop_the_stop_still_completes() {
    if !require_root("plugin_killed_during_stop_the_stop_still_completes") {
        return;
    }
    let w = World::new("killstop", true, "");
    let (_, alloc) = w.boot("kp", 64, 0);
    let plugin = w.agent.plugin_pids();
    w.agent.nomad_ok(&["job", "stop", "-detach", "kp"]);
    // The stop request is on its way: kill the plugin as soon as it starts.
    let tasks = w.state_dir.join("tasks");
    wait_until("the stop to start", Duration::from_secs(30), Duration::from_millis(2), || {
        let events = read_in_first_entry(&tasks, "events.jsonl");
        if events.contains("graceful shutdown") || w.vmm_pids("kp").is_empty() { Ok(()) } else { Err(events) }
    });
    kill(Pid::from_raw(plugin[0]), Signal::SIGKILL).unwrap();

    wait_until(
        "Nomad and the host to agree the VM is gone",
        Duration::from_secs(120),
        Duration::from_millis(500),
        || {
            let a = w.agent.api(&format!("/v1/allocation/{alloc}"));
            let vmm = w.vmm_pids("kp");
            let sup = pgrep(&format!("supervise {}", tasks.display()));
            if a["ClientStatus"] == "complete" && vmm.is_empty() && sup.is_empty() {
                Ok(())
            } else {
                Err(format!("alloc {} vmm {vmm:?} supervisors {sup:?}", a["ClientStatus"]))
            }
        },
    );
    let console = w.agent.alloc_logs(&alloc, "vm", false);
    assert!(console.contains("microvm-test-guest: graceful shutdown"), "{console}");
    wait_until("everything of the task to be gone", Duration::from_secs(60), Duration::from_millis(500), || {
        let left = leftovers(&w.netns, &w.state_dir, "kp");
        if left.is_empty() { Ok(()) } else { Err(format!("{left:?}")) }
    });
}

/// The agent dies (or drops the call) while StartTask runs: it never gets a
/// handle, so nobody would ever stop what that start created. The plugin
/// finishes the start and removes it; the same task starts cleanly later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_the_agent_hangs_up_on_leaves_nothing_behind() {
    if !require_root("a_start_the_agent_hangs_up_on_leaves_nothing_behind") {
        return;
    }
    let w = DirectWorld::new("hangup", "hu").await;
    let (state_dir, mut driver) = (w.state_dir.clone(), w.driver.clone());
    let task = vm_task("dddddddd-0000-0000-0000-000000000000", "hangup", 1, &w.runner);

    // Hang up the moment the start has created its task dir (taps, claims
    // and the supervisor come after it).
    let tasks = state_dir.join("tasks");
    let task_dir_exists = async {
        while !std::fs::read_dir(&tasks).is_ok_and(|mut d| d.next().is_some()) {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    };
    tokio::select! {
        r = driver.start_task(StartTaskRequest { task: Some(task.clone()) }) => {
            panic!("the start answered before the test could hang up: {:?}", r.map(|_| ()));
        }
        _ = task_dir_exists => {}
    }
    let left = || async {
        let mut last = Vec::new();
        for _ in 0..300 {
            last = leftovers(&w.netns, &state_dir, "hu");
            if last.is_empty() {
                return last;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        last
    };
    let after_hangup = left().await;
    assert!(after_hangup.is_empty(), "left behind after the hang-up: {after_hangup:?}");
    let log = std::fs::read_to_string(&w.plugin.stderr).unwrap_or_default();
    assert!(log.contains("hung up during StartTask"), "the plugin says why it removed the VM:\n{log}");

    // Nomad's retry: the same task starts, stops and leaves nothing.
    let handle = driver.start_task(StartTaskRequest { task: Some(task.clone()) }).await.expect("StartTask again");
    assert!(handle.into_inner().handle.is_some());
    assert!(!vmm_pids_under("hu", &state_dir).is_empty(), "the retried start runs a VMM");
    driver.destroy_task(DestroyTaskRequest { task_id: task.id.clone(), force: true }).await.expect("DestroyTask");
    let after_retry = left().await;
    assert!(after_retry.is_empty(), "left behind after the retry: {after_retry:?}");
}

/// The plugin dies between committing a start and answering it: the VM is
/// Nomad's in the supervisor's eyes, but Nomad never got its handle and
/// starts the task again (a new task id, same alloc and task) on a new
/// plugin. That start takes the running VM over (same runner, same log
/// FIFOs: nothing restarts); a start with another runner replaces it. One VM
/// either way, and the last destroy leaves nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_committed_start_nomad_never_heard_of_is_taken_over_by_the_next_start() {
    if !require_root("a_committed_start_nomad_never_heard_of_is_taken_over_by_the_next_start") {
        return;
    }
    let mut w = DirectWorld::new("orphan", "or").await;
    let alloc = "ffffffff-0000-0000-0000-000000000000";
    // Its plugin dies right after the start, before Nomad has the answer.
    async fn orphaned(w: &mut DirectWorld, n: u32, runner: &std::path::Path) -> Vec<i32> {
        let task = vm_task("ffffffff-0000-0000-0000-000000000000", "orphan", n, runner);
        w.driver.start_task(StartTaskRequest { task: Some(task) }).await.expect("StartTask");
        let vmm = vmm_pids_under("or", &w.state_dir);
        w.plugin.process.signal_group(Signal::SIGKILL);
        let _ = w.plugin.process.wait_exit(Duration::from_secs(10));
        let dir = w.dir.path().join(format!("plugin{n}"));
        std::fs::create_dir_all(&dir).unwrap();
        let (plugin, driver) = microvm_e2e::plugin::configured_plugin(&dir, &w.netns, &w.state_dir).await;
        (w.plugin, w.driver) = (plugin, driver);
        assert_eq!(vmm_pids_under("or", &w.state_dir), vmm, "the committed VM outlives the plugin");
        vmm
    }
    let log = |w: &DirectWorld| std::fs::read_to_string(&w.plugin.stderr).unwrap_or_default();
    let task_dirs = |w: &DirectWorld| std::fs::read_dir(w.state_dir.join("tasks")).unwrap().flatten().count();

    let runner = w.runner.clone();
    let orphan_vmm = orphaned(&mut w, 1, &runner).await;
    assert_eq!(orphan_vmm.len(), 1);
    let second = vm_task(alloc, "orphan", 2, &runner);
    w.driver.start_task(StartTaskRequest { task: Some(second.clone()) }).await.expect("the next start succeeds");
    assert_eq!(vmm_pids_under("or", &w.state_dir), orphan_vmm, "the same VM, taken over");
    assert_eq!(task_dirs(&w), 1, "no second task dir");
    assert!(log(&w).contains("unknown to Nomad: taking it over"), "{}", log(&w));

    // Orphaned again, and the next start names another runner (a new job version).
    let _ = orphaned(&mut w, 3, &runner).await;
    let other = microvm_e2e::runner::make_runner(
        &w.dir.path().join("runners2"),
        &["--hostname", "or", "--tap", "vm-or", "--share", "data:data", "--mem", "200", "--store"],
    );
    assert_ne!(other, runner);
    let fourth = vm_task(alloc, "orphan", 4, &other);
    w.driver.start_task(StartTaskRequest { task: Some(fourth.clone()) }).await.expect("a start with another runner");
    let now = vmm_pids_under("or", &w.state_dir);
    assert_eq!(now.len(), 1, "one VM: {now:?}");
    assert_ne!(now, orphan_vmm, "the orphan was replaced");
    assert_eq!(task_dirs(&w), 1, "only the new task's dir");
    assert!(log(&w).contains("unknown to Nomad: removing it"), "{}", log(&w));

    w.driver.destroy_task(DestroyTaskRequest { task_id: fourth.id.clone(), force: true }).await.expect("DestroyTask");
    let left = leftovers(&w.netns, &w.state_dir, "or");
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// The host shuts down: `nomad-driver-microvm stop-all` (the NixOS module's
/// ExecStop) stops every VM gracefully, whether or not an agent is there,
/// and the exit it records says why, for Nomad to read after the boot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_all_shuts_every_vm_down_gracefully_for_the_hosts_shutdown() {
    use microvm_proto::drivers::WaitTaskRequest;
    if !require_root("stop_all_shuts_every_vm_down_gracefully_for_the_hosts_shutdown") {
        return;
    }
    let w = DirectWorld::new("stopall", "sa").await;
    let mut driver = w.driver.clone();
    let task = vm_task("abababab-0000-0000-0000-000000000000", "stopall", 1, &w.runner);
    driver.start_task(StartTaskRequest { task: Some(task.clone()) }).await.expect("StartTask");
    // Booted far enough to shut down on its own (the guest writes its marker).
    let vms = w.state_dir.join("vms");
    wait_until("the guest to be up", BOOT, Duration::from_millis(500), || {
        let marker = read_in_first_entry(&vms, "data/microvm-marker");
        if marker.contains("boot=1") { Ok(()) } else { Err(marker) }
    });

    let out = std::process::Command::new(microvm_e2e::driver_bin())
        .arg("stop-all")
        .arg(&w.state_dir)
        .arg("30s")
        .output()
        .expect("stop-all");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), format!("stopped 1 VM(s) under {}", w.state_dir.display()));
    assert!(vmm_pids_under("sa", &w.state_dir).is_empty(), "the VMM is gone when stop-all returns");

    let exit = driver.wait_task(WaitTaskRequest { task_id: task.id.clone() }).await.expect("WaitTask").into_inner();
    assert_eq!(exit.result.as_ref().map(|r| r.exit_code), Some(0), "the guest powered off: {exit:?}");
    assert!(exit.err.contains("the host is shutting down"), "{exit:?}");
    let events = read_in_first_entry(&w.state_dir.join("tasks"), "events.jsonl");
    assert!(events.contains("graceful shutdown: running microvm-shutdown"), "{events}");
    assert!(!events.contains("timed out"), "{events}");

    // Nothing left to stop: a second run says so and succeeds.
    let again =
        std::process::Command::new(microvm_e2e::driver_bin()).arg("stop-all").arg(&w.state_dir).output().unwrap();
    assert!(again.status.success());
    assert!(String::from_utf8_lossy(&again.stdout).starts_with("stopped 0 VM(s)"));
    driver.destroy_task(DestroyTaskRequest { task_id: task.id, force: true }).await.expect("DestroyTask");
    let left = leftovers(&w.netns, &w.state_dir, "sa");
    assert!(left.is_empty(), "left behind: {left:?}");
}

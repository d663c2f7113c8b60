//! Operating a microVM through `nomad alloc`: console, exec, signal,
//! restart and stats.

use std::process::Command;
use std::time::Duration;

use microvm_e2e::vm::World;
use microvm_e2e::{nomad_bin, require_root, wait_until};

const BOOT: Duration = Duration::from_secs(120);

/// A terminal program under tmux, inside the test's network namespace.
struct Tmux {
    session: String,
}

impl Tmux {
    fn start(w: &World, name: &str, args: &[&str]) -> Tmux {
        let session = format!("{name}-{}", std::process::id());
        let cmd = format!(
            "ip netns exec {} env NOMAD_ADDR=http://127.0.0.1:4646 {} {}",
            w.netns.name,
            nomad_bin().display(),
            args.join(" ")
        );
        let ok = Command::new("tmux")
            .args(["new-session", "-d", "-s", &session, "-x", "160", "-y", "40", &cmd])
            .status()
            .expect("tmux");
        assert!(ok.success());
        Tmux { session }
    }

    fn type_line(&self, text: &str) {
        assert!(Command::new("tmux").args(["send-keys", "-t", &self.session, "-l", text]).status().unwrap().success());
        assert!(Command::new("tmux").args(["send-keys", "-t", &self.session, "Enter"]).status().unwrap().success());
    }

    fn screen(&self) -> String {
        let out =
            Command::new("tmux").args(["capture-pane", "-p", "-t", &self.session, "-S", "-200"]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    /// Waits up to 30 s for `text` on the screen (`what`: for the failure).
    fn wait_for(&self, what: &str, text: &str) {
        wait_until(what, Duration::from_secs(30), Duration::from_millis(500), || {
            let screen = self.screen();
            if screen.contains(text) { Ok(()) } else { Err(screen) }
        });
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux").args(["kill-session", "-t", &self.session]).status();
    }
}

#[test]
fn console_session_exec_signal_restart_and_stats() {
    if !require_root("console_session_exec_signal_restart_and_stats") {
        return;
    }
    let w = World::new("ops", true, "");
    let (_, alloc) = w.boot("ops", 81, 3);

    // 1. A console session types at the guest's shell and reads the answer;
    //    `nomad alloc logs` sees it too.
    let console = Tmux::start(&w, "console", &["alloc", "exec", "-i", "-t", &alloc, "console"]);
    std::thread::sleep(Duration::from_secs(2));
    console.type_line("echo hello-$((6*7))");
    console.wait_for("the guest's answer on the console", "hello-42");
    w.wait_console(&alloc, "hello-42", Duration::from_secs(10));

    // A second session may not type at the same time.
    let second = w.agent.nomad(&["alloc", "exec", "-i=false", "-t=false", &alloc, "console"]);
    let text = String::from_utf8_lossy(&second.stderr).to_string() + &String::from_utf8_lossy(&second.stdout);
    assert!(text.contains("another session is attached"), "{text}");
    assert!(!second.status.success());

    // Leaving the session leaves the VM running, and frees the console for
    // the next session.
    drop(console);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(w.agent.api(&format!("/v1/allocation/{alloc}"))["TaskStates"]["vm"]["State"], "running");
    let freed = std::time::Instant::now();
    wait_until("the console to be free again", Duration::from_secs(60), Duration::from_millis(500), || {
        let probe = w.agent.nomad(&["alloc", "exec", "-i=false", "-t=false", &alloc, "console"]);
        let text = String::from_utf8_lossy(&probe.stderr).to_string();
        if text.contains("another session is attached") { Err(text) } else { Ok(()) }
    });
    eprintln!("console free {:?} after the first session left", freed.elapsed());
    let again = Tmux::start(&w, "console2", &["alloc", "exec", "-i", "-t", &alloc, "console"]);
    // Longer than the driver waits for a silent session: the CLI's
    // heartbeats keep an idle one attached.
    std::thread::sleep(Duration::from_secs(40));
    again.type_line("echo again-$((5*5))");
    again.wait_for("a second session's answer", "again-25");
    drop(again);

    // 2. Commands need vsock in the guest; this runner has none: say so.
    let exec = w.agent.nomad(&["alloc", "exec", "-i=false", "-t=false", &alloc, "uname", "-a"]);
    let text = String::from_utf8_lossy(&exec.stderr).to_string() + &String::from_utf8_lossy(&exec.stdout);
    assert!(text.contains("microvm.vsock.cid"), "{text}");
    assert!(!exec.status.success());

    // A guest with a vsock CID is reached through the driver's vsock-proxy;
    // these machines have no /dev/vhost-vsock, so no guest can have vsock and
    // this runner only declares its CID: the session says which CID could
    // not be reached, and why.
    let runner = w.runner("opsv", 82, &["--vsock-cid-file", "77"]);
    assert!(w.run_vm_job("opsv", &runner, 0).status.success());
    let vsock_alloc = w.agent.wait_running("opsv", "vm", BOOT);
    let exec = w.agent.nomad(&["alloc", "exec", "-i=false", "-t=false", &vsock_alloc, "uname", "-a"]);
    let text = String::from_utf8_lossy(&exec.stderr).to_string() + &String::from_utf8_lossy(&exec.stdout);
    assert!(text.contains("cannot connect to port 22 of vsock CID 77"), "{text}");
    assert!(!exec.status.success());
    // A kernel vsock CID is the host's to give once: a second VM asking for
    // the same one is refused before anything starts.
    let twin = w.runner("opsw", 83, &["--vsock-cid-file", "77"]);
    assert!(w.run_vm_job("opsw", &twin, 0).status.success());
    let events = w.agent.wait_failed("opsw", "vm");
    assert!(events.contains("vsock CID 77 is in use by another task"), "{events}");
    assert!(w.vmm_pids("opsw").is_empty());
    w.agent.nomad_ok(&["job", "stop", "-detach", "opsv"]);

    // 3. `nomad alloc status -stats`: real CPU and memory of the VM.
    wait_until("non-zero stats in alloc status", Duration::from_secs(30), Duration::from_secs(1), || {
        let status = w.agent.nomad_ok(&["alloc", "status", "-stats", &alloc]);
        let usage = status.lines().skip_while(|l| !l.starts_with("CPU")).nth(1).unwrap_or("").to_string();
        if !usage.starts_with("0/") && usage.contains("MiB") && !usage.contains(" 0 B/") { Ok(()) } else { Err(status) }
    });

    // 4. SIGTERM is a graceful guest shutdown; Nomad then restarts the VM.
    let work = w.work_dir("ops");
    let boots = || std::fs::read_to_string(work.join("data/microvm-marker")).unwrap_or_default();
    w.agent.nomad_ok(&["alloc", "signal", "-s", "SIGTERM", &alloc, "vm"]);
    w.wait_console(&alloc, "microvm-test-guest: graceful shutdown", Duration::from_secs(60));
    wait_until("the VM to boot again", BOOT, Duration::from_millis(500), || {
        if boots().contains("boot=2") { Ok(()) } else { Err(boots()) }
    });

    // 5. `nomad alloc restart` shuts the same VM down gracefully and boots it again.
    wait_until("the second boot to be ready", BOOT, Duration::from_millis(500), || {
        let logs = w.agent.alloc_logs(&alloc, "vm", false);
        let n = logs.matches("microvm-test-guest: ready").count();
        if n >= 2 { Ok(()) } else { Err(format!("{n} ready lines")) }
    });
    w.agent.nomad_ok(&["alloc", "restart", &alloc, "vm"]);
    wait_until("the VM to boot a third time", BOOT, Duration::from_millis(500), || {
        if boots().contains("boot=3") { Ok(()) } else { Err(boots()) }
    });
    let events = w.agent.task_events(&alloc, "vm");
    let after_restart = events.split("Restart Signaled").nth(1).unwrap_or_default();
    assert!(after_restart.contains("graceful shutdown: running microvm-shutdown"), "{events}");
    assert!(after_restart.contains("virtiofsd ready for share(s) data"), "virtiofsd re-launched:\n{events}");
    let logs = w.agent.alloc_logs(&alloc, "vm", false);
    assert!(logs.matches("microvm-test-guest: graceful shutdown").count() >= 2, "{logs}");
}

/// ExecTask, what Nomad's script checks call: a command in the guest runs
/// to its end and comes back as one answer; without a way in, the answer
/// says what the guest must enable, and a CID that cannot be reached is named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_task_answers_script_checks() {
    use microvm_e2e::plugin::{DirectWorld, vm_task};
    use microvm_proto::drivers::{DestroyTaskRequest, ExecTaskRequest, StartTaskRequest};
    if !require_root("exec_task_answers_script_checks") {
        return;
    }
    let w = DirectWorld::new("exectask", "et").await;
    let mut driver = w.driver.clone();
    let vsock_runner = microvm_e2e::runner::make_runner(
        &w.dir.path().join("runners"),
        &["--hostname", "ev", "--tap", "vm-ev", "--vsock-cid-file", "78", "--store"],
    );
    let plain = vm_task("acacacac-0000-0000-0000-000000000000", "exectask", 1, &w.runner);
    let vsock = vm_task("adadadad-0000-0000-0000-000000000000", "exectask-vsock", 1, &vsock_runner);
    for task in [&plain, &vsock] {
        driver.start_task(StartTaskRequest { task: Some(task.clone()) }).await.expect("StartTask");
    }
    let exec = |task_id: String| {
        let mut driver = driver.clone();
        async move {
            let timeout = Some(prost_types::Duration { seconds: 20, nanos: 0 });
            let r = driver.exec_task(ExecTaskRequest { task_id, command: vec!["uname".into(), "-a".into()], timeout });
            r.await.expect("ExecTask answers").into_inner()
        }
    };
    let answer = exec(plain.id.clone()).await;
    assert_eq!(answer.result.as_ref().map(|r| r.exit_code), Some(126), "{answer:?}");
    assert!(String::from_utf8_lossy(&answer.stderr).contains("microvm.vsock.cid"), "{answer:?}");
    let answer = exec(vsock.id.clone()).await;
    assert_ne!(answer.result.as_ref().map(|r| r.exit_code), Some(0), "{answer:?}");
    let stderr = String::from_utf8_lossy(&answer.stderr).to_string();
    assert!(stderr.contains("cannot connect to port 22 of vsock CID 78"), "{stderr}");

    // With `exec_ssh_key_file` set, ssh logs in with that key, and a key file
    // that is not there is named instead of ssh failing later.
    let key = w.dir.path().join("exec_key");
    let extra = format!("    exec_ssh_key_file = \"{}\"\n", key.display());
    w.set_config(&extra).await;
    let answer = exec(vsock.id.clone()).await;
    assert_eq!(answer.result.as_ref().map(|r| r.exit_code), Some(126), "{answer:?}");
    let stderr = String::from_utf8_lossy(&answer.stderr).to_string();
    assert!(stderr.contains(&format!("exec_ssh_key_file {} does not exist", key.display())), "{stderr}");
    let keygen = std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&key)
        .status()
        .expect("ssh-keygen");
    assert!(keygen.success());
    let answer = exec(vsock.id.clone()).await;
    let stderr = String::from_utf8_lossy(&answer.stderr).to_string();
    assert!(stderr.contains("cannot connect to port 22 of vsock CID 78"), "{stderr}");
    for task in [plain, vsock] {
        driver.destroy_task(DestroyTaskRequest { task_id: task.id, force: true }).await.expect("DestroyTask");
    }
}

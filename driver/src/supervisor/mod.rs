//! The per-task supervisor: `nomad-driver-microvm supervise <spec.json>`.
//!
//! It is the containerd-shim / Nomad-executor shape: a small process per VM
//! that outlives the plugin. It starts virtiofsd and the VMM, writes the
//! serial console into Nomad's log FIFOs, performs graceful stops, and keeps
//! the VMM's exit status in the task dir. The plugin can die and come back at
//! any time; the supervisor does not notice.
//!
//! Start-up handshake: the process the plugin spawns forks once; the parent
//! relays one JSON line (`Ready`) from the child to its stdout and exits, so
//! the plugin never has the supervisor as a child and the supervisor is in
//! its own session.

pub mod console;
pub mod identity;
pub mod logsink;
pub mod protocol;
pub mod run;
pub mod stop_all;
pub mod virtiofsd;

use std::io::Write;
use std::os::fd::OwnedFd;
use std::path::Path;

use protocol::{LaunchSpec, Ready};

/// Entry point of the `supervise` mode; returns the process exit code.
pub fn main(spec_path: &Path) -> i32 {
    let spec: LaunchSpec = match protocol::read_json(spec_path) {
        Ok(s) => s,
        Err(e) => {
            report_to_stdout(&Ready::Failed { error: format!("cannot read {}: {e}", spec_path.display()) });
            return 1;
        }
    };
    // CLOEXEC: the VMM and virtiofsd must not inherit the write end, or the
    // relay would never see EOF if the supervisor died early.
    let (read_end, write_end) = match nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC) {
        Ok(p) => p,
        Err(e) => {
            report_to_stdout(&Ready::Failed { error: format!("pipe: {e}") });
            return 1;
        }
    };
    // SAFETY: called before any thread exists in this process (main has not
    // started a runtime yet), so the child may continue normally.
    match unsafe { nix::unistd::fork() } {
        Err(e) => {
            report_to_stdout(&Ready::Failed { error: format!("fork: {e}") });
            1
        }
        Ok(nix::unistd::ForkResult::Parent { .. }) => {
            drop(write_end);
            relay(read_end)
        }
        Ok(nix::unistd::ForkResult::Child) => {
            drop(read_end);
            detach(&spec);
            let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    send_ready(write_end, &Ready::Failed { error: format!("runtime: {e}") });
                    return 1;
                }
            };
            runtime.block_on(run::supervise(spec, write_end))
        }
    }
}

/// Parent side of the fork: pass the child's one line on, exit 0 if it
/// started the VM.
fn relay(read_end: OwnedFd) -> i32 {
    use std::io::BufRead;
    let mut line = String::new();
    let _ = std::io::BufReader::new(std::fs::File::from(read_end)).read_line(&mut line);
    let ready: Ready = serde_json::from_str(line.trim()).unwrap_or_else(|_| Ready::Failed {
        error: "the supervisor exited before reporting (see supervisor.log in the task dir)".into(),
    });
    report_to_stdout(&ready);
    matches!(ready, Ready::Started { .. }).then_some(0).unwrap_or(1)
}

fn report_to_stdout(ready: &Ready) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{}", serde_json::to_string(ready).unwrap_or_default());
    let _ = out.flush();
}

pub(crate) fn send_ready(fd: OwnedFd, ready: &Ready) {
    let mut f = std::fs::File::from(fd);
    let _ = writeln!(f, "{}", serde_json::to_string(ready).unwrap_or_default());
}

/// New session (so the agent's or the plugin's signals never reach us), stdio
/// to /dev/null and the log file, and no plugin environment leaking on.
fn detach(spec: &LaunchSpec) {
    let _ = nix::unistd::setsid();
    let devnull = std::fs::File::open("/dev/null");
    let log = std::fs::OpenOptions::new().create(true).append(true).open(spec.task_dir.join(protocol::LOG_FILE));
    if let Ok(null) = &devnull {
        let _ = nix::unistd::dup2_stdin(null);
    }
    if let Ok(log) = &log {
        let _ = nix::unistd::dup2_stdout(log);
        let _ = nix::unistd::dup2_stderr(log);
    } else if let Ok(null) = &devnull {
        let _ = nix::unistd::dup2_stdout(null);
        let _ = nix::unistd::dup2_stderr(null);
    }
    // Ctrl-C in a terminal running `nomad agent -dev` must not stop VMs.
    // SAFETY: setting a signal to SIG_IGN has no handler to be unsafe about.
    unsafe {
        let _ = nix::sys::signal::signal(nix::sys::signal::Signal::SIGINT, nix::sys::signal::SigHandler::SigIgn);
        let _ = nix::sys::signal::signal(nix::sys::signal::Signal::SIGHUP, nix::sys::signal::SigHandler::SigIgn);
        let _ = nix::sys::signal::signal(nix::sys::signal::Signal::SIGPIPE, nix::sys::signal::SigHandler::SigIgn);
    }
    let _ = tracing_subscriber::fmt().with_writer(std::io::stderr).with_ansi(false).with_target(false).try_init();
}

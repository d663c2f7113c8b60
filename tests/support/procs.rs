//! Processes a test starts: each in its own process group, killed (the whole
//! group) when the handle drops, so a failing test leaves nothing behind.

use std::process::{Child, Command};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

pub struct Group {
    pub child: Child,
    name: String,
}

impl Group {
    pub fn spawn(name: &str, cmd: &mut Command) -> Group {
        use std::os::unix::process::CommandExt;
        let child = cmd.process_group(0).spawn().unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Group { child, name: name.to_string() }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Signals the leader only (e.g. SIGKILL of an agent, not its plugins).
    pub fn signal_leader(&self, sig: Signal) {
        let _ = nix::sys::signal::kill(Pid::from_raw(self.pid()), sig);
    }

    pub fn signal_group(&self, sig: Signal) {
        let _ = killpg(Pid::from_raw(self.pid()), sig);
    }

    /// Waits up to `limit` for the leader to exit.
    pub fn wait_exit(&mut self, limit: std::time::Duration) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + limit;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if std::time::Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        self.signal_group(Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

//! Network namespaces a test creates and removes itself. Nothing a test runs
//! sees the host's network: agents, plugins and VMs all live inside.

use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

static COUNTER: AtomicU32 = AtomicU32::new(0);

pub struct Netns {
    pub name: String,
}

fn ip(args: &[&str]) -> Output {
    Command::new("ip").args(args).output().expect("run ip")
}

fn ip_ok(args: &[&str]) {
    let out = ip(args);
    assert!(out.status.success(), "ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
}

impl Netns {
    /// A fresh namespace with only `lo` (up): no route anywhere else.
    pub fn new(tag: &str) -> Netns {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let name = format!("mvt-{tag}-{}-{n}", std::process::id());
        ip_ok(&["netns", "add", &name]);
        let ns = Netns { name };
        ip_ok(&["-n", &ns.name, "link", "set", "lo", "up"]);
        ns
    }

    /// Adds a bridge with `addr` (e.g. 192.0.2.1/24) for VM taps.
    pub fn add_bridge(&self, bridge: &str, addr: &str) {
        ip_ok(&["-n", &self.name, "link", "add", bridge, "type", "bridge"]);
        ip_ok(&["-n", &self.name, "addr", "add", addr, "dev", bridge]);
        ip_ok(&["-n", &self.name, "link", "set", bridge, "up"]);
    }

    /// A command that runs inside the namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    /// Interface names in the namespace.
    pub fn links(&self) -> Vec<String> {
        let out = ip(&["-n", &self.name, "-o", "link", "show"]);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split(':').nth(1))
            .map(|n| n.trim().split('@').next().unwrap_or("").to_string())
            .collect()
    }

    /// Pids of every process in the namespace.
    pub fn pids(&self) -> Vec<i32> {
        let out = ip(&["netns", "pids", &self.name]);
        String::from_utf8_lossy(&out.stdout).split_whitespace().filter_map(|p| p.parse().ok()).collect()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for pid in self.pids() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
        let _ = ip(&["netns", "del", &self.name]);
    }
}

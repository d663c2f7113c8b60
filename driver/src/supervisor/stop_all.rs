//! `nomad-driver-microvm stop-all STATE_DIR [TIMEOUT]`: shut down every VM
//! of this node gracefully, for the host's own shutdown.
//!
//! VMs outlive their Nomad agent on purpose, so stopping the agent's unit
//! leaves them running, and at power-off systemd's final sweep would only
//! SIGTERM/SIGKILL whatever is left: qemu exits at once, the guest never
//! syncs its disks. A unit ordered after the agent's runs this in its
//! `ExecStop` (the NixOS module does): each supervisor runs the booted
//! runner's `microvm-shutdown`, as for a Nomad stop, and records the exit
//! with the reason, which Nomad reads when the agent recovers its tasks after
//! the boot (and restarts them by the job's restart policy).

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::protocol::{self, Pids, Request};
use super::run::request;

/// The reason recorded with each VM's exit.
pub const REASON: &str = "the host is shutting down: stopping the VM gracefully";

/// One VM this node runs: its task dir and its processes.
struct Running {
    task_dir: PathBuf,
    pids: Pids,
}

fn running(state_dir: &Path) -> Vec<Running> {
    let Ok(entries) = std::fs::read_dir(state_dir.join("tasks")) else { return Vec::new() };
    entries
        .flatten()
        .map(|e| e.path())
        .filter(|dir| dir.join(protocol::CONTROL_SOCKET).exists() && !dir.join(protocol::EXIT_FILE).exists())
        .filter_map(|task_dir| {
            let pids = protocol::read_json::<Pids>(&task_dir.join(protocol::PIDS_FILE)).ok()?;
            pids.vmm.filter(|v| v.is_alive())?;
            Some(Running { task_dir, pids })
        })
        .collect()
}

/// Asks every running VM to stop within `timeout` (its supervisor then
/// escalates as for any stop) and waits until all VMMs are gone. Returns how
/// many were stopped, and the task dirs of any that were still running at
/// the end.
pub async fn stop_all(state_dir: &Path, timeout: Duration) -> (usize, Vec<PathBuf>) {
    let vms = running(state_dir);
    let stop = Request::Stop { timeout, reason: Some(REASON.to_string()) };
    let asks = vms.iter().map(|vm| request(&vm.task_dir, &stop, Duration::from_secs(5)));
    let answers = futures_util::future::join_all(asks).await;
    for (vm, answer) in vms.iter().zip(answers) {
        if !matches!(answer, Ok(ref r) if r.ok) {
            // No supervisor to ask: the VMM gets what systemd would send.
            if let Some(vmm) = vm.pids.vmm {
                vmm.signal_group(nix::sys::signal::Signal::SIGTERM);
            }
        }
    }
    // The supervisors' own budget: the timeout, then TERM and KILL.
    let budget = timeout + Duration::from_secs(10);
    let waits = vms.iter().map(|vm| async move {
        let vmm = vm.pids.vmm?;
        tokio::time::timeout(budget, vmm.exited()).await.err().map(|_| vm.task_dir.clone())
    });
    let left: Vec<PathBuf> = futures_util::future::join_all(waits).await.into_iter().flatten().collect();
    (vms.len(), left)
}

/// The command: returns the exit code.
pub fn main(state_dir: &Path, timeout: Duration) -> i32 {
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("nomad-driver-microvm stop-all: {e}");
            return 1;
        }
    };
    let (stopped, left) = runtime.block_on(stop_all(state_dir, timeout));
    println!("stopped {} VM(s) under {}", stopped - left.len(), state_dir.display());
    for dir in &left {
        eprintln!("nomad-driver-microvm stop-all: the VM of {} did not stop", dir.display());
    }
    if left.is_empty() { 0 } else { 1 }
}

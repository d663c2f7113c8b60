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

use super::protocol::{self, Pids};
use super::run::stop_and_wait;

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
    let stops = vms.iter().map(|vm| async move {
        let stopped = stop_and_wait(&vm.task_dir, &vm.pids, timeout, Some(REASON.to_string())).await;
        (!stopped).then(|| vm.task_dir.clone())
    });
    let left: Vec<PathBuf> = futures_util::future::join_all(stops).await.into_iter().flatten().collect();
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

//! `TaskHandle.driver_state`: everything RecoverTask needs, because after an
//! agent restart Nomad hands back the handle without the task's raw config.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::config::TaskConfig;
use crate::proc::ProcessId;

/// `TaskHandle.version`; 0 is reserved by Nomad.
pub const HANDLE_VERSION: i32 = 1;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DriverState {
    pub task_dir: PathBuf,
    pub work_dir: PathBuf,
    pub slug: String,
    /// The decoded task config (Nomad does not persist the raw one).
    pub config: TaskConfig,
    /// The runner actually booted (after resolving and fetching).
    pub runner: PathBuf,
    pub hostname: String,
    /// Interfaces we created and must delete.
    pub taps: Vec<String>,
    pub macvtaps: Vec<String>,
    pub gcroot: Option<PathBuf>,
    /// The task's own cgroup, on cgroup v2 hosts (absent in handles of
    /// drivers before cgroups).
    #[serde(default)]
    pub cgroup: Option<PathBuf>,
    /// The kernel vsock CID claimed for the guest (absent in older handles).
    #[serde(default)]
    pub vsock_cid: Option<u32>,
    pub supervisor: Option<ProcessId>,
    pub vmm: Option<ProcessId>,
    /// Unix time in milliseconds.
    pub started_at_ms: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("task handle version {0} is not one this driver wrote (expected {HANDLE_VERSION})")]
    Version(i32),
    #[error("task handle has no driver state")]
    Empty,
    #[error("task handle driver state is not readable")]
    Decode(#[source] serde_json::Error),
}

impl DriverState {
    /// What the task holds on the host (its state dir is two levels above
    /// its task dir: `<state_dir>/tasks/<id>`).
    pub fn hold(&self) -> super::hold::HostHold {
        let state_dir = self.task_dir.parent().and_then(|p| p.parent()).map(PathBuf::from).unwrap_or_default();
        super::hold::HostHold {
            state_dir,
            task_dir: self.task_dir.clone(),
            work_dir: self.work_dir.clone(),
            slug: self.slug.clone(),
            interfaces: self.taps.iter().chain(&self.macvtaps).cloned().collect(),
            gcroot: self.gcroot.clone(),
            cgroup: self.cgroup.clone(),
            vsock_cid: self.vsock_cid,
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn decode(version: i32, bytes: &[u8]) -> Result<DriverState, StateError> {
        if version != HANDLE_VERSION {
            return Err(StateError::Version(version));
        }
        if bytes.is_empty() {
            return Err(StateError::Empty);
        }
        serde_json::from_slice(bytes).map_err(StateError::Decode)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub fn sample() -> DriverState {
        DriverState {
            task_dir: "/var/lib/nomad-microvm/tasks/0123abcd-1a2b3c4d".into(),
            work_dir: "/var/lib/nomad-microvm/vms/web-vm-0badc0de".into(),
            slug: "web-vm-0badc0de".into(),
            config: TaskConfig { runner: "/nix/store/abc-microvm-qemu-web".into(), bridge: Some("br0".into()) },
            runner: "/nix/store/abc-microvm-qemu-web".into(),
            hostname: "web".into(),
            taps: vec!["vm-web".into()],
            macvtaps: vec![],
            gcroot: Some("/nix/var/nix/gcroots/nomad-microvm/web-vm-0badc0de".into()),
            cgroup: Some("/sys/fs/cgroup/nomad.slice/share.slice/0123abcd.vm.scope".into()),
            vsock_cid: Some(42),
            supervisor: Some(ProcessId { pid: 42, start_time: 1000 }),
            vmm: Some(ProcessId { pid: 43, start_time: 1001 }),
            started_at_ms: 1_700_000_000_000,
        }
    }

    #[test]
    fn round_trips() {
        let s = sample();
        assert_eq!(DriverState::decode(HANDLE_VERSION, &s.encode()).unwrap(), s);
    }

    #[test]
    fn handles_from_before_cgroups_still_decode() {
        let mut json: serde_json::Value = serde_json::from_slice(&sample().encode()).unwrap();
        json.as_object_mut().unwrap().remove("cgroup");
        let old = DriverState::decode(HANDLE_VERSION, &serde_json::to_vec(&json).unwrap()).unwrap();
        assert_eq!(old.cgroup, None);
        assert_eq!(old.hold().cgroup, None);
    }

    #[test]
    fn rejects_foreign_or_empty_state() {
        assert!(matches!(DriverState::decode(0, b"{}"), Err(StateError::Version(0))));
        assert!(matches!(DriverState::decode(HANDLE_VERSION, b""), Err(StateError::Empty)));
        assert!(matches!(DriverState::decode(HANDLE_VERSION, b"{\"task_dir\":1}"), Err(StateError::Decode(_))));
    }
}

//! What a task holds on the host, and letting go of it: its interfaces,
//! its name claims, the GC root of its booted runner, the `booted` link and
//! its task dir. Used by DestroyTask, by RecoverTask for a VM that is gone,
//! and by a supervisor whose plugin died before the start was confirmed.
//! Volume images and share contents in the work dir are never touched.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::claims;
use crate::net::HostNet;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostHold {
    pub state_dir: PathBuf,
    pub task_dir: PathBuf,
    pub work_dir: PathBuf,
    pub slug: String,
    /// Taps and macvtaps we created.
    pub interfaces: Vec<String>,
    pub gcroot: Option<PathBuf>,
    /// The task's own cgroup (v2 hosts), see `crate::cgroup`.
    #[serde(default)]
    pub cgroup: Option<PathBuf>,
    /// The kernel vsock CID claimed for the guest.
    #[serde(default)]
    pub vsock_cid: Option<u32>,
}

impl HostHold {
    /// Idempotent; an interface is deleted only while this task still holds
    /// its claim, so a stale handle never deletes another task's interface.
    pub fn release(&self, net: &dyn HostNet) {
        for name in &self.interfaces {
            let claim = claims::tap_claim(name);
            let ours = std::fs::read_link(claims::claims_dir(&self.state_dir).join(&claim))
                .map(|owner| owner == self.task_dir)
                .unwrap_or(false);
            if ours {
                if let Err(e) = net.delete_link(name) {
                    tracing::warn!(interface = %name, error = %e, "cannot delete interface");
                }
                claims::release(&self.state_dir, &claim, &self.task_dir);
            }
        }
        if let Some(cid) = self.vsock_cid {
            claims::release(&self.state_dir, &claims::vsock_claim(cid), &self.task_dir);
        }
        let work_claim = claims::workdir_claim(&self.slug);
        let holds_work_dir = std::fs::read_link(claims::claims_dir(&self.state_dir).join(&work_claim))
            .map(|owner| owner == self.task_dir)
            .unwrap_or(false);
        if holds_work_dir {
            // The GC root and `booted` belong to whoever runs in the work dir now.
            if let Some(root) = &self.gcroot {
                let _ = std::fs::remove_file(root);
            }
            let _ = std::fs::remove_file(self.work_dir.join("booted"));
            claims::release(&self.state_dir, &work_claim, &self.task_dir);
        }
        let _ = std::fs::remove_dir_all(&self.task_dir);
        if let Some(cgroup) = &self.cgroup {
            crate::cgroup::remove(cgroup, std::time::Duration::from_secs(2));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::{NetCall, RecordingNet};

    #[test]
    fn releases_only_what_this_task_still_holds() {
        let state = tempfile::tempdir().unwrap();
        let mine = state.path().join("tasks/mine");
        let other = state.path().join("tasks/other");
        let work = state.path().join("vms/w");
        for d in [&mine, &other, &work] {
            std::fs::create_dir_all(d).unwrap();
        }
        std::os::unix::fs::symlink("/nix/store/x", work.join("booted")).unwrap();
        claims::claim(state.path(), &claims::tap_claim("tap-a"), "tap-a", &mine).unwrap();
        claims::claim(state.path(), &claims::workdir_claim("w"), "w", &mine).unwrap();
        claims::claim(state.path(), &claims::vsock_claim(7), "vsock CID 7", &mine).unwrap();
        // tap-b was taken over by another (live: still starting) task.
        claims::claim(state.path(), &claims::tap_claim("tap-b"), "tap-b", &other).unwrap();
        let net = RecordingNet::new().with_link("tap-a").with_link("tap-b");
        let hold = HostHold {
            state_dir: state.path().to_path_buf(),
            task_dir: mine.clone(),
            work_dir: work.clone(),
            slug: "w".into(),
            interfaces: vec!["tap-a".into(), "tap-b".into()],
            gcroot: None,
            cgroup: None,
            vsock_cid: Some(7),
        };
        hold.release(&net);
        assert_eq!(net.calls(), vec![NetCall::DeleteLink("tap-a".into())]);
        assert!(!mine.exists() && other.exists());
        assert!(!work.join("booted").exists(), "booted link removed with the work dir claim");
        assert!(work.exists(), "the work dir itself stays");
        assert!(claims::claims_dir(state.path()).join(claims::tap_claim("tap-b")).exists());
        assert!(!claims::claims_dir(state.path()).join(claims::vsock_claim(7)).exists(), "the CID is free again");
        hold.release(&net); // idempotent
        assert_eq!(net.calls().len(), 1);
    }
}

//! Host-wide names a task holds while it lives (tap names, the VM working
//! dir). A claim is a symlink `<state_dir>/claims/<name>` → the owner's task
//! dir: creating a symlink is atomic, and a claim whose owner is dead is
//! stale and may be taken over.

use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use crate::proc::ProcessId;
use crate::supervisor::protocol::{self, Pids};

/// A task that has not published pids yet is still starting for this long.
const STARTING_GRACE: Duration = Duration::from_secs(120);

pub fn claims_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("claims")
}

/// Names the plugin starting a task, until the supervisor publishes pids.
pub const STARTING_FILE: &str = "starting.json";

/// Whether the task owning `task_dir` still runs (or is still starting).
pub fn owner_alive(task_dir: &Path) -> bool {
    if let Ok(pids) = protocol::read_json::<Pids>(&task_dir.join(protocol::PIDS_FILE)) {
        return pids.supervisor.iter().chain(pids.vmm.iter()).any(ProcessId::is_alive);
    }
    // Still starting: alive as long as the plugin starting it is.
    if let Ok(plugin) = protocol::read_json::<ProcessId>(&task_dir.join(STARTING_FILE)) {
        return plugin.is_alive();
    }
    std::fs::metadata(task_dir)
        .and_then(|m| m.modified())
        .map(|t| SystemTime::now().duration_since(t).unwrap_or_default() < STARTING_GRACE)
        .unwrap_or(false)
}

/// Marks `task_dir` as being started by this process.
pub fn mark_starting(task_dir: &Path) -> std::io::Result<()> {
    match ProcessId::of(std::process::id() as i32) {
        Some(me) => protocol::write_atomic(task_dir, STARTING_FILE, &me),
        None => Ok(()),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    #[error("{what} is in use by another task ({owner})")]
    InUse { what: String, owner: PathBuf },
    #[error("cannot record the claim on {what}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
}

/// Claims `name` for `task_dir`. Re-claiming our own claim is fine.
pub fn claim(state_dir: &Path, name: &str, what: &str, task_dir: &Path) -> Result<(), ClaimError> {
    let dir = claims_dir(state_dir);
    let io_err = |source| ClaimError::Io { what: what.to_string(), source };
    std::fs::create_dir_all(&dir).map_err(io_err)?;
    let link = dir.join(name);
    for _ in 0..3 {
        match std::os::unix::fs::symlink(task_dir, &link) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                let owner = std::fs::read_link(&link).unwrap_or_default();
                if owner == task_dir {
                    return Ok(());
                }
                if owner_alive(&owner) {
                    return Err(ClaimError::InUse { what: what.to_string(), owner });
                }
                let _ = std::fs::remove_file(&link);
            }
            Err(e) => return Err(io_err(e)),
        }
    }
    Err(ClaimError::InUse { what: what.to_string(), owner: std::fs::read_link(&link).unwrap_or_default() })
}

/// Drops `name` if `task_dir` holds it.
pub fn release(state_dir: &Path, name: &str, task_dir: &Path) {
    let link = claims_dir(state_dir).join(name);
    if std::fs::read_link(&link).map(|o| o == task_dir).unwrap_or(false) {
        let _ = std::fs::remove_file(&link);
    }
}

pub fn tap_claim(name: &str) -> String {
    format!("if-{name}")
}

pub fn workdir_claim(slug: &str) -> String {
    format!("vm-{slug}")
}

/// A kernel vsock CID is the host's to hand out once: a second VM with the
/// same one would fail inside its VMM.
pub fn vsock_claim(cid: u32) -> String {
    format!("vsock-{cid}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_are_exclusive_while_the_owner_lives() {
        let state = tempfile::tempdir().unwrap();
        let a = state.path().join("tasks/a");
        let b = state.path().join("tasks/b");
        std::fs::create_dir_all(&a).unwrap();
        std::fs::create_dir_all(&b).unwrap();
        // `a` publishes our own (live) pid as its supervisor.
        let me = ProcessId::of(std::process::id() as i32).unwrap();
        protocol::write_atomic(&a, protocol::PIDS_FILE, &Pids { supervisor: Some(me), ..Default::default() }).unwrap();
        claim(state.path(), "if-tap0", "tap tap0", &a).unwrap();
        claim(state.path(), "if-tap0", "tap tap0", &a).unwrap();
        let err = claim(state.path(), "if-tap0", "tap tap0", &b).unwrap_err();
        assert!(err.to_string().starts_with("tap tap0 is in use by another task"), "{err}");
        // a task still being started by a dead plugin is stale too
        let c = state.path().join("tasks/c");
        std::fs::create_dir_all(&c).unwrap();
        protocol::write_atomic(&c, STARTING_FILE, &ProcessId { start_time: me.start_time + 1, ..me }).unwrap();
        assert!(!owner_alive(&c));
        mark_starting(&c).unwrap();
        assert!(owner_alive(&c), "started by us, alive");
        // once `a` is dead, `b` takes over the stale claim
        let dead = ProcessId { start_time: me.start_time + 1, ..me };
        protocol::write_atomic(&a, protocol::PIDS_FILE, &Pids { supervisor: Some(dead), ..Default::default() })
            .unwrap();
        claim(state.path(), "if-tap0", "tap tap0", &b).unwrap();
        release(state.path(), "if-tap0", &a); // not a's anymore: no effect
        assert!(claims_dir(state.path()).join("if-tap0").exists());
        release(state.path(), "if-tap0", &b);
        assert!(!claims_dir(state.path()).join("if-tap0").exists());
    }
}

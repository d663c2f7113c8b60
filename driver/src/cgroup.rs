//! The VM's own cgroup (v2), where Nomad expects the task to run.
//!
//! Nomad hands every task a `linux_resources.cpuset_cgroup` path; on
//! cgroup v2 hosts it is the task's own scope,
//! `/sys/fs/cgroup/nomad.slice/share.slice/<alloc>.<task>.scope`. Nomad makes
//! the slices but leaves the scope to the driver (its executor and docker
//! make their own). The plugin creates it with the task's memory limit; the
//! supervisor starts virtiofsd and the VMM in it (each child joins between
//! fork and exec) and removes it once they are gone. That:
//! - enforces `resources.memory` (`memory_max` when set) as Nomad's own
//!   drivers do;
//! - tells an OOM kill apart from any other SIGKILL (`memory.events`);
//! - takes the VM out of `nomad.service`'s cgroup, so whatever systemd does
//!   to the agent's unit does not reach its VMs.
//!
//! The supervisor itself stays outside: a cgroup cannot be removed by a
//! process inside it.
//!
//! On cgroup v1 hosts Nomad hands over one cpuset partition shared by every
//! task; there is nothing of the task's own to use, and the VM stays where
//! the supervisor was started.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("cannot create the task's cgroup {}", path.display())]
    Create {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot set {file} of the task's cgroup {}", path.display())]
    Limit {
        path: PathBuf,
        file: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("cannot move into the task's cgroup {}", path.display())]
    Join {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Whether `dir` is on a cgroup2 file system.
fn on_cgroup2(dir: &Path) -> bool {
    nix::sys::statfs::statfs(dir).map(|s| s.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC).unwrap_or(false)
}

/// The task's own cgroup from Nomad's `cpuset_cgroup`, when it is one: an
/// absolute path whose parent is a cgroup2 directory (on v1 hosts Nomad's
/// path is a shared cpuset partition, never a `.scope`).
pub fn task_cgroup(cpuset_cgroup: &str) -> Option<PathBuf> {
    let path = Path::new(cpuset_cgroup);
    let leaf = path.file_name()?.to_str()?;
    if !path.is_absolute() || !leaf.ends_with(".scope") {
        return None;
    }
    on_cgroup2(path.parent()?).then(|| path.to_path_buf())
}

/// Creates the cgroup (a restart of the task finds it there) and sets its
/// memory limit where the memory controller is enabled for it.
pub fn create(path: &Path, memory_max_bytes: Option<u64>) -> Result<(), CgroupError> {
    match std::fs::create_dir(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(source) => return Err(CgroupError::Create { path: path.to_path_buf(), source }),
    }
    if let Some(limit) = memory_max_bytes.filter(|l| *l > 0) {
        let file = path.join("memory.max");
        if file.exists() {
            std::fs::write(&file, limit.to_string()).map_err(|source| CgroupError::Limit {
                path: path.to_path_buf(),
                file: "memory.max",
                source,
            })?;
        }
    }
    Ok(())
}

/// Where children are started: the cgroup's `cgroup.procs`, opened before
/// fork, to which each child writes "0" (itself) between fork and exec.
#[derive(Debug, Clone)]
pub struct Placement(Arc<OwnedFd>);

impl Placement {
    pub fn open(path: &Path) -> Result<Placement, CgroupError> {
        let procs = std::fs::OpenOptions::new()
            .write(true)
            .open(path.join("cgroup.procs"))
            .map_err(|source| CgroupError::Join { path: path.to_path_buf(), source })?;
        Ok(Placement(Arc::new(OwnedFd::from(procs))))
    }

    /// Makes `cmd`'s child join the cgroup. Call it before anything that
    /// drops privileges in the child: joining needs the parent's rights.
    pub fn apply(&self, cmd: &mut tokio::process::Command) {
        let fd = self.0.clone();
        // SAFETY: the closure only calls write(2) on a descriptor that stays
        // open (the Arc lives in the closure) with a static buffer: it is
        // async-signal-safe and allocates nothing.
        unsafe {
            cmd.pre_exec(move || {
                if libc::write(fd.as_raw_fd(), b"0".as_ptr().cast(), 1) == 1 {
                    Ok(())
                } else {
                    Err(io::Error::last_os_error())
                }
            });
        }
    }
}

/// How many processes of the cgroup the OOM killer has killed so far.
pub fn oom_kills(path: &Path) -> u64 {
    let text = std::fs::read_to_string(path.join("memory.events")).unwrap_or_default();
    text.lines().find_map(|l| l.strip_prefix("oom_kill ")).and_then(|n| n.trim().parse().ok()).unwrap_or(0)
}

/// Removes the cgroup once it is empty, waiting up to `patience` for
/// processes that were just killed to leave. A cgroup that stays populated
/// (the next start of the same task already runs in it) is left to that task.
pub fn remove(path: &Path, patience: Duration) {
    let deadline = Instant::now() + patience;
    loop {
        match std::fs::remove_dir(path) {
            Ok(()) => return,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return,
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => {
                tracing::debug!(cgroup = %path.display(), error = %e, "task cgroup not removed");
                return;
            }
        }
    }
}

/// What the host offers, for the fingerprint: "v2", "v1" or "none".
pub fn host_version() -> &'static str {
    if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        "v2"
    } else if Path::new("/sys/fs/cgroup/memory").is_dir() {
        "v1"
    } else {
        "none"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_scope_on_cgroup2_is_the_tasks_own() {
        assert_eq!(task_cgroup(""), None);
        assert_eq!(task_cgroup("nomad.slice/share.slice/a.vm.scope"), None, "relative");
        // Nomad's v1 path: the shared cpuset partition.
        assert_eq!(task_cgroup("/sys/fs/cgroup/cpuset/nomad/share"), None);
        // A scope name, but not on cgroupfs.
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(task_cgroup(&dir.path().join("a.vm.scope").display().to_string()), None);
    }

    #[test]
    fn limit_join_and_oom_count_on_a_cgroup_dir() {
        // A stand-in for cgroupfs: the files the kernel would provide.
        let dir = tempfile::tempdir().unwrap();
        let cg = dir.path().join("a.vm.scope");
        std::fs::create_dir(&cg).unwrap();
        for f in ["memory.max", "cgroup.procs"] {
            std::fs::write(cg.join(f), "").unwrap();
        }
        create(&cg, Some(600 << 20)).unwrap();
        create(&cg, Some(600 << 20)).expect("a restart finds it there");
        assert_eq!(std::fs::read_to_string(cg.join("memory.max")).unwrap(), (600u64 << 20).to_string());
        Placement::open(&cg).unwrap();
        assert_eq!(oom_kills(&cg), 0, "no memory.events: no memory controller");
        std::fs::write(cg.join("memory.events"), "low 0\nhigh 0\nmax 4\noom 1\noom_kill 1\noom_group_kill 0\n")
            .unwrap();
        assert_eq!(oom_kills(&cg), 1);
        // Without the memory controller there is no memory.max to write.
        let bare = dir.path().join("b.vm.scope");
        create(&bare, Some(1 << 30)).unwrap();
        assert!(!bare.join("memory.max").exists());
        let missing_parent = dir.path().join("nope/c.vm.scope");
        let err = create(&missing_parent, None).unwrap_err();
        assert!(err.to_string().contains("nope/c.vm.scope"), "{err}");
    }
}

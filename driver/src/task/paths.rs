//! Where a task's files live.
//!
//! - task dir `<state_dir>/tasks/<alloc8>-<id8>`: one per Nomad task ID (a
//!   restart gets a new one): launch spec, control socket, exit record,
//!   events, supervisor and virtiofsd logs. Removed by DestroyTask.
//! - work dir `<state_dir>/vms/<job>-<task>-<hash>`: the VM's cwd, like
//!   microvm.nix's `/var/lib/microvms/<name>`; keyed by namespace, job, group,
//!   task and alloc index, so volume images survive restarts and new job
//!   versions on the same node. Sockets go, images stay.

use std::path::{Path, PathBuf};

use microvm_proto::drivers::TaskConfig as ProtoTaskConfig;

/// sun_path holds 108 bytes including the terminating NUL.
pub const MAX_SOCKET_PATH: usize = 107;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskPaths {
    pub task_dir: PathBuf,
    pub work_dir: PathBuf,
    /// The work dir's name; also names the GC root.
    pub slug: String,
}

/// FNV-1a: stable across releases (std's hasher is not), enough to keep
/// names short and distinct.
fn fnv(text: &str) -> u64 {
    text.bytes().fold(0xcbf29ce484222325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100000001b3))
}

/// Keeps `[A-Za-z0-9_-]`, maps the rest to '-', and truncates.
pub fn sanitize(text: &str, max: usize) -> String {
    let s: String = text
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '_' || c == '-' { c } else { '-' })
        .take(max)
        .collect();
    if s.is_empty() { "x".to_string() } else { s }
}

impl TaskPaths {
    pub fn new(state_dir: &Path, task: &ProtoTaskConfig) -> TaskPaths {
        // Task IDs look like "<alloc id>/<task name>/<8 hex>".
        let suffix = task.id.rsplit('/').next().filter(|s| !s.is_empty() && s.len() <= 16);
        let id_part = match suffix {
            Some(s) if s != task.id => sanitize(s, 16),
            _ => format!("{:016x}", fnv(&task.id)),
        };
        let alloc8 = sanitize(&task.alloc_id.chars().take(8).collect::<String>(), 8);
        let task_dir = state_dir.join("tasks").join(format!("{alloc8}-{id_part}"));

        let index = task.env.get("NOMAD_ALLOC_INDEX").cloned().unwrap_or_else(|| task.alloc_id.clone());
        let identity = format!("{}/{}/{}/{}/{}", task.namespace, task.job_id, task.task_group_name, task.name, index);
        let job = if task.job_id.is_empty() { &task.job_name } else { &task.job_id };
        let slug = format!("{}-{}-{:08x}", sanitize(job, 16), sanitize(&task.name, 16), fnv(&identity) as u32);
        let work_dir = state_dir.join("vms").join(&slug);
        TaskPaths { task_dir, work_dir, slug }
    }
}

/// A socket path as the VMM will see it: relative paths are inside `work_dir`.
pub fn in_work_dir(work_dir: &Path, path: &Path) -> PathBuf {
    if path.is_absolute() { path.to_path_buf() } else { work_dir.join(path) }
}

/// `Err(len)` when `path` does not fit in sun_path.
pub fn check_socket_len(path: &Path) -> Result<(), usize> {
    let len = path.as_os_str().len();
    if len <= MAX_SOCKET_PATH { Ok(()) } else { Err(len) }
}

/// Lexical normalisation: drops `.`, resolves `..` against what precedes it.
pub fn normalize(path: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other.as_os_str()),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(id: &str) -> ProtoTaskConfig {
        ProtoTaskConfig {
            id: id.to_string(),
            name: "vm".into(),
            alloc_id: "0123abcd-4567-89ef-0123-456789abcdef".into(),
            job_id: "web".into(),
            task_group_name: "g".into(),
            namespace: "default".into(),
            env: [("NOMAD_ALLOC_INDEX".to_string(), "0".to_string())].into(),
            ..Default::default()
        }
    }

    #[test]
    fn task_dir_is_per_task_id_and_work_dir_per_alloc_index() {
        let a = TaskPaths::new(Path::new("/var/lib/nm"), &task("0123abcd-4567/vm/1a2b3c4d"));
        assert_eq!(a.task_dir, PathBuf::from("/var/lib/nm/tasks/0123abcd-1a2b3c4d"));
        assert!(a.work_dir.to_str().unwrap().starts_with("/var/lib/nm/vms/web-vm-"), "{}", a.work_dir.display());
        // a restart: new task id, same VM working dir
        let b = TaskPaths::new(Path::new("/var/lib/nm"), &task("0123abcd-4567/vm/99999999"));
        assert_ne!(a.task_dir, b.task_dir);
        assert_eq!(a.work_dir, b.work_dir);
        // another alloc index: another VM
        let mut t = task("x/vm/1");
        t.env.insert("NOMAD_ALLOC_INDEX".into(), "1".into());
        assert_ne!(TaskPaths::new(Path::new("/var/lib/nm"), &t).work_dir, a.work_dir);
    }

    #[test]
    fn odd_names_are_sanitized() {
        let mut t = task("weird id without slashes");
        t.job_id = "my job/with spaces and a very long name".into();
        let p = TaskPaths::new(Path::new("/s"), &t);
        let name = p.work_dir.file_name().unwrap().to_str().unwrap().to_string();
        assert!(name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'), "{name}");
        assert!(name.len() <= 16 + 1 + 16 + 1 + 8);
        let tname = p.task_dir.file_name().unwrap().to_str().unwrap().to_string();
        assert!(!tname.contains(' '), "{tname}");
    }

    #[test]
    fn socket_lengths() {
        assert!(check_socket_len(Path::new("/run/x.sock")).is_ok());
        let long = PathBuf::from(format!("/{}", "a".repeat(107)));
        assert_eq!(check_socket_len(&long), Err(108));
        assert_eq!(in_work_dir(Path::new("/w"), Path::new("h.sock")), PathBuf::from("/w/h.sock"));
        assert_eq!(in_work_dir(Path::new("/w"), Path::new("/abs.sock")), PathBuf::from("/abs.sock"));
    }

    #[test]
    fn normalize_resolves_dots() {
        assert_eq!(normalize(Path::new("/w/./a/../b")), PathBuf::from("/w/b"));
        assert_eq!(normalize(Path::new("/w/../../etc")), PathBuf::from("/etc"));
    }
}

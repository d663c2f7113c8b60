//! Confining nix while it evaluates and builds a pushed flake, with
//! Landlock (Linux ≥ 5.13): nix and every process it starts may open files
//! only under the system directories, the Nix store and this push's own
//! scratch dir — not the Nomad token, not the repos, not other pushes.
//!
//! `restrict-eval` keeps the evaluator inside the flake and the store, but
//! not everything nix does is the evaluator's: `builtins.getFlake` of a
//! locked local ref (`path:/run/keys/token?narHash=…`,
//! `git+file:///…/bob/fleet.git?rev=…`) is fetched without any check (nix
//! 2.8 copies the path first and compares the hash after, printing it), and
//! a builder outside the Nix sandbox reads what it likes. Under Landlock the
//! kernel refuses those opens, whatever nix checks or does not.
//!
//! The ruleset is built in the parent; the child only turns on
//! `no_new_privs` and enters it between fork and exec (two system calls,
//! safe after fork).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Where confined nix may read (and execute): the system, as nix, git, tar
/// and the shell need it (programs, libraries, `/etc/nix`, TLS roots, DNS
/// config), and process information. On NixOS `/etc/resolv.conf` is often a
/// link into `/run/systemd/resolve`, and name lookups go through nscd.
pub const READ_ONLY: &[&str] = &[
    "/etc",
    "/usr",
    "/bin",
    "/sbin",
    "/lib",
    "/lib32",
    "/lib64",
    "/libx32",
    "/proc",
    "/sys",
    "/run/systemd/resolve",
    "/run/nscd",
];

/// Where it may also write: the store (writes there are the daemon's or
/// root's anyway) and devices (`/dev/null`, `/dev/shm`).
pub const READ_WRITE: &[&str] = &["/nix", "/dev"];

// include/uapi/linux/landlock.h
const CREATE_RULESET_VERSION: u32 = 1;
const RULE_PATH_BENEATH: u32 = 1;
const ACCESS_EXECUTE: u64 = 1 << 0;
const ACCESS_WRITE_FILE: u64 = 1 << 1;
const ACCESS_READ_FILE: u64 = 1 << 2;
const ACCESS_READ_DIR: u64 = 1 << 3;
/// Every right of the first ABI: execute, write, read, read dir, remove
/// dir/file, make char/dir/reg/sock/fifo/block/sym.
const ACCESS_ABI1: u64 = (1 << 13) - 1;
/// Linking or renaming into another directory (ABI 2): unless handled (and
/// then granted where nix writes), the kernel refuses it everywhere.
const ACCESS_REFER: u64 = 1 << 13;
const ACCESS_TRUNCATE: u64 = 1 << 14;
const READ: u64 = ACCESS_EXECUTE | ACCESS_READ_FILE | ACCESS_READ_DIR;
/// The rights a rule on a file (not a directory) may carry.
const FILE_RIGHTS: u64 = ACCESS_EXECUTE | ACCESS_WRITE_FILE | ACCESS_READ_FILE | ACCESS_TRUNCATE;

#[repr(C)]
struct RulesetAttr {
    handled_access_fs: u64,
}

#[repr(C, packed)]
struct PathBeneathAttr {
    allowed_access: u64,
    parent_fd: i32,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfineError {
    #[error(
        "this kernel does not offer Landlock (Linux ≥ 5.13 with landlock in lsm=), which confines nix while it \
         evaluates pushed flakes; build.confinement = \"none\" builds them unconfined"
    )]
    Unavailable(#[source] std::io::Error),
    #[error("cannot create a Landlock ruleset")]
    Ruleset(#[source] std::io::Error),
    #[error("cannot add a Landlock rule for {}", path.display())]
    Rule {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A Landlock ruleset for nix commands, ready to be entered by children.
pub struct Confinement {
    ruleset: OwnedFd,
}

/// The Landlock ABI version the kernel offers.
pub fn abi() -> Result<u32, std::io::Error> {
    // SAFETY: with a null attribute and size 0, this only asks for the
    // ABI version; no memory is passed.
    let v = unsafe {
        libc::syscall(libc::SYS_landlock_create_ruleset, std::ptr::null::<RulesetAttr>(), 0, CREATE_RULESET_VERSION)
    };
    if v < 0 { Err(std::io::Error::last_os_error()) } else { Ok(v as u32) }
}

impl Confinement {
    /// Read access to [`READ_ONLY`], read-write access to [`READ_WRITE`]
    /// and to each of `writable` (directories that need not exist yet are
    /// skipped, like missing system dirs).
    pub fn new(writable: &[&Path]) -> Result<Confinement, ConfineError> {
        let abi = abi().map_err(ConfineError::Unavailable)?;
        let mut handled = ACCESS_ABI1;
        if abi >= 2 {
            handled |= ACCESS_REFER;
        }
        if abi >= 3 {
            handled |= ACCESS_TRUNCATE;
        }
        let attr = RulesetAttr { handled_access_fs: handled };
        // SAFETY: `attr` is a valid landlock_ruleset_attr prefix of the size
        // passed (the kernel takes shorter structs of older ABIs).
        let fd = unsafe {
            libc::syscall(
                libc::SYS_landlock_create_ruleset,
                &attr as *const RulesetAttr,
                std::mem::size_of::<RulesetAttr>(),
                0u32,
            )
        };
        if fd < 0 {
            return Err(ConfineError::Ruleset(std::io::Error::last_os_error()));
        }
        // SAFETY: the kernel just returned this new file descriptor; we own it.
        let ruleset = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        let c = Confinement { ruleset };
        for p in READ_ONLY {
            c.allow(Path::new(p), READ & handled)?;
        }
        for p in READ_WRITE.iter().map(Path::new).chain(writable.iter().copied()) {
            c.allow(p, handled)?;
        }
        Ok(c)
    }

    fn allow(&self, path: &Path, access: u64) -> Result<(), ConfineError> {
        let rule_err = |source| ConfineError::Rule { path: path.to_path_buf(), source };
        // O_PATH opens nothing for reading; what it names is what the rule covers.
        let fd = match rustix::fs::open(
            path,
            rustix::fs::OFlags::PATH | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        ) {
            Ok(fd) => fd,
            Err(rustix::io::Errno::NOENT) => return Ok(()),
            Err(e) => return Err(rule_err(e.into())),
        };
        let is_dir =
            rustix::fs::fstat(&fd).map(|st| rustix::fs::FileType::from_raw_mode(st.st_mode).is_dir()).unwrap_or(false);
        let attr = PathBeneathAttr {
            allowed_access: if is_dir { access } else { access & FILE_RIGHTS },
            parent_fd: fd.as_raw_fd(),
        };
        // SAFETY: both fds are open, `attr` is a packed
        // landlock_path_beneath_attr as the kernel expects.
        let r = unsafe {
            libc::syscall(
                libc::SYS_landlock_add_rule,
                self.ruleset.as_raw_fd(),
                RULE_PATH_BENEATH,
                &attr as *const PathBeneathAttr,
                0u32,
            )
        };
        if r < 0 { Err(rule_err(std::io::Error::last_os_error())) } else { Ok(()) }
    }

    /// Makes `cmd`'s process enter the ruleset before it execs.
    pub fn apply(&self, cmd: &mut Command) {
        use std::os::unix::process::CommandExt;
        let fd = self.ruleset.as_raw_fd();
        // SAFETY: the closure runs between fork and exec and only makes two
        // system calls (no allocation, no locks); `fd` stays open in the
        // parent (this value lives until the command is spawned), so the
        // child's copy is valid.
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::syscall(libc::SYS_landlock_restrict_self, fd, 0u32) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
}

/// The first of [`READ_ONLY`] and [`READ_WRITE`] that `path` is in (for
/// refusing a config that keeps a secret where confined nix may read).
pub fn readable_root(path: &Path) -> Option<&'static str> {
    READ_ONLY.iter().chain(READ_WRITE).copied().find(|root| path.starts_with(root))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(confinement: &Confinement, script: &str) -> std::process::Output {
        let mut cmd = Command::new("/bin/sh");
        cmd.args(["-c", script]);
        confinement.apply(&mut cmd);
        cmd.output().unwrap()
    }

    #[test]
    fn confined_children_read_the_system_and_their_dir_only() {
        if abi().is_err() {
            eprintln!("no Landlock here: skipped");
            return;
        }
        // Outside every allowed root (not /tmp: the scratch dir of a push is
        // under state_dir, and that is what this stands for).
        let base = tempfile::Builder::new().prefix("gitfront-confine").tempdir_in("/var/tmp").unwrap();
        assert!(readable_root(base.path()).is_none());
        let secret = base.path().join("secret");
        std::fs::write(&secret, "s3cret").unwrap();
        let mine = base.path().join("mine");
        std::fs::create_dir(&mine).unwrap();
        let c = Confinement::new(&[&mine]).unwrap();

        let out = sh(&c, &format!("cat {}", secret.display()));
        assert!(!out.status.success(), "read the secret: {:?}", String::from_utf8_lossy(&out.stdout));
        assert!(String::from_utf8_lossy(&out.stderr).contains("Permission denied"), "{out:?}");
        // A symlink in its own dir does not help.
        std::os::unix::fs::symlink(&secret, mine.join("link")).unwrap();
        assert!(!sh(&c, &format!("cat {}/link", mine.display())).status.success());
        // Its own dir: read, write, rename (nix renames into place).
        let out = sh(&c, &format!("cd {} && echo hi > a && mkdir d && mv a d/b && cat d/b", mine.display()));
        assert_eq!(String::from_utf8_lossy(&out.stdout), "hi\n", "{out:?}");
        // The system and the store.
        assert!(sh(&c, "cat /etc/passwd >/dev/null && ls /usr/bin >/dev/null").status.success());
        // Unconfined, the same command reads the secret (the test can fail).
        assert!(Command::new("cat").arg(&secret).output().unwrap().status.success());
    }

    #[test]
    fn readable_roots() {
        assert_eq!(readable_root(Path::new("/etc/nomad/token")), Some("/etc"));
        assert_eq!(readable_root(Path::new("/nix/var/x")), Some("/nix"));
        assert_eq!(readable_root(Path::new("/run/keys/token")), None);
        assert_eq!(readable_root(Path::new("/var/lib/gitfront/repos")), None);
        assert_eq!(readable_root(Path::new("/etcetera")), None);
    }
}

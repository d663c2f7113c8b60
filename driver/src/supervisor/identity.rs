//! Running a child as the VMM user with microvm.nix's limits, set between
//! fork and exec.

use std::io;

/// microvm.nix's `LimitNOFILE` (capped by the kernel's fs.nr_open).
pub const VMM_NOFILE: u64 = 1_048_576;

/// Who a child runs as, and its limits; computed before fork because the
/// pre-exec hook may not allocate.
#[derive(Debug, Clone)]
pub struct ChildIdentity {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<libc::gid_t>,
    pub nofile: u64,
}

impl ChildIdentity {
    pub fn new(uid: u32, gid: u32, groups: &[u32]) -> ChildIdentity {
        let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or(VMM_NOFILE);
        let mut groups: Vec<libc::gid_t> = groups.to_vec();
        if !groups.contains(&gid) {
            groups.push(gid);
        }
        ChildIdentity { uid, gid, groups, nofile: VMM_NOFILE.min(nr_open) }
    }

    /// Installs the identity switch and limits on `cmd` (runs in the child
    /// after fork: only async-signal-safe calls, no allocation).
    pub fn apply(&self, cmd: &mut tokio::process::Command) {
        let me = self.clone();
        // SAFETY: the closure only calls open/read/write/close, setrlimit,
        // setgroups, setgid and setuid (async-signal-safe) on data captured
        // before fork; it allocates nothing.
        unsafe {
            cmd.pre_exec(move || me.switch());
        }
    }

    fn switch(&self) -> io::Result<()> {
        let check = |r: libc::c_int| if r == 0 { Ok(()) } else { Err(io::Error::last_os_error()) };
        unprotect_from_oom_killer();
        raise_limit(libc::RLIMIT_NOFILE, self.nofile);
        raise_limit(libc::RLIMIT_MEMLOCK, libc::RLIM_INFINITY);
        // SAFETY: plain syscalls on stack values; see `apply`.
        unsafe {
            if libc::geteuid() == 0 && self.uid != 0 {
                check(libc::setgroups(self.groups.len(), self.groups.as_ptr()))?;
                check(libc::setgid(self.gid))?;
                check(libc::setuid(self.uid))?;
            }
        }
        Ok(())
    }
}

/// Resets an inherited negative `oom_score_adj` to 0. Nomad's unit runs the
/// agent with -1000 (never OOM-killed), and its children inherit that: a VM
/// whose guest grows would then make the kernel kill everything else first.
/// Async-signal-safe: open/read/write/close on a static path and a stack buffer.
fn unprotect_from_oom_killer() {
    const PATH: &std::ffi::CStr = c"/proc/self/oom_score_adj";
    // SAFETY: plain syscalls on a static NUL-terminated path and a stack buffer.
    unsafe {
        let fd = libc::open(PATH.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC);
        if fd < 0 {
            return;
        }
        let mut current = [0u8; 1];
        if libc::read(fd, current.as_mut_ptr().cast(), 1) == 1 && current[0] == b'-' {
            libc::write(fd, b"0".as_ptr().cast(), 1);
        }
        libc::close(fd);
    }
}

/// Raises a limit to `want`; where the hard limit cannot be raised (no
/// CAP_SYS_RESOURCE, e.g. in a container) the soft limit goes up to the hard
/// one instead. Async-signal-safe.
fn raise_limit(resource: libc::__rlimit_resource_t, want: libc::rlim_t) {
    let target = libc::rlimit { rlim_cur: want, rlim_max: want };
    // SAFETY: setrlimit/getrlimit on stack values.
    unsafe {
        if libc::setrlimit(resource, &target) != 0 {
            let mut current = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
            if libc::getrlimit(resource, &mut current) == 0 {
                current.rlim_cur = current.rlim_max;
                libc::setrlimit(resource, &current);
            }
        }
    }
}

/// The `--rlimit-nofile` a root virtiofsd can actually get here: microvm.nix's
/// 1048576, or our hard limit when we cannot raise it.
pub fn virtiofsd_nofile() -> u64 {
    let mut current = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes into the struct we own.
    let hard =
        if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut current) } == 0 { current.rlim_max } else { VMM_NOFILE };
    let can_raise = nix::unistd::geteuid().is_root() && has_sys_resource();
    if can_raise { VMM_NOFILE } else { VMM_NOFILE.min(hard) }
}

/// Whether CAP_SYS_RESOURCE is in our effective set (bit 24 of CapEff).
fn has_sys_resource() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("CapEff:"))?;
            u64::from_str_radix(line.split_whitespace().nth(1)?, 16).ok()
        })
        .map(|caps| caps & (1 << 24) != 0)
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The oom_score_adj a child started with `identity` reports, while
    /// this process has `ours` (restored after).
    async fn child_adj(ours: &str, identity: Option<&ChildIdentity>) -> std::io::Result<String> {
        let before = std::fs::read_to_string("/proc/self/oom_score_adj")?;
        std::fs::write("/proc/self/oom_score_adj", ours)?;
        let mut cmd = tokio::process::Command::new("cat");
        cmd.arg("/proc/self/oom_score_adj");
        if let Some(id) = identity {
            id.apply(&mut cmd);
        }
        let out = cmd.output().await;
        // Back to where it was: lowering needs no privilege down to that value.
        let _ = std::fs::write("/proc/self/oom_score_adj", before.trim());
        Ok(String::from_utf8_lossy(&out?.stdout).trim().to_string())
    }

    #[tokio::test]
    async fn the_vmm_does_not_inherit_protection_from_the_oom_killer() {
        let me = ChildIdentity::new(nix::unistd::getuid().as_raw(), nix::unistd::getgid().as_raw(), &[]);
        // A positive value (anyone may raise theirs) is the operator's: kept.
        assert_eq!(child_adj("300", Some(&me)).await.unwrap(), "300");
        // A negative one (Nomad's unit: -1000) is reset. Setting one needs
        // CAP_SYS_RESOURCE, which the development machines do not give.
        match child_adj("-900", None).await {
            Ok(inherited) => {
                assert_eq!(inherited, "-900", "children inherit it");
                assert_eq!(child_adj("-900", Some(&me)).await.unwrap(), "0", "the VMM's is reset");
            }
            Err(e) => eprintln!("negative oom_score_adj not settable here ({e}): only the positive case ran"),
        }
    }
}

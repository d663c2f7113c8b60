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
        // SAFETY: the closure only calls setrlimit/setgroups/setgid/setuid
        // (async-signal-safe) on data captured before fork; it allocates nothing.
        unsafe {
            cmd.pre_exec(move || me.switch());
        }
    }

    fn switch(&self) -> io::Result<()> {
        let check = |r: libc::c_int| if r == 0 { Ok(()) } else { Err(io::Error::last_os_error()) };
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

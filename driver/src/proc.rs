//! Processes we did not necessarily start: identified by pid plus start time
//! (pids are reused), watched through pidfds, measured through /proc.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::unix::AsyncFd;

/// A process identity that survives pid reuse: the pid and its start time in
/// clock ticks since boot (field 22 of /proc/<pid>/stat).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessId {
    pub pid: i32,
    pub start_time: u64,
}

/// The fields of /proc/<pid>/stat we use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat {
    pub state: char,
    pub utime_ticks: u64,
    pub stime_ticks: u64,
    pub start_time: u64,
    pub rss_pages: u64,
}

/// Parses /proc/<pid>/stat. The command name (field 2) may contain spaces
/// and parentheses, so fields are counted from the last ')'.
pub fn parse_stat(text: &str) -> Option<Stat> {
    let after = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = after.split_whitespace().collect();
    // after ')' field 3 (state) is f[0]; field N is f[N-3]
    let field = |n: usize| f.get(n - 3).and_then(|s| s.parse::<u64>().ok());
    Some(Stat {
        state: f.first()?.chars().next()?,
        utime_ticks: field(14)?,
        stime_ticks: field(15)?,
        start_time: field(22)?,
        rss_pages: field(24)?,
    })
}

pub fn stat(pid: i32) -> Option<Stat> {
    parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

impl ProcessId {
    /// The identity of a live process, `None` if it is gone.
    pub fn of(pid: i32) -> Option<ProcessId> {
        stat(pid).map(|s| ProcessId { pid, start_time: s.start_time })
    }

    /// Whether this very process still runs (zombies count as gone).
    pub fn is_alive(&self) -> bool {
        matches!(stat(self.pid), Some(s) if s.start_time == self.start_time && s.state != 'Z' && s.state != 'X')
    }

    /// Sends `signal` to the process if it is still this process.
    pub fn signal(&self, signal: nix::sys::signal::Signal) -> bool {
        self.is_alive() && nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid), signal).is_ok()
    }

    /// Sends `signal` to the process group this process leads.
    pub fn signal_group(&self, signal: nix::sys::signal::Signal) -> bool {
        self.is_alive() && nix::sys::signal::killpg(nix::unistd::Pid::from_raw(self.pid), signal).is_ok()
    }

    /// SIGKILL to this process and to the group it leads: the last resort
    /// of a stop (a supervisor leads no group, a VMM leads its helpers').
    pub fn kill_with_group(&self) {
        self.signal_group(nix::sys::signal::Signal::SIGKILL);
        self.signal(nix::sys::signal::Signal::SIGKILL);
    }

    /// A pidfd for this process, checked against the start time after opening
    /// (so a reused pid is never watched by mistake).
    pub fn pidfd(&self) -> io::Result<OwnedFd> {
        let pid = rustix::process::Pid::from_raw(self.pid).ok_or_else(|| io::Error::from_raw_os_error(libc::ESRCH))?;
        let fd = rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty())?;
        if !self.is_alive() {
            return Err(io::Error::from_raw_os_error(libc::ESRCH));
        }
        Ok(fd)
    }

    /// Resolves when the process exits (at once if it already has).
    pub async fn exited(&self) {
        // No pidfd means the process is already gone.
        let Ok(fd) = self.pidfd() else { return };
        // SAFETY: `PidFd` owns the descriptor, which stays open for as long
        // as the AsyncFd that owns it exists.
        match unsafe { AsyncFd::register_with_interest(PidFd(fd), tokio::io::Interest::READABLE) } {
            // A pidfd becomes readable when the process exits.
            Ok(afd) => {
                let _ = afd.readable().await;
            }
            Err(_) => self.poll_exit().await,
        }
    }

    /// The live children of this process (of any of its threads), from
    /// /proc/<pid>/task/<tid>/children.
    pub fn children(&self) -> Vec<ProcessId> {
        if !self.is_alive() {
            return Vec::new();
        }
        let Ok(threads) = std::fs::read_dir(format!("/proc/{}/task", self.pid)) else { return Vec::new() };
        let mut kids: Vec<ProcessId> = threads
            .flatten()
            .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
            .flat_map(|text| text.split_whitespace().filter_map(|p| p.parse::<i32>().ok()).collect::<Vec<_>>())
            .filter_map(ProcessId::of)
            .collect();
        kids.sort_by_key(|k| k.pid);
        kids.dedup();
        kids
    }

    async fn poll_exit(&self) {
        while self.is_alive() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

struct PidFd(OwnedFd);

impl AsRawFd for PidFd {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0.as_raw_fd()
    }
}

/// Clock ticks per second (USER_HZ) for converting /proc times.
pub fn ticks_per_second() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as u64 } else { 100 }
}

pub fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 { p as u64 } else { 4096 }
}

/// The current process group's leader-based kill, for a group we created.
pub fn kill_group(pgid: i32, signal: nix::sys::signal::Signal) {
    let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pgid), signal);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_odd_names() {
        let line = "1234 (qemu (x) y) S 1 1234 1234 0 -1 4194560 100 0 0 0 17 5 0 0 20 0 3 0 98765 1000000 321 18446744073709551615";
        let s = parse_stat(line).unwrap();
        assert_eq!(s.state, 'S');
        assert_eq!(s.utime_ticks, 17);
        assert_eq!(s.stime_ticks, 5);
        assert_eq!(s.start_time, 98765);
        assert_eq!(s.rss_pages, 321);
        assert!(parse_stat("garbage").is_none());
    }

    #[test]
    fn own_process_is_alive_and_identified() {
        let me = ProcessId::of(std::process::id() as i32).unwrap();
        assert!(me.is_alive());
        let other = ProcessId { start_time: me.start_time + 1, ..me };
        assert!(!other.is_alive(), "a different start time is a different process");
    }

    #[test]
    fn children_are_listed() {
        let mut child = std::process::Command::new("sleep").arg("5").spawn().unwrap();
        let me = ProcessId::of(std::process::id() as i32).unwrap();
        let kid = ProcessId::of(child.id() as i32).unwrap();
        assert!(me.children().contains(&kid));
        assert!(kid.children().is_empty());
        let _ = child.kill();
        let _ = child.wait();
        assert!(!me.children().contains(&kid));
    }

    #[tokio::test]
    async fn exited_resolves_when_a_child_exits() {
        let mut child = std::process::Command::new("sleep").arg("0.2").spawn().unwrap();
        let id = ProcessId::of(child.id() as i32).unwrap();
        let waiter = tokio::spawn(async move { id.exited().await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished());
        let _ = tokio::task::spawn_blocking(move || child.wait()).await;
        tokio::time::timeout(Duration::from_secs(5), waiter).await.unwrap().unwrap();
        assert!(!id.is_alive());
    }
}

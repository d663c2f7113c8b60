//! What the plugin and a task's supervisor share: the launch spec the plugin
//! writes, the files the supervisor keeps in the task dir, and the control
//! socket's JSON-lines requests.
//!
//! The task dir is the supervisor's whole memory; a plugin that restarts
//! finds everything there (and its path in the task handle's driver_state).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::proc::ProcessId;

pub const SPEC_FILE: &str = "spec.json";
pub const EXIT_FILE: &str = "exit.json";
pub const PIDS_FILE: &str = "pids.json";
pub const EVENTS_FILE: &str = "events.jsonl";
pub const CONTROL_SOCKET: &str = "control.sock";
pub const LOG_FILE: &str = "supervisor.log";
/// Written by the plugin once StartTask hands the handle to Nomad. A
/// supervisor whose plugin dies before that removes its VM: nobody else
/// knows about it.
pub const COMMITTED_FILE: &str = "committed";
/// Touched by the plugin every few seconds while a Nomad agent is connected
/// to it (see `stop_without_agent_after`).
pub const LEASE_FILE: &str = "agent-lease";

/// One virtiofsd to run before the VMM (argv[0] is the binary).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VirtiofsdLaunch {
    pub tag: String,
    pub argv: Vec<String>,
    /// Absolute socket path; the VMM starts only once it exists.
    pub socket: PathBuf,
    /// Created (like microvm.nix's tmpfiles rule) if missing.
    pub source: PathBuf,
}

/// Everything the supervisor needs to boot the VM once.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LaunchSpec {
    pub task_id: String,
    pub task_dir: PathBuf,
    /// The VM's working directory (cwd of the VMM and virtiofsd).
    pub work_dir: PathBuf,
    /// The booted runner (`booted` points here).
    pub runner: PathBuf,
    pub hostname: String,
    pub vmm_uid: u32,
    pub vmm_gid: u32,
    pub vmm_groups: Vec<u32>,
    /// Nomad's log FIFOs (or /dev/null when logs are disabled).
    pub stdout_path: PathBuf,
    pub stderr_path: PathBuf,
    pub virtiofsd: Vec<VirtiofsdLaunch>,
    /// The VMM's whole environment.
    pub env: Vec<(String, String)>,
    /// Used for stops the supervisor starts itself (a virtiofsd died).
    #[serde(with = "millis")]
    pub default_stop_timeout: Duration,
    /// `bin/microvm-shutdown` of the booted runner, if it has one.
    pub shutdown_script: Option<PathBuf>,
    /// What to release if the start is never confirmed.
    pub hold: crate::task::hold::HostHold,
    /// The plugin that started us, watched until it confirms the start.
    pub plugin: Option<ProcessId>,
    /// Stop the VM when LEASE_FILE is older than this (zero: never).
    #[serde(with = "millis", default)]
    pub stop_without_agent_after: Duration,
}

/// Pids the supervisor publishes as soon as it has them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Pids {
    pub supervisor: Option<ProcessId>,
    pub vmm: Option<ProcessId>,
    pub virtiofsd: Vec<(String, ProcessId)>,
}

/// How the VM ended, written once (atomically) before the supervisor exits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExitRecord {
    pub exit_code: i32,
    pub signal: i32,
    pub oom_killed: bool,
    /// True when the stop was asked for (Nomad's StopTask or a signal).
    pub requested: bool,
    /// Why the driver ended it, when it was not the guest's own doing.
    pub reason: Option<String>,
    /// Unix time in milliseconds.
    pub at_ms: u64,
}

/// The first line the supervisor reports to the plugin that spawned it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Ready {
    Started {
        pids: Pids,
        /// Milliseconds until every virtiofsd socket existed, and to spawn the VMM.
        #[serde(default)]
        virtiofsd_ms: u64,
        #[serde(default)]
        exec_ms: u64,
    },
    Failed {
        error: String,
    },
}

/// A notable step, forwarded to Nomad as a task event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub at_ms: u64,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Graceful stop: `microvm-shutdown`, wait, then TERM, then KILL.
    Stop {
        #[serde(with = "millis")]
        timeout: Duration,
        /// Why, when it is not Nomad's stop (recorded with the exit).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    /// Deliver a signal: INT/TERM mean a graceful guest shutdown.
    Signal {
        signal: i32,
    },
    Status,
    /// Turns the connection into the VM's serial console (one writer).
    Console,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids: Option<Pids>,
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Writes `value` as JSON to `dir/name` atomically (temp file + rename), so a
/// reader never sees half a file even if we are killed mid-write.
pub fn write_atomic<T: Serialize>(dir: &Path, name: &str, value: &T) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = dir.join(format!(".{name}.tmp"));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&serde_json::to_vec(value).map_err(std::io::Error::other)?)?;
    f.sync_all()?;
    std::fs::rename(&tmp, dir.join(name))
}

pub fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> std::io::Result<T> {
    let bytes = std::fs::read(path)?;
    serde_json::from_slice(&bytes).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

mod millis {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis() as u64)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_millis(u64::deserialize(d)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_json_lines() {
        let r = Request::Stop { timeout: Duration::from_secs(5), reason: None };
        let text = serde_json::to_string(&r).unwrap();
        assert_eq!(text, r#"{"op":"stop","timeout":5000}"#);
        assert_eq!(serde_json::from_str::<Request>(&text).unwrap(), r);
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"op":"signal","signal":15}"#).unwrap(),
            Request::Signal { signal: 15 }
        );
    }

    #[test]
    fn atomic_write_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let rec = ExitRecord { exit_code: 0, signal: 0, oom_killed: false, requested: true, reason: None, at_ms: 1 };
        write_atomic(dir.path(), EXIT_FILE, &rec).unwrap();
        let back: ExitRecord = read_json(&dir.path().join(EXIT_FILE)).unwrap();
        assert_eq!(back, rec);
        assert!(!dir.path().join(".exit.json.tmp").exists());
    }
}

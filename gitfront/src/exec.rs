//! Running git, tar and nix: with a cleared environment, in their own
//! process group, with a time limit, keeping the tail of their output.
//!
//! The environment is cleared because part of it is the client's (ssh
//! `SendEnv` reaches the forced command when sshd's `AcceptEnv` allows it):
//! `NIX_CONFIG`, `NIX_PATH`, `GIT_*` and friends could otherwise change what
//! is fetched, built or submitted. Only `PATH` (from the config) and a
//! fixed locale are passed on, and git is told to read no global or system
//! config.

use std::collections::VecDeque;
use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Output lines kept per command (more than any message shows).
const KEPT_LINES: usize = 2000;

/// A command with nothing inherited from our environment but `path`.
pub fn clean_command(program: impl AsRef<OsStr>, path: &str) -> Command {
    let mut cmd = Command::new(program);
    cmd.env_clear()
        .env("PATH", path)
        .env("LC_ALL", "C.UTF-8")
        // git: no ~/.gitconfig, no /etc/gitconfig (hooks, aliases, fsmonitor, …).
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null");
    cmd
}

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("cannot start {program}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{program} did not finish within {}", crate::duration::format(*limit))]
    TimedOut { program: String, limit: Duration, output: Vec<String> },
    #[error("waiting for {program} failed")]
    Wait {
        program: String,
        #[source]
        source: std::io::Error,
    },
}

/// What a finished command printed.
#[derive(Debug)]
pub struct Finished {
    pub status: ExitStatus,
    /// stdout, when asked for separately.
    pub stdout: Vec<u8>,
    /// stderr (and stdout when merged), as lines, the last [`KEPT_LINES`].
    pub output: Vec<String>,
    pub elapsed: Duration,
}

impl Finished {
    /// The last `n` output lines.
    pub fn tail(&self, n: usize) -> &[String] {
        &self.output[self.output.len().saturating_sub(n)..]
    }
}

/// Whether stdout is kept apart (to parse it) or merged with stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stdout {
    Capture,
    Merge,
}

/// Runs `cmd` to completion or until `limit`; on timeout the whole process
/// group is killed.
pub fn run(mut cmd: Command, stdout: Stdout, limit: Duration) -> Result<Finished, ExecError> {
    use std::os::unix::process::CommandExt;
    let program = cmd.get_program().to_string_lossy().into_owned();
    let lines = Arc::new(Mutex::new(VecDeque::new()));
    cmd.stdin(Stdio::null()).process_group(0);
    let (reader, writer) = std::io::pipe().map_err(|source| ExecError::Spawn { program: program.clone(), source })?;
    let err_writer = writer.try_clone().map_err(|source| ExecError::Spawn { program: program.clone(), source })?;
    cmd.stderr(err_writer);
    match stdout {
        Stdout::Merge => cmd.stdout(writer),
        Stdout::Capture => {
            drop(writer);
            cmd.stdout(Stdio::piped())
        }
    };
    let started = Instant::now();
    let mut child = cmd.spawn().map_err(|source| ExecError::Spawn { program: program.clone(), source })?;
    // The command's copy of the write end is the only one left now.
    drop(cmd);
    let collector = {
        let lines = lines.clone();
        std::thread::spawn(move || collect_lines(reader, &lines))
    };
    let stdout_reader = child.stdout.take().map(|mut out| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = out.read_to_end(&mut buf);
            buf
        })
    });
    let status = match wait_until(&mut child, started + limit) {
        Ok(Some(status)) => status,
        Ok(None) => {
            kill_group(&child);
            let _ = child.wait();
            let _ = collector.join();
            let output = Vec::from(std::mem::take(&mut *lines.lock().unwrap_or_else(|p| p.into_inner())));
            return Err(ExecError::TimedOut { program, limit, output });
        }
        Err(source) => {
            kill_group(&child);
            let _ = child.wait();
            return Err(ExecError::Wait { program, source });
        }
    };
    // Anything the command left running in its group would hold the pipe
    // open: the group is ours to end.
    kill_group(&child);
    let _ = collector.join();
    let stdout = stdout_reader.and_then(|h| h.join().ok()).unwrap_or_default();
    let output = Vec::from(std::mem::take(&mut *lines.lock().unwrap_or_else(|p| p.into_inner())));
    Ok(Finished { status, stdout, output, elapsed: started.elapsed() })
}

fn collect_lines(reader: impl Read, lines: &Mutex<VecDeque<String>>) {
    for line in BufReader::new(reader).split(b'\n') {
        let Ok(line) = line else { break };
        let text = String::from_utf8_lossy(&line).trim_end_matches('\r').to_string();
        let mut lines = lines.lock().unwrap_or_else(|p| p.into_inner());
        if lines.len() == KEPT_LINES {
            lines.pop_front();
        }
        lines.push_back(text);
    }
}

fn wait_until(child: &mut Child, deadline: Instant) -> std::io::Result<Option<ExitStatus>> {
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn kill_group(child: &Child) {
    let pid = rustix::process::Pid::from_child(child);
    let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Command {
        let mut c = clean_command("sh", "/usr/bin:/bin");
        c.args(["-c", script]);
        c
    }

    /// What we or sh itself set in the child.
    const SET_BY_SH: [&str; 8] =
        ["PATH", "PWD", "SHLVL", "_", "OLDPWD", "LC_ALL", "GIT_CONFIG_NOSYSTEM", "GIT_CONFIG_GLOBAL"];

    #[test]
    fn environment_is_cleared() {
        let ours: Vec<String> = std::env::vars().map(|(k, _)| k).filter(|k| !SET_BY_SH.contains(&k.as_str())).collect();
        assert!(!ours.is_empty(), "cargo test sets CARGO_* variables");
        let f = run(sh("env"), Stdout::Capture, Duration::from_secs(10)).unwrap();
        let env = String::from_utf8_lossy(&f.stdout);
        let names: Vec<&str> = env.lines().filter_map(|l| l.split('=').next()).collect();
        assert!(ours.iter().all(|k| !names.contains(&k.as_str())), "{env}");
        assert!(env.contains("PATH=/usr/bin:/bin"), "{env}");
        assert!(env.contains("GIT_CONFIG_GLOBAL=/dev/null"), "{env}");
    }

    #[test]
    fn merges_or_separates_output() {
        let f = run(sh("echo out; echo err >&2; exit 3"), Stdout::Merge, Duration::from_secs(10)).unwrap();
        assert_eq!(f.status.code(), Some(3));
        assert_eq!(f.output, ["out", "err"]);
        let f = run(sh("echo out; echo err >&2"), Stdout::Capture, Duration::from_secs(10)).unwrap();
        assert_eq!(f.stdout, b"out\n");
        assert_eq!(f.output, ["err"]);
        let f = run(sh("for i in $(seq 1 50); do echo line$i; done"), Stdout::Merge, Duration::from_secs(10)).unwrap();
        assert_eq!(f.tail(2), ["line49", "line50"]);
    }

    #[test]
    fn timeout_kills_the_whole_group() {
        let started = Instant::now();
        let e = run(sh("echo started; sleep 30 & sleep 30; echo never"), Stdout::Merge, Duration::from_millis(500))
            .unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(10), "the background sleep did not hold us");
        match e {
            ExecError::TimedOut { output, .. } => assert_eq!(output, ["started"]),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn missing_program_is_named() {
        let e =
            run(clean_command("no-such-program-xyz", "/usr/bin"), Stdout::Merge, Duration::from_secs(1)).unwrap_err();
        assert_eq!(e.to_string(), "cannot start no-such-program-xyz");
    }
}

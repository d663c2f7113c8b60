//! `nomad alloc exec` for microVMs, and ExecTask (script checks).
//!
//! - `nomad alloc exec -i -t <alloc> console` attaches to the serial
//!   console: typing goes to the guest, output comes back, and `nomad alloc
//!   logs` keeps receiving it. Leaving the session leaves the VM running.
//! - any other command runs in the guest with ssh over vsock, like
//!   microvm.nix's `microvm -s` (see `crate::vsock`), when the runner gives
//!   the guest vsock; otherwise the session says what the guest must enable.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use microvm_proto::drivers::{
    ExecTaskResponse, ExecTaskStreamingIoOperation as IoOp, ExecTaskStreamingRequest, ExecTaskStreamingResponse,
    ExitResult,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tonic::{Status, Streaming};

use crate::task::Tasks;
use crate::vsock::{GuestAddress, SshLogin};

type Out = mpsc::Sender<Result<ExecTaskStreamingResponse, Status>>;

pub const CONSOLE_COMMAND: &str = "console";

fn stdout(data: Vec<u8>) -> ExecTaskStreamingResponse {
    ExecTaskStreamingResponse { stdout: Some(IoOp { data, close: false }), ..Default::default() }
}

fn stderr(data: Vec<u8>) -> ExecTaskStreamingResponse {
    ExecTaskStreamingResponse { stderr: Some(IoOp { data, close: false }), ..Default::default() }
}

async fn finish(out: &Out, exit_code: i32) {
    let close = |stdout: bool| ExecTaskStreamingResponse {
        stdout: stdout.then_some(IoOp { data: Vec::new(), close: true }),
        stderr: (!stdout).then_some(IoOp { data: Vec::new(), close: true }),
        ..Default::default()
    };
    let _ = out.send(Ok(close(true))).await;
    let _ = out.send(Ok(close(false))).await;
    let _ = out
        .send(Ok(ExecTaskStreamingResponse {
            exited: true,
            result: Some(ExitResult { exit_code, signal: 0, oom_killed: false }),
            ..Default::default()
        }))
        .await;
}

/// Says `message` on the session's stderr and ends it with `exit_code`.
async fn refuse(out: &Out, message: &str, exit_code: i32) {
    let _ = out.send(Ok(stderr(format!("{message}\n").into_bytes()))).await;
    finish(out, exit_code).await;
}

/// What the session says when the guest has no vsock.
pub const NO_WAY_IN: &str = "this VM has no way in for commands: `nomad alloc exec` runs them with ssh over vsock \
     (like `microvm -s`), so the guest needs microvm.vsock.cid set and sshd listening on vsock \
     (microvm.vsock.ssh.enable). The serial console always works: nomad alloc exec -i -t <alloc> console";

/// The exit code of a command that could not be run (as a shell says it).
const CANNOT_RUN: i32 = 126;

/// Runs one exec session; the setup message asked for `command`.
pub async fn run(
    tasks: Arc<Tasks>,
    task_id: String,
    command: Vec<String>,
    tty: bool,
    inbound: Streaming<ExecTaskStreamingRequest>,
    out: Out,
) {
    if command.len() == 1 && command[0] == CONSOLE_COMMAND {
        match tasks.console(&task_id).await {
            Ok(stream) => {
                let (read, write) = stream.into_split();
                relay(inbound, write, read, &out).await;
                finish(&out, 0).await;
            }
            Err(e) => refuse(&out, &crate::service::status::chain(&e), 1).await,
        }
        return;
    }
    match way_in(&tasks, &task_id) {
        Ok((login, address)) => guest_command(&login, &address, &command, tty, inbound, &out).await,
        Err((code, why)) => refuse(&out, &why, code).await,
    }
}

/// ExecTask: runs `command` in the guest to its end (or `timeout`) and
/// returns its output, for script checks. Without vsock it answers like a
/// session does: exit code 126 and what the guest must enable.
pub async fn run_once(tasks: &Tasks, task_id: &str, command: &[String], timeout: Duration) -> ExecTaskResponse {
    let answer = |code: i32, stderr: String| ExecTaskResponse {
        stdout: Vec::new(),
        stderr: format!("{stderr}\n").into_bytes(),
        result: Some(ExitResult { exit_code: code, signal: 0, oom_killed: false }),
    };
    let (login, address) = match way_in(tasks, task_id) {
        Ok(found) => found,
        Err((code, why)) => return answer(code, why),
    };
    let mut ssh = ssh(&login, &address, command, false);
    ssh.stdin(std::process::Stdio::null());
    let limit = if timeout.is_zero() { Duration::from_secs(60) } else { timeout };
    match tokio::time::timeout(limit, ssh.output()).await {
        Ok(Ok(output)) => ExecTaskResponse {
            stdout: output.stdout,
            stderr: output.stderr,
            result: Some(ExitResult {
                exit_code: output.status.code().unwrap_or(CANNOT_RUN),
                signal: 0,
                oom_killed: false,
            }),
        },
        Ok(Err(e)) => answer(CANNOT_RUN, format!("cannot run ssh for {}: {e}", address.describe())),
        // kill_on_drop ends ssh; 124 is what timeout(1) exits with.
        Err(_) => answer(124, format!("the command did not finish within {}s", limit.as_secs_f64())),
    }
}

/// Nomad's CLI sends a heartbeat every 10 s. The agent does not tell us when
/// the CLI is gone (it only notices when a write to it fails, and a quiet
/// console writes nothing), so a session silent for this long has ended.
const SESSION_SILENCE: Duration = Duration::from_secs(30);

/// How a session's input side ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum InputEnd {
    /// The session closed its stdin (or the stream ended): output may go on.
    Closed,
    /// Nothing came, not even heartbeats: nobody is there any more.
    Gone,
}

/// Copies the session's stdin into `to` and `from` into its stdout until
/// either side ends, or the session goes silent; says whether it went silent.
async fn relay(
    mut inbound: Streaming<ExecTaskStreamingRequest>,
    mut to: impl AsyncWrite + Unpin + Send + 'static,
    mut from: impl AsyncRead + Unpin,
    out: &Out,
) -> InputEnd {
    let mut typing = tokio::spawn(async move {
        let end = loop {
            let msg = match tokio::time::timeout(SESSION_SILENCE, inbound.message()).await {
                Err(_) => break InputEnd::Gone,
                Ok(Ok(Some(msg))) => msg,
                Ok(_) => break InputEnd::Closed,
            };
            if let Some(stdin) = msg.stdin {
                if !stdin.data.is_empty() && to.write_all(&stdin.data).await.is_err() {
                    break InputEnd::Closed;
                }
                if stdin.close {
                    break InputEnd::Closed;
                }
            }
            // tty_size and empty heartbeats need nothing: the console has no size.
        };
        let _ = to.shutdown().await;
        end
    });
    let mut input_end = None;
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        tokio::select! {
            n = from.read(&mut buf) => match n {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if out.send(Ok(stdout(buf[..n].to_vec()))).await.is_err() {
                        break;
                    }
                }
            },
            end = &mut typing, if input_end.is_none() => {
                let end = end.unwrap_or(InputEnd::Closed);
                input_end = Some(end);
                if end == InputEnd::Gone {
                    break;
                }
            }
            _ = out.closed() => break,
        }
    }
    typing.abort();
    input_end.unwrap_or(InputEnd::Closed)
}

/// How the driver logs into `task_id`'s guest and where the guest is, or
/// the exit code and message of why no command can run there.
fn way_in(tasks: &Tasks, task_id: &str) -> Result<(SshLogin, GuestAddress), (i32, String)> {
    let address = match tasks.guest_address(task_id) {
        Ok(Some(address)) => address,
        Ok(None) => return Err((CANNOT_RUN, NO_WAY_IN.to_string())),
        Err(e) => return Err((1, crate::service::status::chain(&e))),
    };
    let key = tasks.config().exec_ssh_key_file.clone();
    if let Some(key) = &key {
        usable_key(key).map_err(|why| (CANNOT_RUN, why))?;
    }
    Ok((SshLogin { proxy_exe: tasks.self_exe().to_path_buf(), key }, address))
}

/// ssh would only warn about these on stderr and then fail to log in.
fn usable_key(key: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let shown = key.display();
    match std::fs::metadata(key) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Err(format!("exec_ssh_key_file {shown} does not exist (plugin config)"))
        }
        Err(e) => Err(format!("cannot read exec_ssh_key_file {shown}: {e}")),
        Ok(m) if m.permissions().mode() & 0o077 != 0 => Err(format!(
            "exec_ssh_key_file {shown} has mode {:04o}: ssh ignores a private key others may read (chmod 600 it)",
            m.permissions().mode() & 0o7777
        )),
        Ok(_) => Ok(()),
    }
}

fn ssh(login: &SshLogin, address: &GuestAddress, command: &[String], tty: bool) -> tokio::process::Command {
    let mut ssh = tokio::process::Command::from(login.command(address, command, tty));
    ssh.kill_on_drop(true);
    ssh
}

async fn guest_command(
    login: &SshLogin,
    address: &GuestAddress,
    command: &[String],
    tty: bool,
    inbound: Streaming<ExecTaskStreamingRequest>,
    out: &Out,
) {
    let child = ssh(login, address, command, tty)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => return refuse(out, &format!("cannot run ssh for {}: {e}", address.describe()), CANNOT_RUN).await,
    };
    let (Some(stdin), Some(stdout_pipe), Some(mut stderr_pipe)) =
        (child.stdin.take(), child.stdout.take(), child.stderr.take())
    else {
        return refuse(out, "ssh without pipes", CANNOT_RUN).await;
    };
    let err_out = out.clone();
    let errors = tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        while let Ok(n) = stderr_pipe.read(&mut buf).await {
            if n == 0 || err_out.send(Ok(stderr(buf[..n].to_vec()))).await.is_err() {
                break;
            }
        }
    });
    if relay(inbound, stdin, stdout_pipe, out).await == InputEnd::Gone {
        // Nobody reads the answer: end the command rather than let it run on.
        let _ = child.start_kill();
    }
    let _ = errors.await;
    let code = child.wait().await.ok().and_then(|s| s.code()).unwrap_or(1);
    finish(out, code).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn keys_ssh_would_ignore_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("exec_key");
        let err = usable_key(&key).unwrap_err();
        assert_eq!(err, format!("exec_ssh_key_file {} does not exist (plugin config)", key.display()));
        std::fs::write(&key, "not really a key").unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).unwrap();
        let err = usable_key(&key).unwrap_err();
        assert!(err.contains("has mode 0640: ssh ignores a private key others may read"), "{err}");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(usable_key(&key), Ok(()));
    }
}

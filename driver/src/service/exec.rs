//! `nomad alloc exec` for microVMs.
//!
//! - `nomad alloc exec -i -t <alloc> console` attaches to the serial
//!   console: typing goes to the guest, output comes back, and `nomad alloc
//!   logs` keeps receiving it. Leaving the session leaves the VM running.
//! - any other command runs in the guest over vsock with ssh, like
//!   microvm.nix's `microvm -s`, when the runner has a vsock CID; otherwise
//!   the session says what the guest must enable.

use std::sync::Arc;

use microvm_proto::drivers::{
    ExecTaskStreamingIoOperation as IoOp, ExecTaskStreamingRequest, ExecTaskStreamingResponse, ExitResult,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tonic::{Status, Streaming};

use crate::task::Tasks;

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

/// Runs one exec session; `first` was the setup message.
pub async fn run(
    tasks: Arc<Tasks>,
    task_id: String,
    command: Vec<String>,
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
    match tasks.vsock_cid(&task_id) {
        Ok(Some(cid)) => guest_command(cid, &command, inbound, &out).await,
        Ok(None) => {
            refuse(
                &out,
                "this VM has no way in for commands: `nomad alloc exec` runs them over vsock with ssh (like \
                 `microvm -s`), so the guest needs microvm.vsock.cid set and sshd listening on vsock \
                 (microvm.vsock.ssh.enable). The serial console always works: nomad alloc exec -i -t <alloc> console",
                126,
            )
            .await
        }
        Err(e) => refuse(&out, &crate::service::status::chain(&e), 1).await,
    }
}

/// Copies the session's stdin into `to` and `from` into its stdout until
/// either side ends.
async fn relay(
    mut inbound: Streaming<ExecTaskStreamingRequest>,
    mut to: impl AsyncWrite + Unpin + Send + 'static,
    mut from: impl AsyncRead + Unpin,
    out: &Out,
) {
    let typing = tokio::spawn(async move {
        while let Ok(Some(msg)) = inbound.message().await {
            if let Some(stdin) = msg.stdin {
                if !stdin.data.is_empty() && to.write_all(&stdin.data).await.is_err() {
                    break;
                }
                if stdin.close {
                    break;
                }
            }
            // tty_size and empty heartbeats need nothing: the console has no size.
        }
        let _ = to.shutdown().await;
    });
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
            _ = out.closed() => break,
        }
    }
    typing.abort();
}

/// `ssh` to the guest over vsock (socat's VSOCK-CONNECT as the proxy).
async fn guest_command(cid: u32, command: &[String], inbound: Streaming<ExecTaskStreamingRequest>, out: &Out) {
    let proxy = format!("ProxyCommand=socat - VSOCK-CONNECT:{cid}:22");
    let child = tokio::process::Command::new("ssh")
        .args(["-o", &proxy, "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null"])
        .args(["-o", "BatchMode=yes", "-o", "LogLevel=ERROR", &format!("root@vsock-{cid}"), "--"])
        .args(command)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => return refuse(out, &format!("cannot run ssh for vsock CID {cid}: {e}"), 126).await,
    };
    let (Some(stdin), Some(stdout_pipe), Some(mut stderr_pipe)) =
        (child.stdin.take(), child.stdout.take(), child.stderr.take())
    else {
        return refuse(out, "ssh without pipes", 126).await;
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
    relay(inbound, stdin, stdout_pipe, out).await;
    let _ = errors.await;
    let code = child.wait().await.ok().and_then(|s| s.code()).unwrap_or(1);
    finish(out, code).await;
}

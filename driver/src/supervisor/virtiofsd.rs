//! One virtiofsd per share, started as root in the VM's working directory
//! before every VMM start (virtiofsd exits when its VMM disconnects).

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};

use super::protocol::VirtiofsdLaunch;
use crate::cgroup::Placement;

#[derive(Debug, thiserror::Error)]
pub enum VirtiofsdError {
    #[error("cannot create the source directory {path} of share {tag:?}")]
    Source {
        tag: String,
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start virtiofsd for share {tag:?} ({program})")]
    Spawn {
        tag: String,
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("virtiofsd for share {tag:?} exited ({status}) before its socket appeared; its log: {log}")]
    Exited { tag: String, status: String, log: String },
    #[error("virtiofsd for share {tag:?} did not create {socket} within {waited:?}")]
    Timeout { tag: String, socket: String, waited: Duration },
}

/// How long we wait for all sockets; virtiofsd normally needs milliseconds.
pub const SOCKET_WAIT: Duration = Duration::from_secs(20);

pub struct Running {
    pub tag: String,
    pub child: Child,
}

/// Starts every virtiofsd and waits until each socket exists. On error the
/// ones already started are killed.
pub async fn start_all(
    launches: &[VirtiofsdLaunch],
    work_dir: &Path,
    log_dir: &Path,
    env: &[(String, String)],
    placement: Option<&Placement>,
) -> Result<Vec<Running>, VirtiofsdError> {
    let mut running = Vec::new();
    for launch in launches {
        match start_one(launch, work_dir, log_dir, env, placement) {
            Ok(r) => running.push(r),
            Err(e) => {
                stop_all(&mut running, Duration::from_secs(1)).await;
                return Err(e);
            }
        }
    }
    let deadline = Instant::now() + SOCKET_WAIT;
    for (launch, r) in launches.iter().zip(running.iter_mut()) {
        if let Err(e) = wait_socket(launch, r, log_dir, deadline).await {
            stop_all(&mut running, Duration::from_secs(1)).await;
            return Err(e);
        }
    }
    Ok(running)
}

fn log_path(log_dir: &Path, tag: &str) -> std::path::PathBuf {
    log_dir.join(format!("virtiofsd-{tag}.log"))
}

fn start_one(
    launch: &VirtiofsdLaunch,
    work_dir: &Path,
    log_dir: &Path,
    env: &[(String, String)],
    placement: Option<&Placement>,
) -> Result<Running, VirtiofsdError> {
    let tag = launch.tag.clone();
    std::fs::create_dir_all(&launch.source).map_err(|source| VirtiofsdError::Source {
        tag: tag.clone(),
        path: launch.source.clone(),
        source,
    })?;
    // virtiofsd replaces a stale socket itself, but a stale one would make
    // our "socket exists" readiness check pass too early.
    let _ = std::fs::remove_file(&launch.socket);
    let spawn_err = |source| VirtiofsdError::Spawn {
        tag: tag.clone(),
        program: launch.argv.first().cloned().unwrap_or_default(),
        source,
    };
    let log = std::fs::File::create(log_path(log_dir, &tag)).map_err(spawn_err)?;
    let log2 = log.try_clone().map_err(spawn_err)?;
    let (program, args) = launch.argv.split_first().ok_or_else(|| spawn_err(std::io::Error::other("empty command")))?;
    let mut cmd = Command::new(program);
    cmd.args(args)
        .current_dir(work_dir)
        .env_clear()
        .envs(env.iter().cloned())
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2)
        .kill_on_drop(false);
    if let Some(p) = placement {
        p.apply(&mut cmd);
    }
    let child = cmd.spawn().map_err(spawn_err)?;
    Ok(Running { tag, child })
}

async fn wait_socket(
    launch: &VirtiofsdLaunch,
    r: &mut Running,
    log_dir: &Path,
    deadline: Instant,
) -> Result<(), VirtiofsdError> {
    use std::os::unix::fs::FileTypeExt;
    loop {
        let is_socket = std::fs::metadata(&launch.socket).map(|m| m.file_type().is_socket()).unwrap_or(false);
        if is_socket {
            return Ok(());
        }
        if let Ok(Some(status)) = r.child.try_wait() {
            let log = std::fs::read_to_string(log_path(log_dir, &launch.tag)).unwrap_or_default();
            let tail: String =
                log.lines().rev().take(5).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join(" | ");
            return Err(VirtiofsdError::Exited { tag: launch.tag.clone(), status: status.to_string(), log: tail });
        }
        if Instant::now() >= deadline {
            return Err(VirtiofsdError::Timeout {
                tag: launch.tag.clone(),
                socket: launch.socket.display().to_string(),
                waited: SOCKET_WAIT,
            });
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// SIGTERM each, wait up to `grace`, then SIGKILL.
pub async fn stop_all(running: &mut [Running], grace: Duration) {
    for r in running.iter() {
        if let Some(pid) = r.child.id() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGTERM);
        }
    }
    let deadline = tokio::time::Instant::now() + grace;
    for r in running.iter_mut() {
        if tokio::time::timeout_at(deadline, r.child.wait()).await.is_err() {
            let _ = r.child.kill().await;
        }
    }
}

//! The supervisor's life: boot the VM once, serve the control socket, stop
//! it when asked (or when a virtiofsd dies), and record how it ended.

use std::os::fd::OwnedFd;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::Signal;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::process::Command;
use tokio::sync::{mpsc, watch};

use super::console::Console;
use super::identity::ChildIdentity;
use super::logsink::LogSink;
use super::protocol::{self, Event, ExitRecord, LaunchSpec, Pids, Ready, Reply, Request};
use super::{send_ready, virtiofsd};
use crate::cgroup::Placement;
use crate::proc::ProcessId;

/// After the graceful timeout: SIGTERM, then this long before SIGKILL.
const TERM_GRACE: Duration = Duration::from_secs(3);

/// A start the plugin never confirms (it hung) is abandoned after this.
const COMMIT_DEADLINE: Duration = Duration::from_secs(600);

/// Appends task events to events.jsonl, where the plugin picks them up.
#[derive(Clone)]
pub struct EventLog {
    path: PathBuf,
}

impl EventLog {
    pub fn new(task_dir: &Path) -> EventLog {
        EventLog { path: task_dir.join(protocol::EVENTS_FILE) }
    }

    pub fn emit(&self, message: impl Into<String>) {
        use std::io::Write;
        let event = Event { at_ms: protocol::now_ms(), message: message.into() };
        tracing::info!("{}", event.message);
        if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(&self.path) {
            // One write per line so a concurrent reader sees whole lines.
            let mut line = serde_json::to_vec(&event).unwrap_or_default();
            line.push(b'\n');
            let _ = f.write_all(&line);
        }
    }
}

struct Shared {
    spec: LaunchSpec,
    console: Arc<Console>,
    vmm: ProcessId,
    identity: ChildIdentity,
    events: EventLog,
    exited: watch::Receiver<Option<ExitStatus>>,
    /// Set once a stop began: whether it was requested, and why.
    stop: Mutex<Option<(bool, Option<String>)>>,
    stop_task: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// The plugin died before confirming the start: nobody will destroy us.
    abandoned: std::sync::atomic::AtomicBool,
    /// OOM kills in the task's cgroup before this VMM started.
    oom_kills_before: u64,
}

impl Shared {
    async fn wait_exit(&self, limit: Duration) -> bool {
        let mut rx = self.exited.clone();
        tokio::time::timeout(limit, rx.wait_for(|s| s.is_some())).await.is_ok()
    }

    /// Starts a stop unless one is running. `requested` marks a stop Nomad
    /// (or an operator) asked for; `reason` explains a stop we chose.
    fn begin_stop(self: &Arc<Self>, timeout: Duration, requested: bool, reason: Option<String>) {
        {
            let mut stop = self.stop.lock().unwrap_or_else(|e| e.into_inner());
            if stop.is_some() {
                return;
            }
            *stop = Some((requested, reason));
        }
        let me = self.clone();
        let task = tokio::spawn(async move { me.graceful_stop(timeout, true).await });
        *self.stop_task.lock().unwrap_or_else(|e| e.into_inner()) = Some(task);
    }

    /// microvm.nix's stop order: the booted runner's `microvm-shutdown`, wait
    /// up to `timeout`, then (if `escalate`) SIGTERM, then SIGKILL, the group.
    async fn graceful_stop(self: Arc<Self>, timeout: Duration, escalate: bool) {
        if timeout.is_zero() {
            self.events.emit("stop with no timeout: killing the VMM");
            self.vmm.signal_group(Signal::SIGKILL);
            return;
        }
        let mut helper = None;
        match &self.spec.shutdown_script {
            Some(script) => {
                self.events.emit("graceful shutdown: running microvm-shutdown");
                helper = self.spawn_shutdown(script);
            }
            None => {
                self.events.emit("runner has no microvm-shutdown: sending SIGTERM to the VMM");
                self.vmm.signal_group(Signal::SIGTERM);
            }
        }
        let done = self.wait_exit(timeout).await;
        if !done && escalate {
            self.events.emit(format!("graceful shutdown timed out after {}s, killing", timeout.as_secs_f64()));
            self.vmm.signal_group(Signal::SIGTERM);
            if !self.wait_exit(TERM_GRACE).await {
                self.vmm.signal_group(Signal::SIGKILL);
            }
        }
        if let Some(mut child) = helper {
            // qemu's script keeps `cat`ing stdin into the QMP socket until
            // stdin closes; closing it lets the script finish.
            drop(child.stdin.take());
            if tokio::time::timeout(Duration::from_secs(2), child.wait()).await.is_err() {
                if let Some(pid) = child.id() {
                    crate::proc::kill_group(pid as i32, Signal::SIGKILL);
                }
                let _ = child.wait().await;
            }
        }
    }

    fn spawn_shutdown(&self, script: &Path) -> Option<tokio::process::Child> {
        let mut cmd = Command::new(script);
        cmd.current_dir(&self.spec.work_dir)
            .env_clear()
            .envs(self.spec.env.iter().cloned())
            // cloud-hypervisor's script waits on $MAINPID, as under systemd.
            .env("MAINPID", self.vmm.pid.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::inherit())
            .stderr(Stdio::inherit())
            .process_group(0);
        self.identity.apply(&mut cmd);
        match cmd.spawn() {
            Ok(c) => Some(c),
            Err(e) => {
                self.events.emit(format!("cannot run microvm-shutdown ({e}): sending SIGTERM"));
                self.vmm.signal_group(Signal::SIGTERM);
                None
            }
        }
    }

    fn signal(self: &Arc<Self>, signal: i32) -> Result<(), String> {
        let sig = Signal::try_from(signal).map_err(|_| format!("unknown signal number {signal}"))?;
        if matches!(sig, Signal::SIGTERM | Signal::SIGINT) {
            // For a VM these mean "shut down": the guest powers off by itself.
            self.events.emit(format!("{sig}: asking the guest to shut down"));
            let me = self.clone();
            let timeout = me.spec.default_stop_timeout;
            tokio::spawn(async move { me.graceful_stop(timeout, false).await });
            return Ok(());
        }
        if self.vmm.signal(sig) { Ok(()) } else { Err("the VMM is not running".into()) }
    }
}

pub(super) async fn supervise(spec: LaunchSpec, ready: OwnedFd) -> i32 {
    let events = EventLog::new(&spec.task_dir);
    let env = spec.env.clone();
    let identity = ChildIdentity::new(spec.vmm_uid, spec.vmm_gid, &spec.vmm_groups);
    // virtiofsd and the VMM start in the task's cgroup, where there is one.
    let placement = spec.hold.cgroup.as_deref().and_then(|cg| match Placement::open(cg) {
        Ok(p) => Some(p),
        Err(e) => {
            events.emit(format!("{}: the VM runs without Nomad's resource limits", crate::service::status::chain(&e)));
            None
        }
    });
    let oom_kills_before = spec.hold.cgroup.as_deref().map(crate::cgroup::oom_kills).unwrap_or(0);

    let t0 = std::time::Instant::now();
    let started = virtiofsd::start_all(&spec.virtiofsd, &spec.work_dir, &spec.task_dir, &env, placement.as_ref()).await;
    let mut shares = match started {
        Ok(v) => v,
        Err(e) => {
            send_ready(ready, &Ready::Failed { error: crate::service::status::chain(&e) });
            return 1;
        }
    };
    if !shares.is_empty() {
        let tags: Vec<&str> = shares.iter().map(|s| s.tag.as_str()).collect();
        events.emit(format!("virtiofsd ready for share(s) {}", tags.join(", ")));
    }

    let virtiofsd_ms = t0.elapsed().as_millis() as u64;
    let control_path = spec.task_dir.join(protocol::CONTROL_SOCKET);
    let _ = std::fs::remove_file(&control_path);
    let listener = match UnixListener::bind(&control_path) {
        Ok(l) => l,
        Err(e) => {
            virtiofsd::stop_all(&mut shares, Duration::from_secs(1)).await;
            send_ready(ready, &Ready::Failed { error: format!("cannot bind {}: {e}", control_path.display()) });
            return 1;
        }
    };

    let t1 = std::time::Instant::now();
    let mut vmm = match spawn_vmm(&spec, &identity, placement.as_ref()) {
        Ok(c) => c,
        Err(e) => {
            virtiofsd::stop_all(&mut shares, Duration::from_secs(1)).await;
            send_ready(ready, &Ready::Failed { error: e });
            return 1;
        }
    };
    let vmm_id = vmm
        .id()
        .and_then(|pid| ProcessId::of(pid as i32))
        .unwrap_or(ProcessId { pid: vmm.id().unwrap_or(0) as i32, start_time: 0 });

    // virtiofsd watchers: each reports its exit on `share_exits`.
    let (share_tx, mut share_exits) = mpsc::channel::<(String, ExitStatus)>(8);
    let mut share_ids = Vec::new();
    for mut r in shares {
        if let Some(id) = r.child.id().and_then(|p| ProcessId::of(p as i32)) {
            share_ids.push((r.tag.clone(), id));
        }
        let tx = share_tx.clone();
        tokio::spawn(async move {
            if let Ok(status) = r.child.wait().await {
                let _ = tx.send((r.tag, status)).await;
            }
        });
    }
    drop(share_tx);

    let pids =
        Pids { supervisor: ProcessId::of(std::process::id() as i32), vmm: Some(vmm_id), virtiofsd: share_ids.clone() };
    let _ = protocol::write_atomic(&spec.task_dir, protocol::PIDS_FILE, &pids);
    let exec_ms = t1.elapsed().as_millis() as u64;
    send_ready(ready, &Ready::Started { pids, virtiofsd_ms, exec_ms });
    events.emit(format!("VM started (microvm-run pid {})", vmm_id.pid));

    // Holding the VMM's stdin open keeps qemu's stdio chardev alive; an
    // attached console session types into it.
    let console = Console::new(vmm.stdin.take());
    let committed = spec.task_dir.join(protocol::COMMITTED_FILE);
    let pumps = [
        vmm.stdout.take().map(|out| {
            tokio::spawn(pump(out, LogSink::new(spec.stdout_path.clone()), Some(console.clone()), committed.clone()))
        }),
        vmm.stderr.take().map(|err| tokio::spawn(pump(err, LogSink::new(spec.stderr_path.clone()), None, committed))),
    ];

    let (exit_tx, exit_rx) = watch::channel(None);
    tokio::spawn(async move {
        let status = vmm.wait().await.unwrap_or_else(|_| ExitStatus::from_raw(255 << 8));
        let _ = exit_tx.send(Some(status));
    });

    let shared = Arc::new(Shared {
        spec,
        console,
        vmm: vmm_id,
        identity,
        events: events.clone(),
        exited: exit_rx.clone(),
        stop: Mutex::new(None),
        stop_task: Mutex::new(None),
        abandoned: std::sync::atomic::AtomicBool::new(false),
        oom_kills_before,
    });
    tokio::spawn(watch_commit(shared.clone()));
    if !shared.spec.stop_without_agent_after.is_zero() {
        tokio::spawn(watch_agent_lease(shared.clone()));
    }

    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    let mut exit_rx = exit_rx;
    loop {
        tokio::select! {
            _ = exit_rx.wait_for(|s| s.is_some()) => break,
            accepted = listener.accept() => {
                if let Ok((stream, _)) = accepted {
                    let s = shared.clone();
                    tokio::spawn(async move { serve_control(stream, s).await });
                }
            }
            Some((tag, status)) = share_exits.recv() => {
                let reason = format!("virtiofsd for share {tag:?} exited ({status}); the share is gone, stopping the VM");
                if shared.stop.lock().map(|s| s.is_none()).unwrap_or(false) {
                    events.emit(reason.clone());
                    shared.begin_stop(shared.spec.default_stop_timeout, false, Some(reason));
                }
            }
            Some(_) = async { match sigterm.as_mut() { Some(s) => s.recv().await, None => std::future::pending().await } } => {
                events.emit("supervisor got SIGTERM: stopping the VM");
                shared.begin_stop(shared.spec.default_stop_timeout, true, Some("the supervisor was told to stop".into()));
            }
        }
    }

    let status = exit_rx.borrow().unwrap_or_else(|| ExitStatus::from_raw(0));
    finish(&shared, status, &share_ids, pumps).await;
    0
}

fn spawn_vmm(
    spec: &LaunchSpec,
    identity: &ChildIdentity,
    placement: Option<&Placement>,
) -> Result<tokio::process::Child, String> {
    let run = spec.runner.join("bin/microvm-run");
    let mut cmd = Command::new(&run);
    cmd.current_dir(&spec.work_dir)
        .env_clear()
        .envs(spec.env.iter().cloned())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own group: a stop reaches every helper the runner started.
        .process_group(0)
        .kill_on_drop(false);
    // Joining the cgroup needs root: before the identity switch.
    if let Some(p) = placement {
        p.apply(&mut cmd);
    }
    identity.apply(&mut cmd);
    cmd.spawn().map_err(|e| format!("cannot start {}: {e}", run.display()))
}

/// The most console output kept while a start is not yet committed.
const HELD_OUTPUT: usize = 1 << 20;

/// Copies the VMM's output into Nomad's log FIFO (and the console), but only
/// once the start is committed (`committed` exists): until then it is held.
/// logmon reads the FIFO until its first EOF and never again for this start
/// of the task; if the plugin dies before committing, this VM is removed and
/// Nomad starts the task again *without* a new logmon — had this pump opened
/// and then closed the FIFO, the next VM's console would be lost.
async fn pump(
    mut from: impl tokio::io::AsyncRead + Unpin,
    mut sink: LogSink,
    console: Option<Arc<Console>>,
    committed: PathBuf,
) {
    // Connects the sink (a silent stream must connect too) and writes what was held.
    async fn flush(sink: &mut LogSink, held: Vec<u8>) {
        sink.connect().await;
        if !held.is_empty() {
            sink.write(&held).await;
        }
    }
    let mut buf = vec![0u8; 16 * 1024];
    let mut held = Some(Vec::new());
    loop {
        if held.is_some()
            && committed.exists()
            && let Some(early) = held.take()
        {
            flush(&mut sink, early).await;
        }
        let read = match &held {
            Some(_) => match tokio::time::timeout(Duration::from_millis(50), from.read(&mut buf)).await {
                Ok(r) => r,
                Err(_) => continue,
            },
            None => from.read(&mut buf).await,
        };
        let n = match read {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if let Some(c) = &console {
            c.publish(&buf[..n]);
        }
        match held.as_mut() {
            Some(h) => {
                h.extend_from_slice(&buf[..n]);
                if h.len() > HELD_OUTPUT {
                    h.drain(..h.len() - HELD_OUTPUT);
                }
            }
            None => sink.write(&buf[..n]).await,
        }
    }
    // A VMM that exited at once: its last words (qemu's error) belong in the
    // log once the plugin commits the start, which it does within moments.
    if let Some(early) = held {
        for _ in 0..40 {
            if committed.exists() {
                flush(&mut sink, early).await;
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

async fn serve_control(stream: UnixStream, shared: Arc<Shared>) {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    let mut line = String::new();
    loop {
        line.clear();
        match reader.read_line(&mut line).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let reply = match serde_json::from_str::<Request>(line.trim_end()) {
            Err(e) => Reply { ok: false, error: Some(format!("bad request: {e}")), pids: None },
            Ok(Request::Stop { timeout, reason }) => {
                if let Some(r) = &reason {
                    shared.events.emit(r.clone());
                }
                shared.begin_stop(timeout, true, reason);
                Reply { ok: true, error: None, pids: None }
            }
            Ok(Request::Signal { signal }) => match shared.signal(signal) {
                Ok(()) => Reply { ok: true, error: None, pids: None },
                Err(e) => Reply { ok: false, error: Some(e), pids: None },
            },
            Ok(Request::Status) => {
                let pids = protocol::read_json::<Pids>(&shared.spec.task_dir.join(protocol::PIDS_FILE)).ok();
                Reply { ok: true, error: None, pids }
            }
            Ok(Request::Console) => match shared.console.attach() {
                Some(attachment) => {
                    if send_reply(&mut write, &Reply { ok: true, error: None, pids: None }).await.is_err() {
                        break;
                    }
                    // From here on the connection is the raw console.
                    shared.console.serve(attachment, reader, write).await;
                    return;
                }
                None => Reply {
                    ok: false,
                    error: Some("another session is attached to this VM's console; only one may type at a time".into()),
                    pids: None,
                },
            },
        };
        if send_reply(&mut write, &reply).await.is_err() {
            break;
        }
    }
}

async fn send_reply(write: &mut (impl tokio::io::AsyncWrite + Unpin), reply: &Reply) -> std::io::Result<()> {
    let mut text = serde_json::to_vec(reply).unwrap_or_default();
    text.push(b'\n');
    write.write_all(&text).await
}

/// The VMM is gone: clear up what it used, record the exit, and leave.
async fn finish(
    shared: &Arc<Shared>,
    status: ExitStatus,
    shares: &[(String, ProcessId)],
    pumps: [Option<tokio::task::JoinHandle<()>>; 2],
) {
    shared.console.close_input().await;
    // Whatever the runner left in the VMM's group goes too.
    crate::proc::kill_group(shared.vmm.pid, Signal::SIGKILL);
    let stop_task = shared.stop_task.lock().ok().and_then(|mut t| t.take());
    if let Some(task) = stop_task {
        let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
    }
    for (_, id) in shares {
        id.signal(Signal::SIGTERM);
    }
    for (_, id) in shares {
        if tokio::time::timeout(TERM_GRACE, id.exited()).await.is_err() {
            id.signal(Signal::SIGKILL);
        }
    }
    for launch in &shared.spec.virtiofsd {
        let _ = std::fs::remove_file(&launch.socket);
        let mut pid_file = launch.socket.clone().into_os_string();
        pid_file.push(".pid");
        let _ = std::fs::remove_file(pid_file);
    }
    let _ = std::fs::remove_file(shared.spec.work_dir.join(format!("{}.sock", shared.spec.hostname)));
    for pump in pumps.into_iter().flatten() {
        let _ = tokio::time::timeout(Duration::from_secs(2), pump).await;
    }

    let (requested, reason) = shared.stop.lock().ok().and_then(|s| s.clone()).unwrap_or((false, None));
    let (exit_code, signal) = match (status.code(), status.signal()) {
        (Some(code), _) => (code, 0),
        (None, Some(sig)) => (128 + sig, sig),
        (None, None) => (-1, 0),
    };
    // Everything of the VM is gone: the cgroup can say whether the kernel's
    // OOM killer ended it, and then go.
    let cgroup = shared.spec.hold.cgroup.as_deref();
    let oom_killed =
        signal == libc::SIGKILL && cgroup.is_some_and(|cg| crate::cgroup::oom_kills(cg) > shared.oom_kills_before);
    if let Some(cg) = cgroup.map(Path::to_path_buf) {
        let _ = tokio::task::spawn_blocking(move || crate::cgroup::remove(&cg, Duration::from_secs(2))).await;
    }
    let reason = match (oom_killed, reason) {
        (true, None) => Some("the VM used more memory than the task's limit and was killed by the OOM killer".into()),
        (_, reason) => reason,
    };
    let record = ExitRecord { exit_code, signal, oom_killed, requested, reason, at_ms: protocol::now_ms() };
    shared.events.emit(match signal {
        _ if oom_killed => "VM killed by the OOM killer: raise the task's memory (or memory_max)".to_string(),
        0 => format!("VM exited with code {exit_code}"),
        s => format!("VM killed by signal {s}"),
    });
    if let Err(e) = protocol::write_atomic(&shared.spec.task_dir, protocol::EXIT_FILE, &record) {
        tracing::error!("cannot record the exit status: {e}");
    }
    let _ = std::fs::remove_file(shared.spec.task_dir.join(protocol::CONTROL_SOCKET));
    if shared.abandoned.load(std::sync::atomic::Ordering::SeqCst) {
        shared.spec.hold.release(&crate::net::LinuxNet::new());
    }
}

/// The node's Nomad agent is gone (the plugin stopped renewing the lease):
/// the servers will mark the node down and place this VM elsewhere, so shut
/// it down before they do, as the client itself would with
/// `stop_on_client_after` if it were alive.
async fn watch_agent_lease(shared: Arc<Shared>) {
    let limit = shared.spec.stop_without_agent_after;
    let lease = shared.spec.task_dir.join(protocol::LEASE_FILE);
    let started = std::time::SystemTime::now();
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let renewed = std::fs::metadata(&lease).and_then(|m| m.modified()).unwrap_or(started);
        let silent = std::time::SystemTime::now().duration_since(renewed).unwrap_or_default();
        if silent >= limit {
            let reason = format!(
                "no Nomad agent has been connected for {}s (stop_without_agent_after): shutting the VM down \
                 before the servers place it elsewhere",
                silent.as_secs()
            );
            shared.events.emit(reason.clone());
            shared.begin_stop(shared.spec.default_stop_timeout, false, Some(reason));
            return;
        }
    }
}

/// Until the plugin confirms the start (COMMITTED_FILE), its death means
/// Nomad never got a handle for this VM: remove it rather than orphan it.
async fn watch_commit(shared: Arc<Shared>) {
    let committed = shared.spec.task_dir.join(protocol::COMMITTED_FILE);
    let plugin_gone = async {
        match shared.spec.plugin {
            Some(p) => p.exited().await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = plugin_gone => {}
        _ = tokio::time::sleep(COMMIT_DEADLINE) => {}
    }
    if committed.exists() {
        return;
    }
    let reason = "the plugin went away before confirming the start to Nomad: removing the VM".to_string();
    shared.events.emit(reason.clone());
    shared.abandoned.store(true, std::sync::atomic::Ordering::SeqCst);
    shared.begin_stop(Duration::ZERO, false, Some(reason));
}

/// Attaches to a task's console: the returned stream is the raw console.
pub async fn attach_console(task_dir: &Path) -> std::io::Result<UnixStream> {
    let mut stream = UnixStream::connect(task_dir.join(protocol::CONTROL_SOCKET)).await?;
    let mut text = serde_json::to_vec(&Request::Console).map_err(std::io::Error::other)?;
    text.push(b'\n');
    stream.write_all(&text).await?;
    // Read the reply byte by byte: what follows it is console output.
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.len() < 4096 {
        stream.read_exact(&mut byte).await?;
        if byte[0] == b'\n' {
            break;
        }
        line.push(byte[0]);
    }
    let reply: Reply =
        serde_json::from_slice(&line).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    if reply.ok { Ok(stream) } else { Err(std::io::Error::other(reply.error.unwrap_or_default())) }
}

/// How long a supervisor may take beyond a stop's timeout: SIGTERM, its
/// grace, SIGKILL, and recording the exit.
pub const STOP_ESCALATION: Duration = Duration::from_secs(10);

/// Asks the supervisor in `task_dir` for a graceful stop within `timeout`
/// (with no supervisor to answer, the VMM's group gets SIGTERM, as systemd
/// would send it) and waits for the VMM and the supervisor in `pids` to exit,
/// for `timeout` plus [`STOP_ESCALATION`]. Says whether they did.
pub async fn stop_and_wait(task_dir: &Path, pids: &Pids, timeout: Duration, reason: Option<String>) -> bool {
    let answer = request(task_dir, &Request::Stop { timeout, reason }, Duration::from_secs(5)).await;
    if !matches!(answer, Ok(ref r) if r.ok)
        && let Some(vmm) = pids.vmm
    {
        vmm.signal_group(Signal::SIGTERM);
    }
    let gone = async {
        for p in pids.vmm.iter().chain(pids.supervisor.iter()) {
            p.exited().await;
        }
    };
    tokio::time::timeout(timeout + STOP_ESCALATION, gone).await.is_ok()
}

/// One request over a task's control socket (used by the plugin).
pub async fn request(task_dir: &Path, req: &Request, limit: Duration) -> std::io::Result<Reply> {
    let path = task_dir.join(protocol::CONTROL_SOCKET);
    let fut = async {
        let mut stream = UnixStream::connect(&path).await?;
        let mut text = serde_json::to_vec(req).map_err(std::io::Error::other)?;
        text.push(b'\n');
        stream.write_all(&text).await?;
        let mut reader = BufReader::new(stream);
        let mut line = String::new();
        reader.read_line(&mut line).await?;
        serde_json::from_str::<Reply>(&line).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
    };
    tokio::time::timeout(limit, fut)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "supervisor did not answer"))?
}

//! The task lifecycle behind Nomad's task RPCs: start, recover, wait, stop,
//! destroy, signal, inspect, stats, events.
//!
//! The plugin keeps only a cache of tracked tasks; the truth is on disk (the
//! task dir the supervisor maintains) and in the handle Nomad stores.

mod claims;
pub mod hold;
mod nixstore;
mod orphan;
pub mod paths;
mod start;
pub mod state;
pub mod stats;
mod virtiofs;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use microvm_proto::drivers::{TaskConfig as ProtoTaskConfig, TaskHandle, TaskState};
use nix::sys::signal::Signal;
use tokio::sync::{broadcast, watch};

use crate::config::{ConfigError, PluginConfig};
use crate::net::HostNet;
use crate::proc::ProcessId;
use crate::supervisor::protocol::{self, ExitRecord, Request};
use crate::supervisor::run::request;
pub use claims::ClaimError;
pub use nixstore::StoreError;
use state::{DriverState, HANDLE_VERSION, StateError};

#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    #[error("task {0} is not known to this driver")]
    NotFound(String),
    #[error("task {0} was already started")]
    AlreadyExists(String),
    #[error("{0} is not supported by the microvm driver")]
    NotImplemented(&'static str),
    #[error("invalid task config")]
    Config(#[source] ConfigError),
    #[error("unusable runner")]
    Runner {
        path: PathBuf,
        #[source]
        source: crate::runner::RunnerError,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("refused by `{rule}`: {detail}")]
    Refused { rule: &'static str, detail: String },
    #[error(
        "socket path {path} is {len} bytes, over the 107-byte limit of unix sockets: use a shorter state_dir or socket name"
    )]
    SocketTooLong { path: PathBuf, len: usize },
    #[error(transparent)]
    Claim(#[from] ClaimError),
    #[error("cannot set up interface {name}")]
    Net {
        name: String,
        #[source]
        source: crate::net::NetError,
    },
    #[error("{0}")]
    Identity(String),
    #[error("cannot {what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the VM did not start: {0}")]
    Boot(String),
    #[error("cannot recover task {id}")]
    State {
        id: String,
        #[source]
        source: StateError,
    },
    #[error("cannot recover task {0}: its VM is gone")]
    Gone(String),
    #[error("{0}")]
    Signal(String),
    #[error("cannot attach to the console")]
    Console(#[source] std::io::Error),
}

impl TaskError {
    /// Whether Nomad should apply the job's restart policy (true) or fail
    /// the task at once (false): config and policy problems do not heal.
    pub fn recoverable(&self) -> bool {
        !matches!(
            self,
            TaskError::Config(_)
                | TaskError::Runner { .. }
                | TaskError::Refused { .. }
                | TaskError::SocketTooLong { .. }
                | TaskError::Identity(_)
                | TaskError::NotImplemented(_)
                | TaskError::State { .. }
                | TaskError::Store(StoreError::NoSubstituters { .. })
        )
    }

    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> TaskError {
        let what = what.into();
        move |source| TaskError::Io { what, source }
    }
}

/// A notable step of a task, shown by `nomad alloc status` as a Driver event.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskEvent {
    pub task_id: String,
    pub alloc_id: String,
    pub task_name: String,
    pub at: SystemTime,
    pub message: String,
    pub annotations: BTreeMap<String, String>,
}

/// How a task ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExitResult {
    pub exit_code: i32,
    pub signal: i32,
    pub oom_killed: bool,
    /// Set when the driver, not the VM, ended it or lost track of it.
    pub err: Option<String>,
}

impl From<ExitRecord> for ExitResult {
    fn from(r: ExitRecord) -> Self {
        ExitResult { exit_code: r.exit_code, signal: r.signal, oom_killed: r.oom_killed, err: r.reason }
    }
}

/// What InspectTask reports.
#[derive(Debug, Clone)]
pub struct Inspection {
    pub id: String,
    pub name: String,
    pub started_at: SystemTime,
    pub completed_at: Option<SystemTime>,
    pub result: Option<ExitResult>,
    pub attributes: BTreeMap<String, String>,
}

pub struct AgentGuard {
    tasks: Arc<Tasks>,
}

impl Drop for AgentGuard {
    fn drop(&mut self) {
        self.tasks.agents.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

struct Tracked {
    proto: ProtoTaskConfig,
    state: DriverState,
    exit: watch::Receiver<Option<(ExitResult, SystemTime)>>,
}

pub struct Tasks {
    config: RwLock<Arc<PluginConfig>>,
    net: Arc<dyn HostNet>,
    /// This binary, re-run as `supervise` per task.
    self_exe: PathBuf,
    tracked: Mutex<HashMap<String, Arc<Tracked>>>,
    events: broadcast::Sender<TaskEvent>,
    /// Open Fingerprint streams: a Nomad agent is connected while > 0.
    agents: std::sync::atomic::AtomicUsize,
}

/// How often the plugin renews each task's agent lease.
const LEASE_RENEWAL: Duration = Duration::from_secs(2);

impl Tasks {
    pub fn new(net: Arc<dyn HostNet>, self_exe: PathBuf) -> Arc<Tasks> {
        Arc::new(Tasks {
            config: RwLock::new(Arc::new(PluginConfig::default())),
            net,
            self_exe,
            tracked: Mutex::new(HashMap::new()),
            events: broadcast::channel(1024).0,
            agents: std::sync::atomic::AtomicUsize::new(0),
        })
    }

    /// A Nomad agent opened a Fingerprint stream; it counts as connected
    /// until the returned guard drops (the stream ends).
    pub fn agent_connected(self: &Arc<Self>) -> AgentGuard {
        self.agents.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        AgentGuard { tasks: self.clone() }
    }

    fn renew_lease(&self, task_dir: &Path) {
        if self.agents.load(std::sync::atomic::Ordering::SeqCst) > 0 {
            let _ = std::fs::write(task_dir.join(protocol::LEASE_FILE), b"");
        }
    }

    pub fn self_exe(&self) -> &Path {
        &self.self_exe
    }

    pub fn configure(&self, config: Arc<PluginConfig>) {
        *self.config.write().unwrap_or_else(|e| e.into_inner()) = config;
    }

    pub fn config(&self) -> Arc<PluginConfig> {
        self.config.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn subscribe(&self) -> broadcast::Receiver<TaskEvent> {
        self.events.subscribe()
    }

    fn emit(&self, task: &ProtoTaskConfig, message: impl Into<String>) {
        self.emit_at(task, message, SystemTime::now());
    }

    /// An event that happened at `at` (a supervisor's, read later from its
    /// file: Nomad shows it with the time it happened).
    fn emit_at(&self, task: &ProtoTaskConfig, message: impl Into<String>, at: SystemTime) {
        let message = message.into();
        tracing::info!(task_id = %task.id, "{message}");
        let _ = self.events.send(TaskEvent {
            task_id: task.id.clone(),
            alloc_id: task.alloc_id.clone(),
            task_name: task.name.clone(),
            at,
            message,
            annotations: BTreeMap::new(),
        });
    }

    fn get(&self, id: &str) -> Option<Arc<Tracked>> {
        self.tracked.lock().unwrap_or_else(|e| e.into_inner()).get(id).cloned()
    }

    fn forget(&self, id: &str) {
        self.tracked.lock().unwrap_or_else(|e| e.into_inner()).remove(id);
    }

    /// StartTask: everything in `start.rs`; returns the handle Nomad persists.
    ///
    /// The start runs to its end even when the caller hangs up (the agent
    /// died or dropped the call): cut short, it would leave taps and claims
    /// behind, or a VM no handle names. A start nobody received is destroyed.
    pub async fn start(self: &Arc<Self>, task: ProtoTaskConfig) -> Result<TaskHandle, TaskError> {
        let (reply, received) = tokio::sync::oneshot::channel();
        let me = self.clone();
        tokio::spawn(async move {
            let id = task.id.clone();
            let result = me.start_to_end(task).await;
            if let Err(Ok(_)) = reply.send(result) {
                tracing::warn!(task_id = %id, "the agent hung up during StartTask: removing the VM it never got a handle for");
                if let Err(e) = me.destroy(&id, true).await {
                    tracing::error!(task_id = %id, error = %crate::service::status::chain(&e), "cannot remove the unclaimed VM");
                }
            }
        });
        received.await.map_err(|_| TaskError::Boot("the start was interrupted".into()))?
    }

    async fn start_to_end(self: &Arc<Self>, task: ProtoTaskConfig) -> Result<TaskHandle, TaskError> {
        if self.get(&task.id).is_some() {
            return Err(TaskError::AlreadyExists(task.id));
        }
        let state = start::start(self, &task).await?;
        // From here on the VM is Nomad's to stop; without this mark the
        // supervisor would remove it when this plugin dies.
        if let Err(e) = std::fs::write(state.task_dir.join(protocol::COMMITTED_FILE), b"") {
            tracing::error!(task_id = %task.id, error = %e, "cannot confirm the start to the supervisor");
        }
        // The start itself is an agent's doing, connected or not yet counted.
        let _ = std::fs::write(state.task_dir.join(protocol::LEASE_FILE), b"");
        let handle = TaskHandle {
            version: HANDLE_VERSION,
            config: Some(task.clone()),
            state: TaskState::Running as i32,
            driver_state: state.encode(),
        };
        self.track(task, state, 0);
        Ok(handle)
    }

    /// Follows a task's supervisor: forwards its events and, when it exits,
    /// publishes the exit result for WaitTask.
    fn track(self: &Arc<Self>, proto: ProtoTaskConfig, state: DriverState, events_offset: u64) {
        let (tx, rx) = watch::channel(None);
        let tracked = Arc::new(Tracked { proto: proto.clone(), state: state.clone(), exit: rx });
        self.tracked.lock().unwrap_or_else(|e| e.into_inner()).insert(proto.id.clone(), tracked);
        let me = self.clone();
        tokio::spawn(async move {
            let result = me.follow(&proto, &state, events_offset).await;
            let _ = tx.send(Some((result, SystemTime::now())));
        });
    }

    async fn follow(&self, proto: &ProtoTaskConfig, state: &DriverState, mut offset: u64) -> ExitResult {
        let events_path = state.task_dir.join(protocol::EVENTS_FILE);
        if let Some(sup) = state.supervisor {
            let exited = sup.exited();
            tokio::pin!(exited);
            let mut renewed = std::time::Instant::now() - LEASE_RENEWAL;
            loop {
                if renewed.elapsed() >= LEASE_RENEWAL {
                    self.renew_lease(&state.task_dir);
                    renewed = std::time::Instant::now();
                }
                tokio::select! {
                    _ = &mut exited => break,
                    _ = tokio::time::sleep(Duration::from_millis(250)) => {
                        offset = self.forward_events(proto, &events_path, offset);
                    }
                }
            }
        }
        self.forward_events(proto, &events_path, offset);
        if let Ok(record) = protocol::read_json::<ExitRecord>(&state.task_dir.join(protocol::EXIT_FILE)) {
            return record.into();
        }
        // The supervisor died without recording an exit (killed): follow the
        // VMM directly; its status is then unknown.
        if let Some(vmm) = state.vmm.filter(ProcessId::is_alive) {
            self.emit(proto, "the task's supervisor died; the VM keeps running without console logging until it exits");
            vmm.exited().await;
            return ExitResult {
                exit_code: -1,
                signal: 0,
                oom_killed: false,
                err: Some("the VMM exited while unsupervised; its exit status is unknown".into()),
            };
        }
        ExitResult {
            exit_code: -1,
            signal: 0,
            oom_killed: false,
            err: Some("the task's supervisor and VMM are gone without an exit record".into()),
        }
    }

    /// Sends events appended since `offset`; returns the new offset.
    fn forward_events(&self, proto: &ProtoTaskConfig, path: &Path, offset: u64) -> u64 {
        use std::io::{Read, Seek, SeekFrom};
        let Ok(mut f) = std::fs::File::open(path) else { return offset };
        if f.seek(SeekFrom::Start(offset)).is_err() {
            return offset;
        }
        let mut text = String::new();
        let _ = f.read_to_string(&mut text);
        // Only whole lines; a partial last line is read next time.
        let complete = text.rfind('\n').map(|i| i + 1).unwrap_or(0);
        for line in text[..complete].lines() {
            if let Ok(ev) = serde_json::from_str::<protocol::Event>(line) {
                self.emit_at(proto, ev.message, SystemTime::UNIX_EPOCH + Duration::from_millis(ev.at_ms));
            }
        }
        offset + complete as u64
    }

    /// RecoverTask: re-attach to a task from its handle alone.
    pub async fn recover(self: &Arc<Self>, handle: TaskHandle) -> Result<(), TaskError> {
        let proto = handle.config.clone().unwrap_or_default();
        let id = proto.id.clone();
        if self.get(&id).is_some() {
            return Ok(());
        }
        let state = DriverState::decode(handle.version, &handle.driver_state)
            .map_err(|source| TaskError::State { id: id.clone(), source })?;
        let supervised = state.supervisor.map(|s| s.is_alive()).unwrap_or(false);
        let recorded = state.task_dir.join(protocol::EXIT_FILE).exists();
        let vmm_alive = state.vmm.map(|v| v.is_alive()).unwrap_or(false);
        if !(supervised || recorded || vmm_alive) {
            self.cleanup(&state).await;
            return Err(TaskError::Gone(id));
        }
        // Events already in the file were forwarded before the restart.
        let offset = std::fs::metadata(state.task_dir.join(protocol::EVENTS_FILE)).map(|m| m.len()).unwrap_or(0);
        tracing::info!(task_id = %id, supervised, recorded, vmm_alive, "recovered task");
        self.track(proto, state, offset);
        Ok(())
    }

    /// WaitTask: the exit result, once there is one.
    pub async fn wait(&self, id: &str) -> Result<ExitResult, TaskError> {
        let tracked = self.get(id).ok_or_else(|| TaskError::NotFound(id.to_string()))?;
        let mut rx = tracked.exit.clone();
        let result = rx.wait_for(|r| r.is_some()).await.map(|r| r.as_ref().map(|(e, _)| e.clone())).ok().flatten();
        result.ok_or_else(|| TaskError::NotFound(id.to_string()))
    }

    fn exited(tracked: &Tracked) -> bool {
        tracked.exit.borrow().is_some()
    }

    /// StopTask: graceful shutdown within `timeout`, then force. Returns once
    /// the VM is gone. Unknown or finished tasks are fine.
    pub async fn stop(&self, id: &str, timeout: Duration, signal: &str) -> Result<(), TaskError> {
        let Some(tracked) = self.get(id) else { return Ok(()) };
        if Self::exited(&tracked) {
            return Ok(());
        }
        let timeout = if matches!(signal, "SIGKILL" | "KILL" | "9") { Duration::ZERO } else { timeout };
        let state = &tracked.state;
        let asked = request(&state.task_dir, &Request::Stop { timeout, reason: None }, Duration::from_secs(5)).await;
        if !matches!(asked, Ok(ref r) if r.ok) {
            // No supervisor to ask: stop the VMM ourselves.
            self.emit(&tracked.proto, "supervisor unreachable: stopping the VMM directly");
            if let Some(vmm) = state.vmm.filter(ProcessId::is_alive) {
                vmm.signal_group(Signal::SIGTERM);
                if tokio::time::timeout(timeout, vmm.exited()).await.is_err() {
                    vmm.signal_group(Signal::SIGKILL);
                }
            }
        }
        let mut rx = tracked.exit.clone();
        let budget = timeout + Duration::from_secs(20);
        if tokio::time::timeout(budget, rx.wait_for(|r| r.is_some())).await.is_err() {
            self.emit(&tracked.proto, "the VM did not stop in time: killing it and its supervisor");
            state.vmm.iter().chain(state.supervisor.iter()).for_each(ProcessId::kill_with_group);
            let _ = tokio::time::timeout(Duration::from_secs(5), rx.wait_for(|r| r.is_some())).await;
        }
        Ok(())
    }

    /// DestroyTask: kill if needed, then release everything but the VM's
    /// volume images.
    pub async fn destroy(&self, id: &str, force: bool) -> Result<(), TaskError> {
        let Some(tracked) = self.get(id) else { return Ok(()) };
        if !Self::exited(&tracked) {
            if !force {
                return Err(TaskError::Signal("cannot destroy a running task without force".into()));
            }
            self.stop(id, Duration::ZERO, "SIGKILL").await?;
        }
        self.cleanup(&tracked.state).await;
        self.forget(id);
        Ok(())
    }

    /// Removes what a task created on the host (idempotent).
    async fn cleanup(&self, state: &DriverState) {
        let hold = state.hold();
        let net = self.net.clone();
        let _ = tokio::task::spawn_blocking(move || hold.release(net.as_ref())).await;
    }

    /// SignalTask: INT/TERM become a graceful guest shutdown; the rest go to
    /// the VMM.
    pub async fn signal(&self, id: &str, signal: &str) -> Result<(), TaskError> {
        let tracked = self.get(id).ok_or_else(|| TaskError::NotFound(id.to_string()))?;
        let sig = parse_signal(signal).ok_or_else(|| TaskError::Signal(format!("unknown signal {signal:?}")))?;
        let reply = request(&tracked.state.task_dir, &Request::Signal { signal: sig as i32 }, Duration::from_secs(5))
            .await
            .map_err(TaskError::io("reach the task's supervisor"))?;
        if reply.ok { Ok(()) } else { Err(TaskError::Signal(reply.error.unwrap_or_default())) }
    }

    pub fn inspect(&self, id: &str) -> Result<Inspection, TaskError> {
        let tracked = self.get(id).ok_or_else(|| TaskError::NotFound(id.to_string()))?;
        let exit = tracked.exit.borrow().clone();
        let s = &tracked.state;
        let mut attributes = BTreeMap::new();
        attributes.insert("runner".into(), s.runner.display().to_string());
        attributes.insert("work_dir".into(), s.work_dir.display().to_string());
        attributes.insert("task_dir".into(), s.task_dir.display().to_string());
        if let Some(v) = s.vmm {
            attributes.insert("vmm_pid".into(), v.pid.to_string());
        }
        Ok(Inspection {
            id: id.to_string(),
            name: tracked.proto.name.clone(),
            started_at: SystemTime::UNIX_EPOCH + Duration::from_millis(s.started_at_ms),
            completed_at: exit.as_ref().map(|(_, t)| *t),
            result: exit.map(|(r, _)| r),
            attributes,
        })
    }

    /// Attaches to the VM's serial console (see `supervisor::console`).
    pub async fn console(&self, id: &str) -> Result<tokio::net::UnixStream, TaskError> {
        let tracked = self.get(id).ok_or_else(|| TaskError::NotFound(id.to_string()))?;
        if Self::exited(&tracked) {
            return Err(TaskError::Signal("the VM is not running".into()));
        }
        crate::supervisor::run::attach_console(&tracked.state.task_dir).await.map_err(TaskError::Console)
    }

    /// Where the guest's vsock is, from the booted runner, for `alloc exec`;
    /// `None` when the guest has none.
    pub fn guest_address(&self, id: &str) -> Result<Option<crate::vsock::GuestAddress>, TaskError> {
        let tracked = self.get(id).ok_or_else(|| TaskError::NotFound(id.to_string()))?;
        let runner = crate::runner::Runner::read(&tracked.state.runner)
            .map_err(|source| TaskError::Runner { path: tracked.state.runner.clone(), source })?;
        Ok(crate::vsock::GuestAddress::of(&runner, &tracked.state.work_dir))
    }

    /// The processes whose usage is the task's: VMM, virtiofsd (with the
    /// sandbox child that does its work: `--sandbox=namespace` forks),
    /// supervisor.
    pub fn usage_pids(&self, id: &str) -> Result<Vec<ProcessId>, TaskError> {
        let tracked = self.get(id).ok_or_else(|| TaskError::NotFound(id.to_string()))?;
        let pids = protocol::read_json::<protocol::Pids>(&tracked.state.task_dir.join(protocol::PIDS_FILE))
            .unwrap_or_default();
        let virtiofsd = pids.virtiofsd.iter().map(|(_, p)| *p).flat_map(|p| std::iter::once(p).chain(p.children()));
        Ok(pids
            .vmm
            .iter()
            .copied()
            .chain(virtiofsd)
            .chain(pids.supervisor.iter().copied())
            .filter(ProcessId::is_alive)
            .collect())
    }
}

/// "SIGHUP", "HUP" or "1" → the signal.
pub fn parse_signal(text: &str) -> Option<Signal> {
    if let Ok(n) = text.parse::<i32>() {
        return Signal::try_from(n).ok();
    }
    let upper = text.trim().to_ascii_uppercase();
    let name = if upper.starts_with("SIG") { upper } else { format!("SIG{upper}") };
    name.parse::<Signal>().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_parse_by_name_and_number() {
        assert_eq!(parse_signal("SIGHUP"), Some(Signal::SIGHUP));
        assert_eq!(parse_signal("term"), Some(Signal::SIGTERM));
        assert_eq!(parse_signal("9"), Some(Signal::SIGKILL));
        assert_eq!(parse_signal("SIGNOPE"), None);
    }

    #[test]
    fn policy_errors_are_not_recoverable() {
        assert!(!TaskError::Refused { rule: "allowed_runner_roots", detail: String::new() }.recoverable());
        assert!(!TaskError::SocketTooLong { path: "/x".into(), len: 200 }.recoverable());
        assert!(TaskError::Boot("virtiofsd exited".into()).recoverable());
    }
}

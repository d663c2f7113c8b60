//! A VM of an earlier start of the same task that Nomad never got a handle
//! for.
//!
//! When the plugin dies during a StartTask, Nomad sees the start fail and
//! starts the task again on the next plugin, with a new task id or (after
//! "driver exited unexpectedly") the same one. What the dead plugin's start
//! left is still there: a supervisor removing its uncommitted VM, or — if
//! the plugin died between committing the start and answering — a committed
//! VM its supervisor keeps. Nomad runs one start of a task at a time, so a
//! start of the same alloc and task that finds such a task (one this plugin
//! neither started nor recovered) in its VM directory's claim or its own
//! task dir knows Nomad has given it up. A committed VM that still runs the
//! same runner into the same log FIFOs becomes this start's VM (adopted):
//! nothing restarts, and the console keeps flowing — logmon reads a FIFO
//! only until its first EOF, so a replacement VM would write to nobody.
//! Anything else is stopped, waited for and released before the new start
//! goes on, rather than raced.

use std::path::Path;
use std::time::Duration;

use microvm_proto::drivers::TaskConfig as ProtoTaskConfig;

use super::Tasks;
use super::state::DriverState;
use crate::config::TaskConfig;
use crate::proc::ProcessId;
use crate::supervisor::protocol::{self, LaunchSpec, Pids};

/// Whether `owner` (a claim's task dir) is an earlier start of `task` that
/// nobody follows.
fn is_orphan_of(tasks: &Tasks, task: &ProtoTaskConfig, owner: &Path) -> Option<LaunchSpec> {
    let spec: LaunchSpec = protocol::read_json(&owner.join(protocol::SPEC_FILE)).ok()?;
    let same_task = spec.task_id.starts_with(&format!("{}/{}/", task.alloc_id, task.name));
    // A tracked task of the same id never gets here: the start is refused first.
    (same_task && tasks.get(&spec.task_id).is_none()).then_some(spec)
}

/// The orphan at `owner` as this start's VM, if it can be: committed, its
/// supervisor and VMM alive, no exit recorded, booted from `runner`, writing
/// to this start's log FIFOs.
pub(super) fn adopt(
    tasks: &Tasks,
    task: &ProtoTaskConfig,
    owner: &Path,
    config: &TaskConfig,
    runner: &Path,
    stdout: &Path,
) -> Option<DriverState> {
    let spec = is_orphan_of(tasks, task, owner)?;
    let pids: Pids = protocol::read_json(&owner.join(protocol::PIDS_FILE)).ok()?;
    let alive = |p: Option<ProcessId>| p.is_some_and(|p| p.is_alive());
    let usable = owner.join(protocol::COMMITTED_FILE).exists()
        && !owner.join(protocol::EXIT_FILE).exists()
        && alive(pids.supervisor)
        && alive(pids.vmm)
        && spec.runner == runner
        && spec.stdout_path == stdout;
    if !usable {
        return None;
    }
    tasks.emit(
        task,
        format!("an earlier start of this task ({}) runs its VM, unknown to Nomad: taking it over", spec.task_id),
    );
    Some(DriverState {
        task_dir: spec.task_dir,
        work_dir: spec.work_dir,
        slug: spec.hold.slug,
        config: config.clone(),
        runner: spec.runner,
        hostname: spec.hostname,
        // Only ever used together, as what to delete.
        taps: spec.hold.interfaces,
        macvtaps: Vec::new(),
        gcroot: spec.hold.gcroot,
        cgroup: spec.hold.cgroup,
        vsock_cid: spec.hold.vsock_cid,
        supervisor: pids.supervisor,
        vmm: pids.vmm,
        started_at_ms: protocol::now_ms(),
    })
}

/// Stops and releases the orphan at `owner`, if it is one; says whether it was.
pub(super) async fn reclaim(tasks: &Tasks, task: &ProtoTaskConfig, owner: &Path) -> bool {
    let Some(spec) = is_orphan_of(tasks, task, owner) else { return false };
    tasks.emit(
        task,
        format!("an earlier start of this task ({}) left its VM behind, unknown to Nomad: removing it", spec.task_id),
    );
    let timeout = tasks.config().default_stop_timeout;
    let pids: Pids = protocol::read_json(&owner.join(protocol::PIDS_FILE)).unwrap_or_default();
    if !crate::supervisor::run::stop_and_wait(owner, &pids, timeout, None).await {
        pids.vmm.iter().chain(pids.supervisor.iter()).for_each(ProcessId::kill_with_group);
        for p in pids.virtiofsd.iter().map(|(_, p)| p) {
            p.signal(nix::sys::signal::Signal::SIGKILL);
        }
        for p in pids.supervisor.iter().chain(pids.vmm.iter()) {
            let _ = tokio::time::timeout(Duration::from_secs(5), p.exited()).await;
        }
    }
    let hold = spec.hold.clone();
    let net = tasks.net.clone();
    let _ = tokio::task::spawn_blocking(move || hold.release(net.as_ref())).await;
    true
}

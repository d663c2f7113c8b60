//! A VM of an earlier start of the same task that Nomad never got a handle
//! for.
//!
//! The plugin marks a start committed just before StartTask answers. Killed
//! between the two, it leaves a committed VM (its supervisor keeps it) while
//! Nomad saw StartTask fail and starts the task again. Nomad runs one start
//! of a task at a time, so when a new start of the same alloc and task finds
//! the VM directory claimed by a live task this plugin does not follow (it
//! neither started nor recovered it), Nomad has given that one up: it is
//! stopped and released, and the new start goes on.

use std::path::Path;
use std::time::Duration;

use microvm_proto::drivers::TaskConfig as ProtoTaskConfig;

use super::Tasks;
use crate::proc::ProcessId;
use crate::supervisor::protocol::{self, LaunchSpec, Pids, Request};

/// Whether `owner` (a claim's task dir) is an earlier start of `task` that
/// nobody follows.
fn is_orphan_of(tasks: &Tasks, task: &ProtoTaskConfig, owner: &Path) -> Option<LaunchSpec> {
    let spec: LaunchSpec = protocol::read_json(&owner.join(protocol::SPEC_FILE)).ok()?;
    let same_task = spec.task_id.starts_with(&format!("{}/{}/", task.alloc_id, task.name));
    (same_task && spec.task_id != task.id && tasks.get(&spec.task_id).is_none()).then_some(spec)
}

/// Stops and releases the orphan at `owner`, if it is one; says whether it was.
pub(super) async fn reclaim(tasks: &Tasks, task: &ProtoTaskConfig, owner: &Path) -> bool {
    let Some(spec) = is_orphan_of(tasks, task, owner) else { return false };
    tasks.emit(
        task,
        format!("an earlier start of this task ({}) still runs its VM, unknown to Nomad: stopping it", spec.task_id),
    );
    let timeout = tasks.config().default_stop_timeout;
    let _ =
        crate::supervisor::run::request(owner, &Request::Stop { timeout, reason: None }, Duration::from_secs(5)).await;
    let pids: Pids = protocol::read_json(&owner.join(protocol::PIDS_FILE)).unwrap_or_default();
    let gone = async {
        for p in pids.supervisor.iter().chain(pids.vmm.iter()) {
            p.exited().await;
        }
    };
    if tokio::time::timeout(timeout + Duration::from_secs(10), gone).await.is_err() {
        for p in pids.vmm.iter().chain(pids.supervisor.iter()) {
            p.signal_group(nix::sys::signal::Signal::SIGKILL);
            p.signal(nix::sys::signal::Signal::SIGKILL);
        }
        for p in pids.virtiofsd.iter().map(|(_, p)| p) {
            p.signal(nix::sys::signal::Signal::SIGKILL);
        }
        let all: Vec<ProcessId> = pids.supervisor.iter().chain(pids.vmm.iter()).copied().collect();
        for p in all {
            let _ = tokio::time::timeout(Duration::from_secs(5), p.exited()).await;
        }
    }
    let hold = spec.hold.clone();
    let net = tasks.net.clone();
    let _ = tokio::task::spawn_blocking(move || hold.release(net.as_ref())).await;
    true
}

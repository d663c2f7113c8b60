//! Registering a VM's job and following it until the VM runs (or fails),
//! and stopping a job, with a readable log for the pusher.
//!
//! The line between "the ref is rejected" and "the ref moves" is the
//! registration: anything that fails before Nomad has accepted the job is
//! an error (nothing was changed, the branch does not move); what happens
//! after (placement, boot, health) is reported but does not undo the push —
//! the branch then says what Nomad was asked to run, which is what a later
//! push or `status` builds on.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::config::JobConfig;
use crate::job::{JobSpec, TASK};
use crate::nomad::{Allocation, Client, Evaluation, NomadError, TaskEvent};
use crate::report::{Log, short};

const POLL: Duration = Duration::from_millis(500);

#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    #[error("job not registered")]
    BeforeRegistration(#[source] NomadError),
}

/// Registers `spec` (unless Nomad already runs exactly it) and follows the
/// deployment for at most `follow_for`.
pub fn deploy(
    nomad: &Client,
    spec: &JobSpec,
    policy: &JobConfig,
    follow_for: Duration,
    log: &Log,
) -> Result<(), DeployError> {
    let ns = &spec.namespace;
    let id = spec.branch.as_str();
    let existing = nomad.job(ns, id).map_err(DeployError::BeforeRegistration)?;
    if let Some(job) = &existing
        && spec.is_deployed_in(job, policy)
    {
        log.say(format!(
            "unchanged: job {id} version {} already runs {} (status {})",
            job["Version"],
            spec.runner,
            job["Status"].as_str().unwrap_or("?")
        ));
        return Ok(());
    }
    // Created only when missing, so a token limited to existing namespaces
    // works where the operator creates them beforehand.
    if !nomad.namespace_exists(ns).map_err(DeployError::BeforeRegistration)? {
        let description = format!("gitfront: {}'s repo {}", spec.user, spec.repo);
        nomad.ensure_namespace(ns, &description).map_err(DeployError::BeforeRegistration)?;
    }
    let registered = nomad.register(ns, &spec.register_body(policy)).map_err(DeployError::BeforeRegistration)?;
    if !registered.warnings.is_empty() {
        log.say(format!("Nomad warns: {}", registered.warnings.trim()));
    }
    // From here on the job is registered: problems are reported, not returned.
    let deadline = Instant::now() + follow_for;
    let version = match nomad.job(ns, id) {
        Ok(Some(job)) => job["Version"].as_u64().unwrap_or(0),
        Ok(None) => {
            log.say(format!("registered job {id}, but Nomad does not show it"));
            return Ok(());
        }
        Err(e) => {
            log.say(format!("registered job {id}, then lost Nomad: {}", crate::error_chain(&e)));
            return Ok(());
        }
    };
    log.say(format!(
        "registered job {id} version {version} in namespace {ns} (evaluation {})",
        short(&registered.eval_id)
    ));
    let followed = Followed { nomad, ns, id, version, deadline, log };
    let outcome = followed.follow(&registered.eval_id, spec.resources(policy)).unwrap_or_else(|e| {
        log.say(format!("stopped following the deployment: {}", crate::error_chain(&e)));
        Outcome::Unknown
    });
    // The push succeeds for this ref all the same: say so, and what now.
    match outcome {
        Outcome::Failed => log.say(format!(
            "the branch moves anyway: job {id} version {version} stays registered and Nomad reschedules it; \
             push a fix, or delete the branch (`git push <remote> :{id}`) to stop it"
        )),
        Outcome::Unplaced => log.say(format!(
            "the branch moves anyway: job {id} version {version} stays registered and waits for a node that \
             can take it; push a change, or delete the branch (`git push <remote> :{id}`) to drop it"
        )),
        Outcome::Running | Outcome::Unknown => {}
    }
    Ok(())
}

/// How following a registered job ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// Running: healthy in its deployment (or up, where there is none).
    Running,
    /// Nomad could not place it; a blocked evaluation waits for a node.
    Unplaced,
    /// Placed, but the task failed, or the deployment did.
    Failed,
    /// Still on its way when gitfront stopped waiting, or unclear.
    Unknown,
}

/// Task events that say why a task stopped (Nomad's `TaskEvent` types).
const FAILURE_EVENTS: &[&str] = &[
    "Terminated",
    "Driver Failure",
    "Setup Failure",
    "Failed Validation",
    "Failed Artifact Download",
    "Task hook failed",
    "Killed",
    "Sibling Task Failed",
];

/// How much of a failed task's stderr (the VMM's, e.g. microvm-run saying
/// why it cannot start) the push shows.
const STDERR_TAIL_BYTES: u64 = 4096;
const STDERR_TAIL_LINES: usize = 10;

/// Why a failed allocation failed, in Nomad's words: the task's last
/// failure event, its restarts and why Nomad stopped restarting it;
/// otherwise the allocation's client description ("Failed tasks" says
/// little on its own).
fn failure_reason(a: &Allocation) -> String {
    let alloc_why =
        if a.client_description.is_empty() { a.client_status.clone() } else { a.client_description.clone() };
    let Some(task) = a.task(TASK) else { return alloc_why };
    let text = |e: &TaskEvent| if e.display_message.is_empty() { e.kind.clone() } else { e.display_message.clone() };
    let mut why = Vec::new();
    if let Some(e) = task.last_event(FAILURE_EVENTS) {
        why.push(text(e));
    }
    if let Some(e) = task.last_event(&["Not Restarting"]) {
        why.push(format!("not restarted: {}", text(e)));
    }
    if why.is_empty() {
        return alloc_why;
    }
    let restarts = match task.restarts {
        0 => String::new(),
        1 => " after 1 restart".into(),
        n => format!(" after {n} restarts"),
    };
    let verb = if task.failed { "failed" } else { "stopped" };
    format!("task {TASK} {verb}{restarts}: {}", why.join("; "))
}

/// The last `lines` non-empty lines of a log tail read from its last
/// `asked` bytes (a full read may begin inside a line: that one is
/// dropped), control characters replaced.
fn tail_lines(text: &str, asked: u64, lines: usize) -> Vec<String> {
    let mut all: Vec<&str> = text.lines().collect();
    if text.len() as u64 >= asked && all.len() > 1 {
        all.remove(0);
    }
    all.retain(|l| !l.trim().is_empty());
    all[all.len().saturating_sub(lines)..]
        .iter()
        .map(|l| l.chars().map(|c| if c.is_control() && c != '\t' { '\u{fffd}' } else { c }).collect())
        .collect()
}

/// Waits for an evaluation to finish; returns it (or `None` on timeout).
fn wait_eval(nomad: &Client, ns: &str, eval_id: &str, deadline: Instant) -> Result<Option<Evaluation>, NomadError> {
    loop {
        let ev = nomad.evaluation(ns, eval_id)?;
        if ev.status != "pending" {
            return Ok(Some(ev));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        std::thread::sleep(POLL);
    }
}

/// The events after `last` (the last one printed), and whether some in
/// between are gone. Nomad keeps only a task's last 10 events, so they are
/// found again by the last one printed (its time, type and message), not
/// by count.
fn unseen_events<'a>(events: &'a [TaskEvent], last: Option<&TaskEvent>) -> (&'a [TaskEvent], bool) {
    match last {
        None => (events, false),
        Some(last) => match events.iter().rposition(|e| e == last) {
            Some(i) => (&events[i + 1..], false),
            None => (events, true),
        },
    }
}

/// Prints the task events of `a` not printed yet (`printed`: the last one
/// printed per allocation).
fn print_events(a: &Allocation, printed: &mut BTreeMap<String, TaskEvent>, log: &Log) {
    let Some(events) = a.task(TASK).and_then(|t| t.events.as_ref()) else { return };
    let (new, gap) = unseen_events(events, printed.get(&a.id));
    if gap {
        log.say("  … (Nomad no longer keeps the events in between)");
    }
    for e in new {
        if e.display_message.is_empty() {
            log.say(format!("  {}", e.kind));
        } else {
            log.say(format!("  {}: {}", e.kind, e.display_message));
        }
    }
    if let Some(last) = events.last() {
        printed.insert(a.id.clone(), last.clone());
    }
}

/// One registered job version being followed.
struct Followed<'a> {
    nomad: &'a Client,
    ns: &'a str,
    id: &'a str,
    version: u64,
    deadline: Instant,
    log: &'a Log,
}

impl Followed<'_> {
    /// Follows the evaluation, the allocation and the deployment;
    /// `resources` = (CPU MHz, memory MiB) the job asks for.
    fn follow(&self, eval_id: &str, resources: (u64, u64)) -> Result<Outcome, NomadError> {
        let (nomad, ns, log) = (self.nomad, self.ns, self.log);
        let Some(ev) = wait_eval(nomad, ns, eval_id, self.deadline)? else {
            log.say(format!("evaluation {} still pending; `status` will show how it goes", short(eval_id)));
            return Ok(Outcome::Unknown);
        };
        if ev.status != "complete" {
            log.say(format!("evaluation {} {}: {}", short(&ev.id), ev.status, ev.status_description));
            return Ok(Outcome::Unknown);
        }
        if let Some(failed) = ev.failed_tg_allocs.as_ref().filter(|f| !f.is_empty()) {
            let (cpu, mem) = resources;
            for (group, metric) in failed {
                log.say(format!(
                    "cannot place the VM (group {group}: {cpu} MHz CPU, {mem} MiB memory): {}",
                    metric.summary()
                ));
            }
            if !ev.blocked_eval.is_empty() {
                log.say(format!(
                    "Nomad will place it once a node fits (blocked evaluation {})",
                    short(&ev.blocked_eval)
                ));
            }
            return Ok(Outcome::Unplaced);
        }
        match self.follow_allocation()? {
            Outcome::Running => self.follow_deployment(),
            other => Ok(other),
        }
    }

    /// Follows the newest allocation of the version until it is healthy in
    /// its deployment or has failed. "Running" is the deployment's
    /// verdict (the task ran for the update's `MinHealthyTime`), not a
    /// task state seen once: a VM that exits at once is "running" between
    /// each restart and its exit.
    fn follow_allocation(&self) -> Result<Outcome, NomadError> {
        let (nomad, ns, id, log) = (self.nomad, self.ns, self.id, self.log);
        let mut placed: Option<String> = None;
        let mut printed = BTreeMap::new();
        let mut has_deployment: Option<bool> = None;
        loop {
            let allocs = nomad.allocations(ns, id)?;
            if let Some(a) = allocs.iter().find(|a| a.job_version == self.version && a.desired_status == "run") {
                if placed.as_deref() != Some(a.id.as_str()) {
                    log.say(format!("allocation {} placed on node {}", a.short_id(), a.node_name));
                    placed = Some(a.id.clone());
                }
                print_events(a, &mut printed, log);
                if a.is_terminal() || a.healthy() == Some(false) {
                    let unhealthy = if a.is_terminal() { "" } else { "unhealthy: " };
                    log.say(format!(
                        "FAILED on node {} (allocation {}): {unhealthy}{}",
                        a.node_name,
                        a.short_id(),
                        failure_reason(a)
                    ));
                    self.show_stderr(a);
                    return Ok(Outcome::Failed);
                }
                let task_running = a.client_status == "running" && a.task(TASK).is_some_and(|t| t.state == "running");
                if task_running && has_deployment.is_none() {
                    // Jobs registered with an identical spec get no
                    // deployment, and so no health: then the task state is
                    // all there is.
                    let d = nomad.latest_deployment(ns, id)?;
                    has_deployment = Some(d.is_some_and(|d| d.job_version == self.version));
                }
                if a.healthy() == Some(true) || (task_running && has_deployment == Some(false)) {
                    log.say(format!("running on node {} (allocation {})", a.node_name, a.short_id()));
                    return Ok(Outcome::Running);
                }
            }
            if Instant::now() >= self.deadline {
                log.say("not running yet; stopped waiting (`ssh … status` shows how it goes)");
                return Ok(Outcome::Unknown);
            }
            std::thread::sleep(POLL);
        }
    }

    /// The deployment turns successful once the allocation is healthy.
    fn follow_deployment(&self) -> Result<Outcome, NomadError> {
        let (nomad, ns, id, log) = (self.nomad, self.ns, self.id, self.log);
        loop {
            match nomad.latest_deployment(ns, id)? {
                Some(d) if d.job_version == self.version && d.status != "running" && d.status != "pending" => {
                    let desc = if d.status_description.is_empty() {
                        String::new()
                    } else {
                        format!(": {}", d.status_description)
                    };
                    log.say(format!("deployment {} {}{desc}", short(&d.id), d.status));
                    return Ok(match d.status.as_str() {
                        "successful" => Outcome::Running,
                        "failed" => Outcome::Failed,
                        _ => Outcome::Unknown,
                    });
                }
                Some(_) | None if Instant::now() >= self.deadline => {
                    log.say("deployment not finished yet; stopped waiting");
                    return Ok(Outcome::Unknown);
                }
                // Jobs registered with an identical spec get no deployment.
                None => return Ok(Outcome::Running),
                Some(_) => std::thread::sleep(POLL),
            }
        }
    }

    /// The tail of a failed task's stderr: what the VMM said.
    fn show_stderr(&self, a: &Allocation) {
        match self.nomad.task_log_tail(self.ns, &a.id, TASK, "stderr", STDERR_TAIL_BYTES) {
            Ok(text) => {
                let lines = tail_lines(&text, STDERR_TAIL_BYTES, STDERR_TAIL_LINES);
                if lines.is_empty() {
                    self.log.say(format!("task {TASK} wrote nothing to stderr"));
                } else {
                    self.log.say(format!("last {} line(s) of task {TASK}'s stderr:", lines.len()));
                    self.log.quote(&lines);
                }
            }
            Err(e) => self.log.say(format!("cannot show task {TASK}'s stderr: {}", crate::error_chain(&e))),
        }
    }
}

/// Stops the job of a deleted branch and waits (at most `follow_for`) for
/// its VM to be gone. An error means nothing was stopped.
pub fn stop(nomad: &Client, ns: &str, id: &str, follow_for: Duration, log: &Log) -> Result<(), NomadError> {
    let job = nomad.job(ns, id)?;
    if job.as_ref().is_none_or(|j| j["Stop"] == true) {
        log.say(format!("no running job {id} in namespace {ns}: nothing to stop"));
        return Ok(());
    }
    let Some(eval_id) = nomad.stop(ns, id)? else {
        log.say(format!("job {id} vanished before it could be stopped"));
        return Ok(());
    };
    log.say(format!("stopping job {id} in namespace {ns} (evaluation {})", short(&eval_id)));
    let deadline = Instant::now() + follow_for;
    loop {
        let allocs = nomad.allocations(ns, id)?;
        let live: Vec<&Allocation> = allocs.iter().filter(|a| !a.is_terminal()).collect();
        if allocs.is_empty() {
            log.say(format!("stopped job {id}: it had no VM"));
            return Ok(());
        }
        if live.is_empty() {
            log.say(format!("stopped job {id}: its VM is gone"));
            return Ok(());
        }
        if Instant::now() >= deadline {
            for a in live {
                log.say(format!("allocation {} on node {} is still {}", a.short_id(), a.node_name, a.client_status));
            }
            return Ok(());
        }
        std::thread::sleep(POLL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alloc(v: serde_json::Value) -> Allocation {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn a_failed_task_is_explained_by_its_events() {
        // What Nomad reports for a runner that exits 1 at once, with
        // gitfront's restart policy (2 attempts, then fail).
        let a = alloc(serde_json::json!({
            "ID": "8e01505e-0000", "ClientStatus": "failed", "ClientDescription": "Failed tasks",
            "TaskStates": {"vm": {"State": "dead", "Failed": true, "Restarts": 2, "Events": [
                {"Type": "Started", "DisplayMessage": "Task started by client"},
                {"Type": "Driver", "DisplayMessage": "VM exited with code 1"},
                {"Type": "Terminated", "DisplayMessage": "Exit Code: 1"},
                {"Type": "Not Restarting", "DisplayMessage": "Exceeded allowed attempts 2 in interval 10m0s and mode is \"fail\""}
            ]}}
        }));
        assert_eq!(
            failure_reason(&a),
            "task vm failed after 2 restarts: Exit Code: 1; not restarted: Exceeded allowed attempts 2 in interval 10m0s and mode is \"fail\""
        );
        let start = alloc(serde_json::json!({
            "ClientStatus": "failed", "ClientDescription": "Failed tasks",
            "TaskStates": {"vm": {"State": "dead", "Failed": true, "Events": [
                {"Type": "Driver Failure", "DisplayMessage": "failed to start task: no such runner"},
                {"Type": "Not Restarting", "DisplayMessage": "Error was unrecoverable"}
            ]}}
        }));
        assert_eq!(
            failure_reason(&start),
            "task vm failed: failed to start task: no such runner; not restarted: Error was unrecoverable"
        );
        // Nothing about the task: the allocation's own words.
        let lost = alloc(
            serde_json::json!({"ClientStatus": "lost", "ClientDescription": "alloc is lost since its node is down"}),
        );
        assert_eq!(failure_reason(&lost), "alloc is lost since its node is down");
        assert_eq!(failure_reason(&alloc(serde_json::json!({"ClientStatus": "failed"}))), "failed");
    }

    #[test]
    fn events_are_found_again_in_nomads_window() {
        let ev = |t: i64, kind: &str| TaskEvent { kind: kind.into(), display_message: String::new(), time: t };
        let first = vec![ev(1, "Received"), ev(2, "Started")];
        assert_eq!(unseen_events(&first, None), (&first[..], false));
        // Nomad keeps the last 10: the window moved, the count stayed.
        let moved: Vec<TaskEvent> = (2..12).map(|t| ev(t, if t == 2 { "Started" } else { "Driver" })).collect();
        assert_eq!(moved.len(), 10);
        assert_eq!(unseen_events(&moved, first.last()), (&moved[1..], false));
        assert_eq!(unseen_events(&moved, moved.last()), (&[][..], false));
        // Same type and time, other message: another event.
        let mut other = ev(11, "Driver");
        other.display_message = "VM exited with code 1".into();
        assert_eq!(unseen_events(&moved, Some(&other)), (&moved[..], true));
        let gone: Vec<TaskEvent> = (20..30).map(|t| ev(t, "Driver")).collect();
        assert_eq!(unseen_events(&gone, first.last()), (&gone[..], true));
    }

    #[test]
    fn log_tails_keep_whole_lines() {
        assert_eq!(tail_lines("a\nb\n\nc\n", 4096, 10), ["a", "b", "c"]);
        assert_eq!(tail_lines("a\nb\nc\n", 4096, 2), ["b", "c"]);
        // A read of the full size began inside a line.
        assert_eq!(tail_lines("rtial\nwhole\n", 12, 10), ["whole"]);
        assert_eq!(tail_lines("only\n", 5, 10), ["only"]);
        assert_eq!(tail_lines("\x1b[2Jx\tz\r\n", 4096, 10), ["\u{fffd}[2Jx\tz"]);
        assert!(tail_lines("", 4096, 10).is_empty());
    }
}

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
use crate::nomad::{Allocation, Client, Evaluation, NomadError};
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
    if let Err(e) = follow(nomad, ns, id, version, &registered.eval_id, deadline, log) {
        log.say(format!("stopped following the deployment: {}", crate::error_chain(&e)));
    }
    Ok(())
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

/// Prints task events not printed yet (`printed` counts them per alloc).
fn print_events(a: &Allocation, printed: &mut BTreeMap<String, usize>, log: &Log) {
    let Some(events) = a.task(TASK).and_then(|t| t.events.as_ref()) else { return };
    let done = printed.entry(a.id.clone()).or_insert(0);
    for e in events.iter().skip(*done) {
        if e.display_message.is_empty() {
            log.say(format!("  {}", e.kind));
        } else {
            log.say(format!("  {}: {}", e.kind, e.display_message));
        }
    }
    *done = events.len();
}

fn follow(
    nomad: &Client,
    ns: &str,
    id: &str,
    version: u64,
    eval_id: &str,
    deadline: Instant,
    log: &Log,
) -> Result<(), NomadError> {
    let Some(ev) = wait_eval(nomad, ns, eval_id, deadline)? else {
        log.say(format!("evaluation {} still pending; `status` will show how it goes", short(eval_id)));
        return Ok(());
    };
    if ev.status != "complete" {
        log.say(format!("evaluation {} {}: {}", short(&ev.id), ev.status, ev.status_description));
        return Ok(());
    }
    if let Some(failed) = ev.failed_tg_allocs.as_ref().filter(|f| !f.is_empty()) {
        for (group, metric) in failed {
            log.say(format!("cannot place the VM (group {group}): {}", metric.summary()));
        }
        if !ev.blocked_eval.is_empty() {
            log.say(format!("Nomad will place it once a node fits (blocked evaluation {})", short(&ev.blocked_eval)));
        }
        return Ok(());
    }

    let mut placed: Option<String> = None;
    let mut printed = BTreeMap::new();
    let running = loop {
        let allocs = nomad.allocations(ns, id)?;
        if let Some(a) = allocs.iter().find(|a| a.job_version == version && a.desired_status == "run") {
            if placed.as_deref() != Some(a.id.as_str()) {
                log.say(format!("allocation {} placed on node {}", a.short_id(), a.node_name));
                placed = Some(a.id.clone());
            }
            print_events(a, &mut printed, log);
            let state = a.task(TASK).map(|t| t.state.as_str()).unwrap_or("");
            if a.client_status == "running" && state == "running" {
                log.say(format!("running on node {} (allocation {})", a.node_name, a.short_id()));
                break true;
            }
            if a.is_terminal() {
                let why = if a.client_description.is_empty() {
                    a.client_status.clone()
                } else {
                    a.client_description.clone()
                };
                log.say(format!("FAILED on node {} (allocation {}): {why}", a.node_name, a.short_id()));
                break false;
            }
        }
        if Instant::now() >= deadline {
            log.say("not running yet; stopped waiting (`ssh … status` shows how it goes)");
            return Ok(());
        }
        std::thread::sleep(POLL);
    };
    if !running {
        return Ok(());
    }
    // The deployment turns healthy after the update's MinHealthyTime.
    loop {
        match nomad.latest_deployment(ns, id)? {
            Some(d) if d.job_version == version && d.status != "running" && d.status != "pending" => {
                let desc =
                    if d.status_description.is_empty() { String::new() } else { format!(": {}", d.status_description) };
                log.say(format!("deployment {} {}{desc}", short(&d.id), d.status));
                return Ok(());
            }
            Some(_) | None if Instant::now() >= deadline => {
                log.say("deployment not finished yet; stopped waiting");
                return Ok(());
            }
            None => {
                // Jobs registered with an identical spec get no deployment.
                return Ok(());
            }
            Some(_) => std::thread::sleep(POLL),
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

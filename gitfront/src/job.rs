//! The Nomad job for one VM (one branch = one host = one job), as API JSON.
//!
//! The policy is chosen so that **a VM never runs twice at once** — two
//! copies of one guest would fight over its volumes, MAC and IP — while a
//! VM that dies or loses its node still comes back:
//!
//! * `Count = 1`, one group, one task.
//! * Updates (a new runner) are destructive: Nomad stops the old allocation
//!   and places the new one with `PreviousAllocation` set, and a client
//!   starts such an allocation only after the previous one is terminal
//!   (client/allocwatcher: local *and* remote previous allocations are
//!   waited for). `MaxParallel = 1`, no canaries (a canary is by definition
//!   a second copy running beside the first).
//! * `RestartPolicy`: a crashed VMM is restarted in place a few times (same
//!   node, same allocation: sequential by construction), then the
//!   allocation fails.
//! * `ReschedulePolicy`: a failed allocation is replaced elsewhere, without
//!   limit but with an exponential delay, so a VM that cannot boot does not
//!   hammer the cluster. The failed one is terminal before its replacement
//!   is placed.
//! * `Disconnect.StopOnClientAfter`: the one case where Nomad would run two
//!   copies is a client cut off from the servers — the servers mark its
//!   allocations lost and place replacements while the old VM may still
//!   run. With `stop_on_client_after`, the cut-off client stops its VMs
//!   after that long without a heartbeat, and the servers hold the
//!   replacement back until the same time plus the kill timeout
//!   (structs.Allocation.WaitClientStop). (`LostAfter` with `Replace =
//!   false` would never replace a VM on a dead node; the two are mutually
//!   exclusive in Nomad.)
//! * `KillTimeout`: time for the guest's graceful shutdown (the driver runs
//!   `microvm-shutdown` first).
//!
//! The job carries gitfront's identity of it in `Meta` (user, repo, branch,
//! commit) and nothing that changes without the VM changing: re-pushing an
//! unchanged host must not restart it (see [`JobSpec::is_deployed_in`]).

use std::time::Duration;

use serde_json::{Value, json};

use crate::config::JobConfig;
use crate::names::{Branch, RepoName, UserName};

/// The one task group and task of every job.
pub const GROUP: &str = "vm";
pub const TASK: &str = "vm";

/// Everything one job is made from.
#[derive(Debug, Clone)]
pub struct JobSpec {
    pub namespace: String,
    pub user: UserName,
    pub repo: RepoName,
    pub branch: Branch,
    pub commit: String,
    pub datacenters: Vec<String>,
    /// The runner's store path.
    pub runner: String,
    pub vcpu: u32,
    /// Guest memory, MiB.
    pub mem: u32,
}

fn ns(d: Duration) -> u64 {
    d.as_nanos().min(u64::MAX as u128) as u64
}

impl JobSpec {
    /// Nomad CPU (MHz) and memory (MiB) to reserve for the VM.
    pub fn resources(&self, policy: &JobConfig) -> (u64, u64) {
        (u64::from(self.vcpu) * u64::from(policy.cpu_per_vcpu), u64::from(self.mem) + u64::from(policy.memory_overhead))
    }

    /// The `Job` object (what `PUT /v1/jobs` wants under `"Job"`).
    pub fn render(&self, policy: &JobConfig) -> Value {
        let (cpu, memory) = self.resources(policy);
        let id = self.branch.as_str();
        json!({
            "ID": id,
            "Name": id,
            "Namespace": self.namespace,
            "Type": "service",
            "Datacenters": self.datacenters,
            "Meta": {
                "gitfront.user": self.user.as_str(),
                "gitfront.repo": self.repo.as_str(),
                "gitfront.branch": id,
                "gitfront.commit": self.commit,
            },
            "TaskGroups": [{
                "Name": GROUP,
                "Count": 1,
                "RestartPolicy": {
                    "Attempts": 2,
                    "Interval": ns(Duration::from_secs(600)),
                    "Delay": ns(Duration::from_secs(10)),
                    "Mode": "fail",
                },
                "ReschedulePolicy": {
                    "Attempts": 0,
                    "Interval": 0,
                    "Unlimited": true,
                    "Delay": ns(Duration::from_secs(30)),
                    "DelayFunction": "exponential",
                    "MaxDelay": ns(Duration::from_secs(3600)),
                },
                "Update": {
                    "MaxParallel": 1,
                    "Canary": 0,
                    "AutoRevert": false,
                    "HealthCheck": "task_states",
                    "MinHealthyTime": ns(Duration::from_secs(5)),
                    "HealthyDeadline": ns(Duration::from_secs(300)),
                    "ProgressDeadline": ns(Duration::from_secs(600)),
                },
                "Disconnect": {
                    "StopOnClientAfter": ns(policy.stop_on_client_after),
                },
                "Tasks": [{
                    "Name": TASK,
                    "Driver": "microvm",
                    "Config": { "runner": self.runner },
                    "KillTimeout": ns(policy.kill_timeout),
                    "Resources": { "CPU": cpu, "MemoryMB": memory },
                }],
            }],
        })
    }

    /// The request body for `PUT /v1/jobs`.
    pub fn register_body(&self, policy: &JobConfig) -> Value {
        json!({ "Job": self.render(policy) })
    }

    /// Whether `existing` (Nomad's copy of the job) already runs exactly
    /// this: same runner, resources and datacenters, and not stopped. Then
    /// registering again would only bump the version (and, through the
    /// commit in `Meta`, restart the VM for nothing).
    pub fn is_deployed_in(&self, existing: &Value, policy: &JobConfig) -> bool {
        let (cpu, memory) = self.resources(policy);
        let task = &existing["TaskGroups"][0]["Tasks"][0];
        existing["Stop"] == false
            && existing["TaskGroups"].as_array().is_some_and(|g| g.len() == 1)
            && existing["TaskGroups"][0]["Count"] == 1
            && task["Driver"] == "microvm"
            && task["Config"]["runner"] == self.runner.as_str()
            && task["Resources"]["CPU"] == cpu
            && task["Resources"]["MemoryMB"] == memory
            && existing["Datacenters"] == json!(self.datacenters)
            && existing["TaskGroups"][0]["Disconnect"]["StopOnClientAfter"] == ns(policy.stop_on_client_after)
            && task["KillTimeout"] == ns(policy.kill_timeout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> JobSpec {
        JobSpec {
            namespace: "alice-fleet".into(),
            user: UserName::parse("alice").unwrap(),
            repo: RepoName::parse("fleet").unwrap(),
            branch: Branch::parse("alpha").unwrap(),
            commit: "0123456789abcdef0123456789abcdef01234567".into(),
            datacenters: vec!["dc1".into()],
            runner: "/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-microvm-qemu-alpha".into(),
            vcpu: 2,
            mem: 256,
        }
    }

    #[test]
    fn renders_the_job() {
        let policy = crate::config::defaults().job;
        let body = spec().register_body(&policy);
        let job = &body["Job"];
        assert_eq!(job["ID"], "alpha");
        assert_eq!(job["Name"], "alpha");
        assert_eq!(job["Namespace"], "alice-fleet");
        assert_eq!(job["Type"], "service");
        assert_eq!(job["Datacenters"], json!(["dc1"]));
        assert_eq!(job["Meta"]["gitfront.user"], "alice");
        assert_eq!(job["Meta"]["gitfront.repo"], "fleet");
        assert_eq!(job["Meta"]["gitfront.commit"], "0123456789abcdef0123456789abcdef01234567");
        let group = &job["TaskGroups"][0];
        assert_eq!(job["TaskGroups"].as_array().unwrap().len(), 1);
        assert_eq!(group["Name"], "vm");
        assert_eq!(group["Count"], 1);
        assert_eq!(group["RestartPolicy"]["Mode"], "fail");
        assert_eq!(group["ReschedulePolicy"]["Unlimited"], true);
        assert_eq!(group["ReschedulePolicy"]["Delay"], 30_000_000_000u64);
        assert_eq!(group["ReschedulePolicy"]["DelayFunction"], "exponential");
        assert_eq!(group["Update"]["MaxParallel"], 1);
        assert_eq!(group["Update"]["Canary"], 0);
        assert_eq!(group["Disconnect"]["StopOnClientAfter"], 60_000_000_000u64);
        assert!(group["Disconnect"].get("LostAfter").is_none(), "exclusive with StopOnClientAfter");
        let task = &group["Tasks"][0];
        assert_eq!(task["Name"], "vm");
        assert_eq!(task["Driver"], "microvm");
        assert_eq!(task["Config"], json!({"runner": "/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-microvm-qemu-alpha"}));
        assert_eq!(task["Resources"]["CPU"], 2000, "2 vCPUs x 1000 MHz");
        assert_eq!(task["Resources"]["MemoryMB"], 256 + 64, "guest + VMM overhead");
        assert_eq!(task["KillTimeout"], 30_000_000_000u64);
    }

    #[test]
    fn deployed_check_ignores_the_commit_but_not_the_runner() {
        let policy = crate::config::defaults().job;
        let mut existing = spec().render(&policy);
        existing["Stop"] = json!(false);
        existing["Version"] = json!(3);
        let mut same_runner_new_commit = spec();
        same_runner_new_commit.commit = "ffff".into();
        assert!(same_runner_new_commit.is_deployed_in(&existing, &policy));
        let mut new_runner = spec();
        new_runner.runner = "/nix/store/bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-microvm-qemu-alpha".into();
        assert!(!new_runner.is_deployed_in(&existing, &policy));
        let mut more_mem = spec();
        more_mem.mem = 512;
        assert!(!more_mem.is_deployed_in(&existing, &policy));
        existing["Stop"] = json!(true);
        assert!(!spec().is_deployed_in(&existing, &policy), "a stopped job is not deployed");
    }
}

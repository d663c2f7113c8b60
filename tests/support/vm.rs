//! A test world for VMs: a network namespace with a bridge (192.0.2.1/24),
//! a Nomad agent with our driver configured for it, and helpers to submit
//! microVM jobs and look at what the guest did.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::runner::{make_runner, virtiofsd_bin};
use crate::{Agent, AgentOpts, Netns, open_tempdir, wait_until};

pub const BRIDGE: &str = "br0";
pub const HOST_ADDR: &str = "192.0.2.1";
/// How long a boot under TCG may take on a busy 2-core machine.
pub const BOOT_LIMIT: Duration = Duration::from_secs(120);

pub struct World {
    pub dir: tempfile::TempDir,
    pub netns: Arc<Netns>,
    pub agent: Agent,
    pub state_dir: PathBuf,
}

/// pids.json of the one task dir under `state_dir` (the supervisor's record
/// of its VMM and virtiofsd processes).
pub fn only_task_pids(state_dir: &Path) -> serde_json::Value {
    let tasks: Vec<PathBuf> = std::fs::read_dir(state_dir.join("tasks"))
        .expect("tasks dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    assert_eq!(tasks.len(), 1, "one task dir expected: {tasks:?}");
    let text = std::fs::read_to_string(tasks[0].join("pids.json")).expect("pids.json");
    serde_json::from_str(&text).expect("pids.json is JSON")
}

/// Plugin config for tests: our state dir, the test bridge, the installed
/// virtiofsd (unless `extra` names another), and the extra lines given.
pub fn plugin_config(state_dir: &Path, extra: &str) -> String {
    let virtiofsd = if extra.contains("virtiofsd =") {
        String::new()
    } else {
        format!("    virtiofsd = \"{}\"\n", virtiofsd_bin().display())
    };
    format!(
        "    state_dir = \"{}\"\n    default_bridge = \"{BRIDGE}\"\n{virtiofsd}    default_stop_timeout = \"20s\"\n{extra}",
        state_dir.display(),
    )
}

impl World {
    /// `dev`: a `-dev` agent; otherwise a persistent one that can restart.
    pub fn new(tag: &str, dev: bool, extra_plugin_config: &str) -> World {
        let dir = open_tempdir();
        let netns = Arc::new(Netns::new(tag));
        netns.add_bridge(BRIDGE, &format!("{HOST_ADDR}/24"));
        let state_dir = dir.path().join("state");
        let opts = AgentOpts {
            dev,
            plugin_config: Some(plugin_config(&state_dir, extra_plugin_config)),
            extra_hcl: String::new(),
        };
        let agent = Agent::start(netns.clone(), &dir.path().join("agent"), opts);
        World { dir, netns, agent, state_dir }
    }

    /// A bootable qemu runner in the Nix store with one tap on the bridge
    /// and one virtiofs share `data` (relative: inside the VM's work dir).
    pub fn runner(&self, host: &str, ip_suffix: u8, extra: &[&str]) -> PathBuf {
        let out = self.dir.path().join("runners");
        std::fs::create_dir_all(&out).expect("runners dir");
        let tap = format!("vm-{host}");
        let ip = format!("192.0.2.{ip_suffix}/24");
        let mut args = vec![
            "--hostname",
            host,
            "--tap",
            &tap,
            "--share",
            "data:data",
            "--guest-ip",
            &ip,
            "--ping",
            HOST_ADDR,
            "--store",
        ];
        args.extend_from_slice(extra);
        make_runner(&out, &args)
    }

    /// Runs a one-VM service job; returns the submission's output.
    pub fn run_vm_job(&self, job: &str, runner: &Path, restart_attempts: u32) -> std::process::Output {
        self.agent.run_job(job, &vm_job(job, runner, restart_attempts, ""))
    }

    /// The VM work dir of a running task (from InspectTask-like state: the
    /// only dir under vms/ whose name starts with the job name).
    pub fn work_dir(&self, job: &str) -> PathBuf {
        let vms = self.state_dir.join("vms");
        let entries = std::fs::read_dir(&vms).expect("vms dir");
        entries
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .find(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(&format!("{job}-"))))
            .unwrap_or_else(|| panic!("no work dir for job {job} under {}", vms.display()))
    }

    /// VMM processes of VM `host` that belong to this world (their working
    /// dir is under its state dir): other test runs may boot a VM of the
    /// same name at the same time.
    pub fn vmm_pids(&self, host: &str) -> Vec<i32> {
        vmm_pids_under(host, &self.state_dir)
    }

    /// See [`only_task_pids`].
    pub fn task_pids(&self) -> serde_json::Value {
        only_task_pids(&self.state_dir)
    }

    /// Makes runner `host` (see [`World::runner`]), runs it as job `host`,
    /// and waits until the guest is ready; returns the runner and the alloc.
    pub fn boot(&self, host: &str, ip_suffix: u8, restart_attempts: u32) -> (PathBuf, String) {
        let runner = self.runner(host, ip_suffix, &[]);
        let out = self.run_vm_job(host, &runner, restart_attempts);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let alloc = self.agent.wait_running(host, "vm", BOOT_LIMIT);
        self.wait_console(&alloc, "microvm-test-guest: ready", BOOT_LIMIT);
        (runner, alloc)
    }

    /// Waits until the task's console (alloc logs) contains `text`.
    pub fn wait_console(&self, alloc: &str, text: &str, limit: Duration) -> String {
        wait_until(&format!("console to show {text:?}"), limit, Duration::from_millis(500), || {
            let logs = self.agent.alloc_logs(alloc, "vm", false);
            if logs.contains(text) {
                Ok(logs)
            } else {
                Err(logs.chars().rev().take(400).collect::<String>().chars().rev().collect())
            }
        })
    }
}

/// A service job with one `driver = "microvm"` task named "vm" whose
/// `config {}` body is `config`; no reschedules, `restart_attempts` restarts.
pub fn job_hcl(job: &str, config: &str, restart_attempts: u32) -> String {
    format!(
        r#"job "{job}" {{
  datacenters = ["*"]
  type = "service"
  group "g" {{
    restart {{
      attempts = {restart_attempts}
      delay    = "1s"
      interval = "10m"
      mode     = "fail"
    }}
    reschedule {{
      attempts  = 0
      unlimited = false
    }}
    task "vm" {{
      driver = "microvm"
      kill_timeout = "25s"
      config {{
        {config}
      }}
      resources {{
        cpu    = 200
        memory = 300
      }}
    }}
  }}
}}
"#
    )
}

/// A job running `runner`, with `extra_config` lines in its task config.
pub fn vm_job(job: &str, runner: &Path, restart_attempts: u32, extra_config: &str) -> String {
    job_hcl(job, &format!("runner = \"{}\"\n        {extra_config}", runner.display()), restart_attempts)
}

/// VMM processes of VM `host` whose working dir is below `state_dir`.
pub fn vmm_pids_under(host: &str, state_dir: &Path) -> Vec<i32> {
    pgrep(&format!("^microvm@{host}( |$)"))
        .into_iter()
        .filter(|pid| std::fs::read_link(format!("/proc/{pid}/cwd")).is_ok_and(|cwd| cwd.starts_with(state_dir)))
        .collect()
}

/// Processes whose command line mentions `needle` (pgrep -f).
pub fn pgrep(needle: &str) -> Vec<i32> {
    let out = std::process::Command::new("pgrep").args(["-f", "--", needle]).output().expect("pgrep");
    String::from_utf8_lossy(&out.stdout).split_whitespace().filter_map(|p| p.parse().ok()).collect()
}

/// What a VM of `host` run by a plugin over `state_dir` could leave behind
/// once its task is destroyed: processes, `vm-*` interfaces in `netns`, task
/// dirs, claims, sockets or `booted` links in the work dirs (the dirs stay
/// for their volumes), GC roots. Empty when nothing is left.
pub fn leftovers(netns: &crate::Netns, state_dir: &Path, host: &str) -> Vec<String> {
    let mut left: Vec<String> = [
        vmm_pids_under(host, state_dir),
        pgrep(&format!("supervise {}", state_dir.display())),
        pgrep(&format!("--shared-dir={}", state_dir.display())),
    ]
    .concat()
    .into_iter()
    .map(|pid| format!("process {pid}"))
    .collect();
    left.extend(netns.links().into_iter().filter(|l| l.starts_with("vm-")).map(|l| format!("interface {l}")));
    let entries = |dir: &Path| -> Vec<std::fs::DirEntry> {
        std::fs::read_dir(dir).map(|d| d.filter_map(|e| e.ok()).collect()).unwrap_or_default()
    };
    for sub in ["tasks", "claims"] {
        left.extend(entries(&state_dir.join(sub)).iter().map(|e| format!("{sub}/{}", e.file_name().to_string_lossy())));
    }
    for work in entries(&state_dir.join("vms")) {
        let slug = work.file_name().to_string_lossy().to_string();
        for e in entries(&work.path()) {
            let name = e.file_name().to_string_lossy().to_string();
            if name.contains(".sock") || name == "booted" {
                left.push(format!("vms/{slug}/{name}"));
            }
        }
        if Path::new("/nix/var/nix/gcroots/nomad-microvm").join(&slug).exists() {
            left.push(format!("GC root {slug}"));
        }
    }
    left
}

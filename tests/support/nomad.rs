//! The real Nomad agent, inside a test's network namespace, with our driver
//! in its plugin dir. Talked to through its own CLI (`nomad …`) run in the
//! same namespace.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::Signal;

use crate::{Group, Netns, driver_bin, nomad_bin, wait_until};

#[derive(Clone)]
pub struct AgentOpts {
    /// `-dev` (in-memory, everything destroyed on shutdown) or a persistent
    /// server+client whose data dir survives restarts.
    pub dev: bool,
    /// The body of `plugin "nomad-driver-microvm" { config { … } }`; `None`
    /// leaves the plugin block out entirely (then the driver is not loaded).
    pub plugin_config: Option<String>,
    /// Extra top-level agent HCL.
    pub extra_hcl: String,
}

impl Default for AgentOpts {
    fn default() -> Self {
        AgentOpts { dev: true, plugin_config: Some(String::new()), extra_hcl: String::new() }
    }
}

pub struct Agent {
    pub netns: Arc<Netns>,
    pub dir: PathBuf,
    pub plugin_dir: PathBuf,
    opts: AgentOpts,
    process: Option<Group>,
}

impl Agent {
    /// Writes the agent config into `dir`, links our driver into a plugin
    /// dir, starts the agent and waits until its node is registered.
    pub fn start(netns: Arc<Netns>, dir: &Path, opts: AgentOpts) -> Agent {
        let mut agent = Agent::prepare(netns, dir, opts);
        agent.launch();
        agent.wait_ready();
        agent
    }

    /// Starts an agent expected to refuse its config: waits for it to exit
    /// and returns its log.
    pub fn start_expecting_failure(netns: Arc<Netns>, dir: &Path, opts: AgentOpts) -> String {
        let mut agent = Agent::prepare(netns, dir, opts);
        agent.launch();
        let status = agent.process.as_mut().and_then(|p| p.wait_exit(Duration::from_secs(60)));
        assert!(status.is_some(), "the agent kept running despite the bad config:\n{}", agent.log());
        agent.process.take();
        agent.log()
    }

    /// Links our driver into a plugin dir and writes the agent config.
    fn prepare(netns: Arc<Netns>, dir: &Path, opts: AgentOpts) -> Agent {
        let plugin_dir = dir.join("plugins");
        std::fs::create_dir_all(&plugin_dir).expect("plugin dir");
        let link = plugin_dir.join("nomad-driver-microvm");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(driver_bin(), &link).expect("link driver");
        let agent = Agent { netns, dir: dir.to_path_buf(), plugin_dir, opts, process: None };
        agent.write_config();
        agent
    }

    fn write_config(&self) {
        let plugin = match &self.opts.plugin_config {
            Some(body) => format!("plugin \"nomad-driver-microvm\" {{\n  config {{\n{body}\n  }}\n}}\n"),
            None => String::new(),
        };
        let hcl = format!(
            r#"
disable_update_check = true
log_level = "DEBUG"
bind_addr = "127.0.0.1"
advertise {{
  http = "127.0.0.1"
  rpc  = "127.0.0.1"
  serf = "127.0.0.1"
}}
plugin_dir = "{plugin_dir}"
client {{
  enabled = true
  # the namespace has no default route; -dev picks lo by itself
  network_interface = "lo"
  options = {{
    # these probe 169.254.169.254: never let them run
    "fingerprint.denylist" = "env_aws,env_gce,env_azure,env_digitalocean"
  }}
}}
plugin "raw_exec" {{
  config {{
    enabled = true
  }}
}}
{plugin}
{extra}
"#,
            plugin_dir = self.plugin_dir.display(),
            extra = self.opts.extra_hcl,
        );
        std::fs::write(self.dir.join("agent.hcl"), hcl).expect("write agent.hcl");
    }

    fn launch(&mut self) {
        let log =
            std::fs::OpenOptions::new().create(true).append(true).open(self.dir.join("agent.log")).expect("agent log");
        let mut cmd = self.netns.command(nomad_bin());
        cmd.arg("agent").arg(format!("-config={}", self.dir.join("agent.hcl").display()));
        if self.opts.dev {
            cmd.arg("-dev");
        } else {
            let data = self.dir.join("data");
            std::fs::create_dir_all(&data).expect("data dir");
            cmd.args(["-server", "-bootstrap-expect=1"]).arg(format!("-data-dir={}", data.display()));
        }
        crate::agent_tmpdir(&mut cmd, &self.dir);
        cmd.stdin(Stdio::null()).stdout(log.try_clone().expect("log")).stderr(log);
        self.process = Some(Group::spawn("nomad agent", &mut cmd));
    }

    /// Waits until the node is ready (after the driver's first fingerprint).
    pub fn wait_ready(&self) {
        wait_until("the Nomad node to be ready", Duration::from_secs(90), Duration::from_millis(500), || {
            let out = self.nomad(&["node", "status", "-self", "-json"]);
            if !out.status.success() {
                return Err(String::from_utf8_lossy(&out.stderr).to_string());
            }
            let node: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())?;
            if node["Status"] == "ready" { Ok(()) } else { Err(format!("status {}", node["Status"])) }
        });
    }

    /// Runs `nomad <args>` inside the namespace against this agent.
    pub fn nomad(&self, args: &[&str]) -> Output {
        self.netns
            .command(nomad_bin())
            .args(args)
            .env("NOMAD_ADDR", "http://127.0.0.1:4646")
            .env_remove("NOMAD_TOKEN")
            .output()
            .expect("run nomad")
    }

    /// `nomad <args>` that must succeed; returns stdout.
    pub fn nomad_ok(&self, args: &[&str]) -> String {
        expect_success(args, self.nomad(args))
    }

    /// GET on the HTTP API (through `nomad operator api`).
    pub fn api(&self, path: &str) -> serde_json::Value {
        parse_api_reply(path, &self.nomad_ok(&["operator", "api", path]))
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }

    pub fn pid(&self) -> Option<i32> {
        self.process.as_ref().map(Group::pid)
    }

    /// The driver plugin processes this agent runs (children of the agent).
    pub fn plugin_pids(&self) -> Vec<i32> {
        let Some(agent) = self.pid() else { return Vec::new() };
        let out = Command::new("pgrep").args(["-P", &agent.to_string(), "-f", "nomad-driver-microvm"]).output();
        out.map(|o| String::from_utf8_lossy(&o.stdout).split_whitespace().filter_map(|p| p.parse().ok()).collect())
            .unwrap_or_default()
    }

    /// Graceful stop (SIGINT, as Ctrl-C or systemd's KillSignal would send).
    pub fn stop(&mut self) {
        if let Some(mut p) = self.process.take() {
            p.signal_leader(Signal::SIGINT);
            if p.wait_exit(Duration::from_secs(30)).is_none() {
                eprintln!("agent did not stop within 30 s; killing it");
            }
        }
    }

    /// kill -9 of the agent alone: its plugin keeps running (reattach path).
    pub fn crash(&mut self) {
        if let Some(mut p) = self.process.take() {
            p.signal_leader(Signal::SIGKILL);
            let _ = p.wait_exit(Duration::from_secs(10));
            // Dropping the group handle would kill the plugin too.
            std::mem::forget(p);
        }
    }

    /// Starts the agent again with the same config and data dir.
    pub fn restart(&mut self) {
        self.launch();
        self.wait_ready();
    }

    /// Submits a job from HCL text; returns `nomad job run`'s output.
    pub fn run_job(&self, name: &str, hcl: &str) -> Output {
        let path = self.dir.join(format!("{name}.nomad.hcl"));
        std::fs::write(&path, hcl).expect("write job");
        self.nomad(&["job", "run", "-detach", path.to_str().expect("utf-8 path")])
    }

    /// Allocations of a job, newest first.
    pub fn allocs(&self, job: &str) -> Vec<serde_json::Value> {
        let v = self.api(&format!("/v1/job/{job}/allocations"));
        let mut list = v.as_array().cloned().unwrap_or_default();
        list.sort_by_key(|a| std::cmp::Reverse(a["CreateIndex"].as_u64().unwrap_or(0)));
        list
    }

    /// Waits until the job's newest allocation runs `task`; returns its ID.
    pub fn wait_running(&self, job: &str, task: &str, limit: Duration) -> String {
        wait_until(&format!("job {job} to run"), limit, Duration::from_millis(500), || {
            let allocs = self.allocs(job);
            let a = allocs.first().ok_or("no allocation yet")?;
            let state = &a["TaskStates"][task];
            if state["State"] == "running" {
                return Ok(a["ID"].as_str().unwrap_or_default().to_string());
            }
            if a["ClientStatus"] == "failed" {
                panic!("allocation failed: {}", events_text(state));
            }
            Err(format!("{} / {}", a["ClientStatus"], events_text(state)))
        })
    }

    /// Waits until the job's newest allocation failed; returns the events
    /// of its task `task`.
    pub fn wait_failed(&self, job: &str, task: &str) -> String {
        wait_until(&format!("job {job} to fail"), Duration::from_secs(60), Duration::from_millis(500), || {
            let allocs = self.allocs(job);
            let a = allocs.first().ok_or("no allocation yet")?;
            let events = self.task_events(a["ID"].as_str().unwrap_or_default(), task);
            if a["ClientStatus"] == "failed" { Ok(events) } else { Err(events) }
        })
    }

    /// The task events of an allocation's task, as "Type: message" lines.
    pub fn task_events(&self, alloc: &str, task: &str) -> String {
        let a = self.api(&format!("/v1/allocation/{alloc}"));
        events_text(&a["TaskStates"][task])
    }

    pub fn alloc_logs(&self, alloc: &str, task: &str, stderr: bool) -> String {
        let mut args = vec!["alloc", "logs"];
        if stderr {
            args.push("-stderr");
        }
        args.extend([alloc, task]);
        String::from_utf8_lossy(&self.nomad(&args).stdout).to_string()
    }
}

/// "Type: DisplayMessage" per event, one per line.
pub fn events_text(state: &serde_json::Value) -> String {
    state["Events"]
        .as_array()
        .map(|evs| {
            evs.iter()
                .map(|e| {
                    format!("{}: {}", e["Type"].as_str().unwrap_or(""), e["DisplayMessage"].as_str().unwrap_or(""))
                })
                .collect::<Vec<_>>()
                .join("\n")
        })
        .unwrap_or_default()
}

impl Drop for Agent {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            eprintln!("--- last agent log lines ({}) ---", self.dir.display());
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
        }
        self.process.take();
    }
}

/// The stdout of a `nomad` CLI run that must have succeeded; panics with
/// both streams otherwise.
pub(crate) fn expect_success(args: &[&str], out: Output) -> String {
    assert!(
        out.status.success(),
        "nomad {} failed: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// The JSON body `nomad operator api <path>` printed.
pub(crate) fn parse_api_reply(path: &str, text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("{path}: not JSON ({e}): {text}"))
}

//! Playing Nomad's side of go-plugin: start the driver binary as the agent
//! would, read the handshake, and speak gRPC to it over its unix socket.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use hyper_util::rt::TokioIo;
use microvm_proto::base::{SetConfigRequest, base_plugin_client::BasePluginClient};
use microvm_proto::drivers::{TaskConfig, driver_client::DriverClient};
use tonic::transport::{Channel, Endpoint};

use crate::{Group, Netns, driver_bin};

pub const COOKIE_KEY: &str = "NOMAD_PLUGIN_MAGIC_COOKIE";
pub const COOKIE: &str = "e4327c2e01eabfd75a8a67adb114fb34a757d57eee7728d857a8cec6e91a7255";

pub struct PluginProcess {
    pub process: Group,
    pub handshake: String,
    pub socket: PathBuf,
    pub stderr: PathBuf,
}

/// Starts the driver with the environment go-plugin gives it and reads the
/// handshake line.
pub fn start_plugin(workdir: &std::path::Path) -> PluginProcess {
    start_plugin_in(workdir, None)
}

/// Same, inside a network namespace (taps are made where the plugin runs).
pub fn start_plugin_in(workdir: &std::path::Path, netns: Option<&crate::Netns>) -> PluginProcess {
    use std::io::BufRead;
    let stderr = workdir.join("plugin.stderr");
    let mut cmd = match netns {
        Some(ns) => ns.command(driver_bin()),
        None => Command::new(driver_bin()),
    };
    cmd.env(COOKIE_KEY, COOKIE)
        .env("PLUGIN_PROTOCOL_VERSIONS", "2")
        .env("PLUGIN_MIN_PORT", "10000")
        .env("PLUGIN_MAX_PORT", "25000")
        .env("TMPDIR", workdir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&stderr).expect("stderr file"));
    let mut process = Group::spawn("driver plugin", &mut cmd);
    let stdout = process.child.stdout.take().expect("stdout");
    let mut line = String::new();
    std::io::BufReader::new(stdout).read_line(&mut line).expect("handshake line");
    let parts: Vec<&str> = line.trim_end().split('|').collect();
    assert!(parts.len() >= 4, "bad handshake line {line:?}");
    PluginProcess { socket: PathBuf::from(parts[3]), handshake: line, process, stderr }
}

/// A gRPC channel over the plugin's unix socket.
pub async fn connect(socket: PathBuf) -> Channel {
    Endpoint::try_from("http://unused")
        .expect("endpoint")
        .connect_with_connector(tower::service_fn(move |_| {
            let socket = socket.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(socket).await?)) }
        }))
        .await
        .expect("connect to the plugin socket")
}

/// A plugin in `netns`, configured as the agent would (SetConfig with the
/// end-to-end worlds' plugin config over `state_dir`), and a driver client.
pub async fn configured_plugin(dir: &Path, netns: &Netns, state_dir: &Path) -> (PluginProcess, DriverClient<Channel>) {
    let plugin = start_plugin_in(dir, Some(netns));
    let channel = connect(plugin.socket.clone()).await;
    set_config(&channel, state_dir, "").await;
    (plugin, DriverClient::new(channel))
}

/// SetConfig as the agent sends it: the end-to-end worlds' plugin config
/// over `state_dir` plus `extra` (`key = "string"` lines).
async fn set_config(channel: &Channel, state_dir: &Path, extra: &str) {
    let hcl = crate::vm::plugin_config(state_dir, extra);
    let mut pairs = Vec::new();
    for line in hcl.lines() {
        let (k, v) = line.trim().split_once(" = ").expect("key = value");
        pairs.push((rmpv::Value::from(k), rmpv::Value::from(v.trim_matches('"'))));
    }
    let mut config = Vec::new();
    rmpv::encode::write_value(&mut config, &rmpv::Value::Map(pairs)).expect("msgpack");
    BasePluginClient::new(channel.clone())
        .set_config(SetConfigRequest { msgpack_config: config, nomad_config: None, plugin_api_version: "0.1.0".into() })
        .await
        .expect("SetConfig");
}

/// The TaskConfig the agent sends for task `vm` of `job`, number `n` of
/// alloc `alloc`, running `runner`.
pub fn vm_task(alloc: &str, job: &str, n: u32, runner: &Path) -> TaskConfig {
    let config = rmpv::Value::Map(vec![
        (rmpv::Value::from("bridge"), rmpv::Value::Nil),
        (rmpv::Value::from("runner"), rmpv::Value::from(runner.to_str().expect("UTF-8 runner path"))),
    ]);
    let mut msgpack = Vec::new();
    rmpv::encode::write_value(&mut msgpack, &config).expect("msgpack");
    TaskConfig {
        id: format!("{alloc}/vm/{n:08x}"),
        name: "vm".into(),
        alloc_id: alloc.into(),
        job_id: job.into(),
        task_group_name: "g".into(),
        namespace: "default".into(),
        msgpack_driver_config: msgpack,
        ..Default::default()
    }
}

/// The agent's side played by the test itself: a configured plugin in its
/// own namespace (bridge br0) and a store runner for VM `host` with tap
/// `vm-<host>` and one share. Drops the plugin first, then the namespace,
/// then the files.
pub struct DirectWorld {
    pub plugin: PluginProcess,
    pub driver: DriverClient<Channel>,
    pub netns: Netns,
    pub runner: PathBuf,
    pub state_dir: PathBuf,
    pub dir: tempfile::TempDir,
}

impl DirectWorld {
    pub async fn new(tag: &str, host: &str) -> DirectWorld {
        let dir = crate::open_tempdir();
        let netns = Netns::new(tag);
        netns.add_bridge(crate::vm::BRIDGE, &format!("{}/24", crate::vm::HOST_ADDR));
        let tap = format!("vm-{host}");
        let runner = crate::runner::make_runner(
            &dir.path().join("runners"),
            &["--hostname", host, "--tap", &tap, "--share", "data:data", "--store"],
        );
        let state_dir = dir.path().join("state");
        let (plugin, driver) = configured_plugin(dir.path(), &netns, &state_dir).await;
        DirectWorld { plugin, driver, netns, runner, state_dir, dir }
    }

    /// Configures the running plugin again, with `extra` plugin config lines.
    pub async fn set_config(&self, extra: &str) {
        set_config(&connect(self.plugin.socket.clone()).await, &self.state_dir, extra).await;
    }
}

//! Playing Nomad's side of go-plugin: start the driver binary as the agent
//! would, read the handshake, and speak gRPC to it over its unix socket.

use std::path::PathBuf;
use std::process::{Command, Stdio};

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint};

use crate::{Group, driver_bin};

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

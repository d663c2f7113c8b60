//! The driver binary spoken to exactly as go-plugin's client (the Nomad
//! agent) does: environment, handshake line, gRPC over the unix socket.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use microvm_e2e::plugin::{COOKIE, COOKIE_KEY, connect, start_plugin};
use microvm_e2e::{driver_bin, open_tempdir};
use microvm_proto::base::{
    ConfigSchemaRequest, PluginInfoRequest, PluginType, SetConfigRequest, base_plugin_client::BasePluginClient,
};
use microvm_proto::drivers::{
    CapabilitiesRequest, FingerprintRequest, TaskConfigSchemaRequest, driver_client::DriverClient,
    fingerprint_response::HealthState,
};
use microvm_proto::goplugin::{Empty, grpc_controller_client::GrpcControllerClient};
use microvm_proto::hclspec::spec::Block;

#[test]
fn refuses_to_run_without_the_magic_cookie() {
    for cookie in [None, Some("wrong")] {
        let mut cmd = Command::new(driver_bin());
        cmd.env_remove(COOKIE_KEY).stdin(Stdio::null());
        if let Some(c) = cookie {
            cmd.env(COOKIE_KEY, c);
        }
        let out = cmd.output().expect("run driver");
        assert_eq!(out.status.code(), Some(1), "exit code with cookie {cookie:?}");
        assert!(out.stdout.is_empty(), "nothing on stdout: {:?}", String::from_utf8_lossy(&out.stdout));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("Nomad task driver plugin") && err.contains("plugin_dir"), "{err}");
    }
}

#[test]
fn refuses_an_unsupported_protocol_version() {
    let out = Command::new(driver_bin())
        .env(COOKIE_KEY, COOKIE)
        .env("PLUGIN_PROTOCOL_VERSIONS", "3")
        .stdin(Stdio::null())
        .output()
        .expect("run driver");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("this plugin speaks version 2"));
}

#[tokio::test]
async fn handshake_info_schema_and_config() {
    let dir = open_tempdir();
    let plugin = start_plugin(dir.path());
    // Exactly go-plugin's line: CORE|APP|unix|path|grpc| with no certificate.
    let expected = format!("1|2|unix|{}|grpc|\n", plugin.socket.display());
    assert_eq!(plugin.handshake, expected);
    assert!(plugin.socket.starts_with(dir.path()), "socket in $TMPDIR");

    let channel = connect(plugin.socket.clone()).await;
    let mut base = BasePluginClient::new(channel.clone());
    let info = base.plugin_info(PluginInfoRequest {}).await.expect("PluginInfo").into_inner();
    assert_eq!(info.r#type, PluginType::Driver as i32);
    assert_eq!(info.name, "microvm");
    assert_eq!(info.plugin_api_versions, vec!["0.1.0"]);

    let schema = base.config_schema(ConfigSchemaRequest {}).await.expect("ConfigSchema").into_inner();
    let Some(Block::Object(obj)) = schema.spec.and_then(|s| s.block) else { panic!("schema root is not an object") };
    assert!(obj.attributes.contains_key("state_dir") && obj.attributes.contains_key("default_bridge"));

    // SetConfig: a wrong type is refused with the key's name.
    let mut bad = Vec::new();
    rmpv::encode::write_value(
        &mut bad,
        &rmpv::Value::Map(vec![(rmpv::Value::from("state_dir"), rmpv::Value::from(7))]),
    )
    .unwrap();
    let err = base
        .set_config(SetConfigRequest { msgpack_config: bad, nomad_config: None, plugin_api_version: "0.1.0".into() })
        .await
        .expect_err("bad config refused");
    assert!(err.message().contains("`state_dir`: expected a string, found a number"), "{}", err.message());

    let state = dir.path().join("state");
    let mut good = Vec::new();
    rmpv::encode::write_value(
        &mut good,
        &rmpv::Value::Map(vec![(rmpv::Value::from("state_dir"), rmpv::Value::from(state.to_str().unwrap()))]),
    )
    .unwrap();
    base.set_config(SetConfigRequest { msgpack_config: good, nomad_config: None, plugin_api_version: "0.1.0".into() })
        .await
        .expect("good config accepted");

    let mut driver = DriverClient::new(channel.clone());
    let caps = driver.capabilities(CapabilitiesRequest {}).await.unwrap().into_inner().capabilities.unwrap();
    assert!(caps.send_signals && caps.exec);
    let task_schema = driver.task_config_schema(TaskConfigSchemaRequest {}).await.unwrap().into_inner();
    let Some(Block::Object(obj)) = task_schema.spec.and_then(|s| s.block) else { panic!("task schema") };
    let Some(Block::Attr(runner)) = obj.attributes["runner"].block.clone() else { panic!("runner attr") };
    assert!(runner.required && runner.r#type == "string");

    // The fingerprint stream answers at once and stays open.
    let mut stream = driver.fingerprint(FingerprintRequest {}).await.unwrap().into_inner();
    let first = tokio::time::timeout(Duration::from_secs(15), stream.message())
        .await
        .expect("first fingerprint")
        .unwrap()
        .unwrap();
    let health = HealthState::try_from(first.health).unwrap();
    assert_ne!(health, HealthState::Undetected, "{}", first.health_description);
    assert!(!first.health_description.is_empty());
    assert!(first.attributes.contains_key("driver.microvm.version"));
    assert!(first.attributes.contains_key("driver.microvm.kvm"));
    assert!(state.is_dir(), "state_dir from SetConfig is used");
    assert!(
        tokio::time::timeout(Duration::from_millis(500), stream.message()).await.is_err(),
        "no second fingerprint without a change: the stream stays open and quiet"
    );

    // Logs on stderr are hclog JSON lines.
    let stderr = std::fs::read_to_string(&plugin.stderr).unwrap();
    let line = stderr.lines().find(|l| l.contains("plugin serving")).expect("serving log line");
    let v: serde_json::Value = serde_json::from_str(line).expect("JSON log line");
    assert_eq!(v["@level"], "info");
    assert!(v["@timestamp"].as_str().unwrap().ends_with('Z'));
}

#[tokio::test]
async fn controller_shutdown_exits_promptly() {
    let dir = open_tempdir();
    let mut plugin = start_plugin(dir.path());
    let channel = connect(plugin.socket.clone()).await;
    // An open stream must not hold the exit back.
    let mut driver = DriverClient::new(channel.clone());
    let _stream = driver.fingerprint(FingerprintRequest {}).await.unwrap();
    let started = Instant::now();
    GrpcControllerClient::new(channel).shutdown(Empty {}).await.expect("Shutdown answered");
    let status = plugin.process.wait_exit(Duration::from_secs(2)).expect("plugin exited within 2 s");
    let took = started.elapsed();
    assert!(status.success(), "{status}");
    eprintln!("plugin exited {took:?} after Shutdown");
    assert!(!plugin.socket.exists(), "socket removed");
}

#[tokio::test]
async fn ignores_sigint() {
    let dir = open_tempdir();
    let mut plugin = start_plugin(dir.path());
    plugin.process.signal_leader(nix::sys::signal::Signal::SIGINT);
    assert!(plugin.process.wait_exit(Duration::from_millis(500)).is_none(), "SIGINT must not stop the plugin");
    let mut base = BasePluginClient::new(connect(plugin.socket.clone()).await);
    base.plugin_info(PluginInfoRequest {}).await.expect("still serving");
}

/// The stream is re-sent when the host changes (checked every
/// `fingerprint_period`) and when SetConfig changes the config.
#[tokio::test]
async fn fingerprint_follows_the_host_and_the_config() {
    use std::os::unix::fs::PermissionsExt;
    let dir = open_tempdir();
    let plugin = start_plugin(dir.path());
    let channel = connect(plugin.socket.clone()).await;
    let virtiofsd = dir.path().join("virtiofsd");
    let config = |virtiofsd: &std::path::Path| {
        let mut msgpack = Vec::new();
        let pairs = [
            ("state_dir", dir.path().join("state").display().to_string()),
            ("virtiofsd", virtiofsd.display().to_string()),
            ("fingerprint_period", "1s".to_string()),
        ];
        let map = pairs.iter().map(|(k, v)| (rmpv::Value::from(*k), rmpv::Value::from(v.as_str()))).collect();
        rmpv::encode::write_value(&mut msgpack, &rmpv::Value::Map(map)).unwrap();
        SetConfigRequest { msgpack_config: msgpack, nomad_config: None, plugin_api_version: "0.1.0".into() }
    };
    let mut base = BasePluginClient::new(channel.clone());
    base.set_config(config(&virtiofsd)).await.expect("SetConfig");
    let mut stream = DriverClient::new(channel).fingerprint(FingerprintRequest {}).await.unwrap().into_inner();
    let mut next = async || {
        tokio::time::timeout(Duration::from_secs(15), stream.message())
            .await
            .expect("a fingerprint within 15 s")
            .unwrap()
            .expect("stream open")
    };
    let virtiofsd_attr = |f: &microvm_proto::drivers::FingerprintResponse| {
        use microvm_proto::structs::attribute::Value;
        match f.attributes.get("driver.microvm.virtiofsd").and_then(|a| a.value.clone()) {
            Some(Value::BoolVal(b)) => b,
            other => panic!("driver.microvm.virtiofsd is {other:?}"),
        }
    };
    let first = next().await;
    assert!(!virtiofsd_attr(&first), "no virtiofsd yet");
    assert!(first.health_description.contains("virtiofsd not found"), "{}", first.health_description);

    // The host changes: virtiofsd appears. The next periodic check sees it.
    std::fs::write(&virtiofsd, "#!/bin/sh\n").unwrap();
    std::fs::set_permissions(&virtiofsd, std::fs::Permissions::from_mode(0o755)).unwrap();
    let appeared = Instant::now();
    let second = next().await;
    assert!(virtiofsd_attr(&second), "{second:?}");
    assert!(!second.health_description.contains("virtiofsd not found"), "{}", second.health_description);
    assert!(appeared.elapsed() < Duration::from_secs(10), "re-checked within a few periods");

    // The config changes: a virtiofsd that does not exist. Sent again.
    base.set_config(config(&dir.path().join("gone"))).await.expect("SetConfig");
    let third = next().await;
    assert!(!virtiofsd_attr(&third), "{third:?}");
}

//! Property-based fuzzing of everything that parses input a job submitter
//! or a runner author controls: go-cty msgpack task and plugin config, the
//! runner layout's data files, and the supervisord config. Nothing may
//! panic, and what is accepted must satisfy the checks.
//!
//! A short run is part of the test suite; `scripts/fuzz.sh` runs long ones
//! (PROPTEST_CASES=…).

use std::path::Path;

use microvm_driver::{config, runner::Runner, supervisord};
use proptest::prelude::*;
use rmpv::Value;

fn cases(default: u32) -> ProptestConfig {
    let n = std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(default);
    ProptestConfig { cases: n, failure_persistence: None, ..ProptestConfig::default() }
}

/// Arbitrary msgpack values, with the keys our configs use showing up often.
fn value() -> impl Strategy<Value = Value> {
    let key = prop_oneof![
        Just("runner".to_string()),
        Just("bridge".to_string()),
        Just("state_dir".to_string()),
        Just("allowed_bridges".to_string()),
        Just("default_stop_timeout".to_string()),
        Just("vmm_user".to_string()),
        Just("substituters".to_string()),
        "[a-z_]{1,12}",
    ];
    let leaf = prop_oneof![
        Just(Value::Nil),
        any::<bool>().prop_map(Value::Boolean),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::F64),
        "\\PC{0,40}".prop_map(Value::from),
        prop_oneof![Just("/nix/store/abc-microvm-qemu-x"), Just("br0"), Just("30s"), Just("root"), Just("../x")]
            .prop_map(Value::from),
        proptest::collection::vec(any::<u8>(), 0..8).prop_map(Value::Binary),
        (any::<i8>(), proptest::collection::vec(any::<u8>(), 0..4)).prop_map(|(t, d)| Value::Ext(t, d)),
    ];
    leaf.prop_recursive(4, 48, 8, move |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            proptest::collection::vec((key.clone().prop_map(Value::from), inner), 0..8).prop_map(Value::Map),
        ]
    })
}

fn encode(v: &Value) -> Vec<u8> {
    let mut buf = Vec::new();
    rmpv::encode::write_value(&mut buf, v).expect("encode");
    buf
}

proptest! {
    #![proptest_config(cases(512))]

    #[test]
    fn task_config_decoding_never_panics(v in value()) {
        if let Ok(t) = config::decode_task_config(&encode(&v)) {
            prop_assert!(t.runner.is_absolute());
            if let Some(b) = &t.bridge {
                prop_assert!(!b.is_empty() && b.len() <= 15 && !b.contains('/'));
            }
        }
    }

    #[test]
    fn plugin_config_decoding_never_panics(v in value()) {
        if let Ok(c) = config::decode_plugin_config(&encode(&v)) {
            prop_assert!(c.state_dir.is_absolute());
            prop_assert!(c.vmm_user != "root" || c.allow_root_vmm);
            prop_assert!(c.allowed_runner_roots.iter().all(|r| r.is_absolute()));
        }
    }

    #[test]
    fn arbitrary_bytes_are_refused_or_decoded(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        let _ = config::decode_task_config(&bytes);
        let _ = config::decode_plugin_config(&bytes);
    }

    #[test]
    fn supervisord_parsing_never_panics(text in "(\\[program:virtiofsd-[a-z]{0,4}\\]|[a-z]{0,8} ?[=:] ?[^\\n]{0,30}|[;#][^\\n]{0,10}| +[^\\n]{0,20}|\\PC{0,20})(\\n(\\[program:virtiofsd-[a-z]{0,4}\\]|command ?= ?[^\\n]{0,40}|environment=[^\\n]{0,30}| +[^\\n]{0,20}|\\PC{0,20})){0,12}") {
        if let Ok(programs) = supervisord::parse(&text) {
            for p in programs {
                prop_assert!(!p.tag.is_empty());
                prop_assert!(!p.command.is_empty());
            }
        }
    }

    #[test]
    fn runner_data_files_never_panic(
        hypervisor in prop_oneof![Just("qemu".to_string()), Just("cloud-hypervisor\n".to_string()), "\\PC{0,20}"],
        taps in "([a-z0-9%:/. -]{0,20}\\n?){0,4}",
        flags in "((vnet_hdr|multi_queue|\\PC{0,8})\\n?){0,3}",
        macvtaps in "([a-z0-9: ]{0,40}\\n?){0,3}",
        cid in "\\PC{0,12}",
        share_socket in "\\PC{0,30}",
        share_source in "\\PC{0,30}",
    ) {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("microvm-qemu-fuzz");
        let data = root.join("share/microvm");
        std::fs::create_dir_all(root.join("bin")).unwrap();
        std::fs::create_dir_all(data.join("virtiofs/t")).unwrap();
        std::fs::write(root.join("bin/microvm-run"), "#!/bin/sh\n").unwrap();
        let files: [(&str, &str); 5] = [
            ("hypervisor", &hypervisor),
            ("tap-interfaces", &taps),
            ("tap-flags", &flags),
            ("macvtap-interfaces", &macvtaps),
            ("vsock-cid", &cid),
        ];
        for (name, text) in files {
            std::fs::write(data.join(name), text).unwrap();
        }
        std::fs::write(data.join("virtiofs/t/socket"), &share_socket).unwrap();
        std::fs::write(data.join("virtiofs/t/source"), &share_source).unwrap();
        if let Ok(r) = Runner::read(Path::new(&root)) {
            for name in r.taps.iter().chain(r.macvtaps.iter().map(|m| &m.id)) {
                prop_assert!(!name.is_empty() && name.len() <= 15 && !name.contains('/') && !name.contains(' '));
            }
            if let Some(cid) = r.vsock_cid {
                prop_assert!(cid >= 3);
            }
        }
    }
}

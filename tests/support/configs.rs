//! What the binaries say about their own config: the keys they take, and
//! the effective config they read from a file.

use std::collections::BTreeSet;
use std::process::Command;

use crate::bins::{driver_bin, gitfront_bin};

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `nomad-driver-microvm config-keys`: every plugin config key.
pub fn driver_config_keys() -> BTreeSet<String> {
    let out = Command::new(driver_bin()).arg("config-keys").output().expect("run nomad-driver-microvm config-keys");
    assert!(out.status.success(), "config-keys: {}", text(&out.stderr));
    text(&out.stdout).lines().map(str::to_string).collect()
}

/// `gitfront check-config` of `toml_text`: Ok(the effective config it
/// prints) or Err(its error).
pub fn gitfront_check_config(toml_text: &str) -> Result<toml::Value, String> {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("gitfront.toml");
    std::fs::write(&file, toml_text).expect("write gitfront.toml");
    let out = Command::new(gitfront_bin()).arg("check-config").arg(&file).output().expect("run gitfront check-config");
    if !out.status.success() {
        return Err(text(&out.stderr));
    }
    Ok(toml::from_str(&text(&out.stdout))
        .unwrap_or_else(|e| panic!("gitfront check-config printed no TOML ({e}):\n{}", text(&out.stdout))))
}

/// Dotted keys of a TOML document (`nomad.token_file`, …).
pub fn dotted_keys(value: &toml::Value) -> BTreeSet<String> {
    fn walk(prefix: &str, v: &toml::Value, out: &mut BTreeSet<String>) {
        match v.as_table() {
            Some(t) => {
                for (k, v) in t {
                    let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                    walk(&key, v, out);
                }
            }
            None => {
                out.insert(prefix.to_string());
            }
        }
    }
    let mut out = BTreeSet::new();
    walk("", value, &mut out);
    out
}

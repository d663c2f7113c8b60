//! The README's reference tables name every key the binaries accept: keys
//! come from the binaries themselves, so a key added to one of them and not
//! documented fails here.

use microvm_e2e::bins::gitfront_bin;
use microvm_e2e::{driver_bin, repo_root};

fn readme(path: &str) -> String {
    std::fs::read_to_string(repo_root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The rows of the markdown table that follows `heading`.
fn table_after(text: &str, heading: &str) -> String {
    let start = text.find(heading).unwrap_or_else(|| panic!("no section {heading:?}"));
    text[start..]
        .lines()
        .skip(1)
        .skip_while(|l| !l.starts_with('|'))
        .take_while(|l| l.starts_with('|'))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn every_plugin_config_key_is_in_the_readme_table() {
    let out = std::process::Command::new(driver_bin()).arg("config-keys").output().expect("config-keys");
    assert!(out.status.success());
    let keys: Vec<String> = String::from_utf8_lossy(&out.stdout).lines().map(str::to_string).collect();
    assert!(keys.len() > 10, "{keys:?}");
    let table = table_after(&readme("README.md"), "### Plugin config");
    for key in keys {
        assert!(table.contains(&format!("| `{key}` |")), "README's plugin config table lacks `{key}`");
    }
}

#[test]
fn every_gitfront_key_is_in_both_readmes() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gitfront.toml");
    // token_file has no default, so it is printed only when set.
    std::fs::write(&config, "[nomad]\ntoken_file = \"/run/keys/nomad-token\"\n").unwrap();
    let out = std::process::Command::new(gitfront_bin()).arg("check-config").arg(&config).output().expect("gitfront");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mut keys = Vec::new();
    let mut section = String::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        if let Some(s) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = format!("{s}.");
        } else if let Some((k, _)) = line.split_once(" = ") {
            keys.push(format!("{section}{k}"));
        }
    }
    assert!(keys.len() > 20, "{keys:?}");
    let main = table_after(&readme("README.md"), "### gitfront config");
    let own = table_after(&readme("gitfront/README.md"), "### 1. Config");
    for key in keys {
        assert!(main.contains(&format!("`{key}`")), "README's gitfront config table lacks `{key}`");
        assert!(own.contains(&format!("| `{key}` |")), "gitfront/README.md's config table lacks `{key}`");
    }
}

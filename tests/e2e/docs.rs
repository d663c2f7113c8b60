//! The README's reference tables name every key the binaries accept: keys
//! come from the binaries themselves, so a key added to one of them and not
//! documented fails here.

use microvm_e2e::configs::{dotted_keys, driver_config_keys, gitfront_check_config};
use microvm_e2e::repo_root;

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
    let keys = driver_config_keys();
    assert!(keys.len() > 10, "{keys:?}");
    let table = table_after(&readme("README.md"), "### Plugin config");
    for key in keys {
        assert!(table.contains(&format!("| `{key}` |")), "README's plugin config table lacks `{key}`");
    }
}

#[test]
fn every_gitfront_key_is_in_both_readmes() {
    // token_file has no default, so it is printed only when set.
    let effective = gitfront_check_config("[nomad]\ntoken_file = \"/run/keys/nomad-token\"\n").expect("gitfront");
    let keys = dotted_keys(&effective);
    assert!(keys.len() > 20, "{keys:?}");
    let main = table_after(&readme("README.md"), "### gitfront config");
    let own = table_after(&readme("gitfront/README.md"), "### 1. Config");
    for key in keys {
        assert!(main.contains(&format!("`{key}`")), "README's gitfront config table lacks `{key}`");
        assert!(own.contains(&format!("| `{key}` |")), "gitfront/README.md's config table lacks `{key}`");
    }
}

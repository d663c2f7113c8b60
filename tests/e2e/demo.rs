//! The README's first command works: `scripts/demo.sh --once` brings up a
//! microVM under a Nomad dev agent, shows its console banner, and cleans up.

use std::process::Command;

use microvm_e2e::{repo_root, require_root};

#[test]
fn demo_shows_the_guest_banner_and_cleans_up() {
    if !require_root("demo_shows_the_guest_banner_and_cleans_up") {
        return;
    }
    let out = Command::new(repo_root().join("scripts/demo.sh")).arg("--once").output().expect("run demo.sh");
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    for wanted in [
        "microvm   true      true",
        "Task \"vm\" is \"running\"",
        "microvm-test-guest: booted example",
        "microvm-test-guest: ready",
        "cleaned up",
    ] {
        assert!(text.contains(wanted), "demo output lacks {wanted:?}:\n{text}");
    }
    let pid = text.lines().find_map(|l| l.strip_prefix("==> network namespace microvm-demo-")).unwrap_or("");
    let ns = format!("microvm-demo-{}", pid.split_whitespace().next().unwrap_or(""));
    let list = Command::new("ip").args(["netns", "list"]).output().unwrap();
    assert!(!String::from_utf8_lossy(&list.stdout).contains(&ns), "{ns} left behind");
    let vmm = Command::new("pgrep").args(["-f", "microvm@example"]).output().unwrap();
    assert!(vmm.stdout.is_empty(), "VMM left behind");
}

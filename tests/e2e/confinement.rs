//! A job submitter is not the node's root: runners, share sources and
//! bridges are confined by the plugin config, and a refusal names the rule
//! and the offending path, starting nothing and leaving nothing behind.

use std::time::Duration;

use microvm_e2e::runner::make_runner;
use microvm_e2e::vm::{World, leftovers, vm_job};
use microvm_e2e::{require_root, wait_until};

#[test]
fn runners_shares_and_bridges_outside_the_rules_are_refused() {
    if !require_root("runners_shares_and_bridges_outside_the_rules_are_refused") {
        return;
    }
    let w = World::new("confine", true, "");
    let out = w.dir.path().join("runners");
    let fine = w.runner("fine", 51, &[]);
    let etc = make_runner(&out, &["--hostname", "etc", "--tap", "vm-etc", "--share", "etc:/etc", "--store"]);
    let root = make_runner(&out, &["--hostname", "slash", "--tap", "vm-slash", "--share", "root:/", "--store"]);
    let escape = make_runner(&out, &["--hostname", "esc", "--tap", "vm-esc", "--share", "up:../../..", "--store"]);
    let unstored = make_runner(&out, &["--hostname", "tmp", "--tap", "vm-tmp"]);
    let unstored_refusal = format!("refused by `allowed_runner_roots`: runner {}", unstored.display());
    let cases = [
        ("etc", vm_job("etc", &etc, 0, ""), "refused by `allowed_share_roots`: share \"etc\" has source /etc"),
        ("slash", vm_job("slash", &root, 0, ""), "refused by `allowed_share_roots`: share \"root\" has source /,"),
        ("esc", vm_job("esc", &escape, 0, ""), "refused by `allowed_share_roots`: share \"up\" has source"),
        ("tmp", vm_job("tmp", &unstored, 0, ""), unstored_refusal.as_str()),
        ("bridge", vm_job("bridge", &fine, 0, "bridge = \"br9\""), "refused by `allowed_bridges`: bridge \"br9\""),
    ];
    for (job, hcl, wanted) in cases {
        let submitted = w.agent.run_job(job, &hcl);
        assert!(submitted.status.success(), "{}", String::from_utf8_lossy(&submitted.stderr));
        let events = w.agent.wait_failed(job, "vm");
        assert!(events.contains(wanted), "case {job}: events lack {wanted:?}:\n{events}");
        assert!(events.contains("Not Restarting"), "a policy refusal is not retried: {events}");
    }
    // Nothing started, nothing left: processes, interfaces, task dirs,
    // claims, sockets, `booted` links, GC roots.
    for host in ["etc", "slash", "esc", "tmp", "fine"] {
        let left = leftovers(&w.netns, &w.state_dir, host);
        assert!(left.is_empty(), "{host} left {left:?}");
    }
}

#[test]
fn a_share_source_swapped_for_a_symlink_is_refused() {
    if !require_root("a_share_source_swapped_for_a_symlink_is_refused") {
        return;
    }
    // The VMM user owns the VM's working dir, so it could replace a share's
    // source with a link to /etc between two boots; virtiofsd runs as root.
    let w = World::new("symlink", true, "");
    let (runner, _) = w.boot("sym", 52, 0);
    w.agent.nomad_ok(&["job", "stop", "-purge", "-detach", "sym"]);
    wait_until("the VM to stop", Duration::from_secs(60), Duration::from_millis(500), || {
        if w.vmm_pids("sym").is_empty() { Ok(()) } else { Err("running".into()) }
    });
    let data = w.work_dir("sym").join("data");
    std::fs::remove_dir_all(&data).unwrap();
    std::os::unix::fs::symlink("/etc", &data).unwrap();
    std::os::unix::fs::lchown(
        &data,
        Some(nix::unistd::User::from_name("microvm").unwrap().unwrap().uid.as_raw()),
        None,
    )
    .unwrap();

    assert!(w.run_vm_job("sym", &runner, 0).status.success());
    let events = w.agent.wait_failed("sym", "vm");
    assert!(events.contains("refused by `allowed_share_roots`: share \"data\" has source /etc"), "{events}");
    assert!(w.vmm_pids("sym").is_empty());
}

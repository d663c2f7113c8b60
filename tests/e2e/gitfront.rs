//! gitfront end to end: `git push` over a real sshd (forced command from
//! `gitfront authorized-key`) builds hosts with Debian's nix, copies them to
//! a file:// binary cache and runs them as microVMs under the real Nomad
//! agent with our driver; the push output is the deploy log.
//!
//! Each test has its own world (namespace, agent, sshd) and its own host
//! names, so that tests running side by side never see each other's VMs.

use std::path::Path;
use std::time::Duration;

use microvm_e2e::gitfront::{Front, Host, nomad, text, tree};
use microvm_e2e::vm::{World, pgrep};
use microvm_e2e::{Netns, open_tempdir, require_root, wait_until};

const BOOT: Duration = Duration::from_secs(180);
const NOMAD: &str = "http://127.0.0.1:4646";

/// A world whose driver may fetch runners from the front's binary cache.
fn world(tag: &str, dev: bool, front_dir: &Path) -> World {
    World::new(tag, dev, &format!("    substituters = [\"file://{}/cache\"]\n", front_dir.display()))
}

fn stderr(out: &std::process::Output) -> String {
    text(&out.stderr)
}

fn assert_contains(haystack: &str, needles: &[&str]) {
    for n in needles {
        assert!(haystack.contains(n), "missing {n:?} in:\n{haystack}");
    }
}

/// The VMM processes of `host` in this world (other tests may run VMs of
/// the same name at the same time).
fn vmms(w: &World, host: &str) -> Vec<i32> {
    let ours = w.netns.pids();
    pgrep(&format!("microvm@{host}")).into_iter().filter(|p| ours.contains(p)).collect()
}

fn runner_of(job: &serde_json::Value) -> String {
    job["TaskGroups"][0]["Tasks"][0]["Config"]["runner"].as_str().expect("runner").to_string()
}

#[test]
fn gitfront_push_runs_two_vms_updates_one_and_stops_one() {
    if !require_root("gitfront_push_runs_two_vms_updates_one_and_stops_one") {
        return;
    }
    let front_dir = open_tempdir();
    let w = world("gfpush", true, front_dir.path());
    let front = Front::start(w.netns.clone(), front_dir.path(), NOMAD);
    let ns = "alice-fleet";
    let work = front.workdir("alice", "fleet", "fleet");

    // 1. Two branches, two hosts, two VMs; both deploy logs in the push output.
    let first = work.commit_flake(&[Host::new("alpha", 2), Host::new("beta", 3)], "two hosts");
    let out = work.push(&["main:alpha", "main:beta"]);
    let log = stderr(&out);
    assert!(out.status.success(), "push failed:\n{log}");
    for host in ["alpha", "beta"] {
        assert_contains(
            &log,
            &[
                &format!(
                    "remote: [{host}] building nixosConfigurations.{host}.config.microvm.declaredRunner from commit {}",
                    &first[..8]
                ),
                &format!("remote: [{host}] built /nix/store/"),
                &format!("-microvm-qemu-{host} (1 vCPU, 256 MiB) in "),
                &format!("remote: [{host}] copied to the binary cache file://"),
                &format!("remote: [{host}] registered job {host} version 0 in namespace {ns}"),
                &format!("remote: [{host}] allocation "),
                &format!("remote: [{host}] running on node "),
            ],
        );
    }
    assert_eq!(front.branch_commit("alice", "fleet", "alpha").as_deref(), Some(first.as_str()));
    let alpha_alloc = nomad::wait_running(&w.agent, ns, "alpha", 0, BOOT);
    let beta_alloc = nomad::wait_running(&w.agent, ns, "beta", 0, BOOT);
    let c = nomad::wait_console(&w.agent, ns, &alpha_alloc, "microvm-test-guest: ready", BOOT);
    assert_contains(&c, &["microvm-test-guest: booted alpha", "ping 192.0.2.1 ok"]);
    let c = nomad::wait_console(&w.agent, ns, &beta_alloc, "microvm-test-guest: ready", BOOT);
    assert_contains(&c, &["microvm-test-guest: booted beta"]);
    let alpha_v0 = nomad::job(&w.agent, ns, "alpha");
    let runner0 = runner_of(&alpha_v0);
    assert_eq!(alpha_v0["Meta"]["gitfront.commit"], first.as_str());
    assert_eq!(alpha_v0["TaskGroups"][0]["Tasks"][0]["Driver"], "microvm");
    assert_eq!(alpha_v0["TaskGroups"][0]["Tasks"][0]["Resources"]["MemoryMB"], 256 + 64);
    // The runner's closure is in the binary cache (runner and the kernel it boots).
    let cache = front_dir.path().join("cache");
    let hash = |p: &str| p.trim_start_matches("/nix/store/")[..32].to_string();
    assert!(cache.join(format!("{}.narinfo", hash(&runner0))).exists(), "runner in the cache");
    let narinfos = std::fs::read_dir(&cache)
        .unwrap()
        .filter(|e| e.as_ref().is_ok_and(|e| e.file_name().to_string_lossy().ends_with(".narinfo")));
    assert!(narinfos.count() >= 4, "runner, kernel, initrd, virtiofsd");

    // `status` lists both VMs; the user can clone their own repo.
    let st = front.ssh("alice", Some("status"));
    let st_text = text(&st.stdout);
    assert!(st.status.success(), "status: {}", stderr(&st));
    assert_contains(&st_text, &["fleet/alpha: running on ", "fleet/beta: running on ", "version 0", &first[..8]]);
    let clone = front.dir.join("work/clone");
    let out = front.git(
        "alice",
        &front.dir.join("work"),
        &["clone", "-q", "-b", "alpha", "root@127.0.0.1:fleet.git", "clone"],
    );
    assert!(out.status.success(), "clone: {}", stderr(&out));
    assert!(clone.join("flake.nix").exists());

    // 2. Change alpha only, push both branches: alpha gets version 1 with
    //    the new runner, beta is untouched (same version, same allocation).
    let second = work.commit_flake(&[Host::new("alpha", 2).mem(300), Host::new("beta", 3)], "bigger alpha");
    let out = work.push(&["main:alpha", "main:beta"]);
    let log = stderr(&out);
    assert!(out.status.success(), "second push failed:\n{log}");
    assert_contains(
        &log,
        &[
            "remote: [alpha] built /nix/store/",
            "(1 vCPU, 300 MiB)",
            &format!("remote: [alpha] registered job alpha version 1 in namespace {ns}"),
            "remote: [alpha] running on node ",
            "remote: [beta] unchanged: job beta version 0 already runs /nix/store/",
        ],
    );
    let alpha_v1 = nomad::job(&w.agent, ns, "alpha");
    assert_eq!(alpha_v1["Version"], 1);
    let runner1 = runner_of(&alpha_v1);
    assert_ne!(runner1, runner0, "a new runner");
    assert_eq!(alpha_v1["Meta"]["gitfront.commit"], second.as_str());
    assert_eq!(alpha_v1["TaskGroups"][0]["Tasks"][0]["Resources"]["MemoryMB"], 300 + 64);
    let run_script = std::fs::read_to_string(Path::new(&runner1).join("bin/microvm-run")).unwrap();
    assert!(run_script.contains(" -m 300 "), "{run_script}");
    let alpha_alloc1 = nomad::wait_running(&w.agent, ns, "alpha", 1, BOOT);
    assert_ne!(alpha_alloc1, alpha_alloc);
    nomad::wait_console(&w.agent, ns, &alpha_alloc1, "microvm-test-guest: booted alpha", BOOT);
    let beta = nomad::job(&w.agent, ns, "beta");
    assert_eq!(beta["Version"], 0, "beta untouched");
    assert_eq!(beta["Meta"]["gitfront.commit"], first.as_str());
    let beta_allocs = nomad::allocs(&w.agent, ns, "beta");
    assert_eq!(beta_allocs.len(), 1, "no new beta allocation");
    assert_eq!(beta_allocs[0]["ID"], beta_alloc.as_str());
    assert_eq!(beta_allocs[0]["ClientStatus"], "running");
    assert_eq!(front.branch_commit("alice", "fleet", "beta").as_deref(), Some(second.as_str()));
    // Never two alphas at once: the old allocation ended before the new one started.
    let old = w.agent.api(&format!("/v1/allocation/{alpha_alloc}?namespace={ns}"));
    assert_eq!(old["ClientStatus"], "complete");
    assert_eq!(vmms(&w, "alpha").len(), 1, "one alpha VMM");

    // 4. Deleting a branch stops its job.
    let out = work.push(&[":beta"]);
    let log = stderr(&out);
    assert!(out.status.success(), "delete failed:\n{log}");
    assert_contains(
        &log,
        &["remote: [beta] branch deleted: stopping job beta", "remote: [beta] stopped job beta: its VM is gone"],
    );
    assert_eq!(nomad::job(&w.agent, ns, "beta")["Stop"], true);
    assert_eq!(nomad::allocs(&w.agent, ns, "beta")[0]["ClientStatus"], "complete");
    wait_until("beta's VMM to be gone", Duration::from_secs(30), Duration::from_millis(500), || {
        if vmms(&w, "beta").is_empty() { Ok(()) } else { Err("still there".into()) }
    });
    assert_eq!(front.branch_commit("alice", "fleet", "beta"), None);
    assert_eq!(nomad::allocs(&w.agent, ns, "alpha")[0]["ClientStatus"], "running", "alpha keeps running");
    let st = text(&front.ssh("alice", Some("status")).stdout);
    assert_contains(&st, &["fleet/alpha: running", "fleet/beta: stopped"]);
}

#[test]
fn gitfront_failed_build_rejects_only_that_ref() {
    if !require_root("gitfront_failed_build_rejects_only_that_ref") {
        return;
    }
    let front_dir = open_tempdir();
    let w = world("gffail", true, front_dir.path());
    let front = Front::start(w.netns.clone(), front_dir.path(), NOMAD);
    let ns = "alice-hosts";
    let work = front.workdir("alice", "hosts", "hosts");
    let good = work.commit_flake(&[Host::new("gamma", 4)], "gamma");
    let out = work.push(&["main:gamma"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let gamma_alloc = nomad::wait_running(&w.agent, ns, "gamma", 0, BOOT);
    let gamma_runner = runner_of(&nomad::job(&w.agent, ns, "gamma"));

    // gamma's new commit does not build; delta's does. One push, both refs.
    // The pusher's environment reaches the forced command (this sshd
    // accepts NIX_* and NOMAD_*) and must change nothing: with this
    // NIX_CONFIG no build could run, with this NOMAD_ADDR no job register.
    let bad = work.commit_flake(&[Host::new("gamma", 4).broken(), Host::new("delta", 5)], "break gamma, add delta");
    let hostile = [("NIX_CONFIG", "max-jobs = 0"), ("NOMAD_ADDR", "http://127.0.0.1:1")];
    // Control: the same sshd hands both to a forced command (the probe
    // key's is `env`), so what follows is gitfront ignoring them, not sshd
    // dropping them.
    let env = front.forced_command_env(&hostile);
    assert_contains(&env, &["NIX_CONFIG=max-jobs = 0", "NOMAD_ADDR=http://127.0.0.1:1", "SSH_CONNECTION="]);
    let unsent = front.forced_command_env(&[]);
    assert!(!unsent.contains("NIX_CONFIG=") && !unsent.contains("NOMAD_ADDR="), "{unsent}");
    let out = work.push_sending_env(&["main:gamma", "main:delta"], &hostile);
    let log = stderr(&out);
    assert!(!out.status.success(), "the push must fail:\n{log}");
    assert_contains(
        &log,
        &[
            "remote: [gamma]   | ",
            "deliberate build failure: gamma is broken",
            "remote: [gamma] REJECTED refs/heads/gamma: building nixosConfigurations.gamma.config.microvm.declaredRunner failed",
            "remote: [delta] registered job delta version 0",
            "remote: [delta] running on node ",
        ],
    );
    let porcelain = text(&out.stdout);
    assert!(
        porcelain.contains("!\trefs/heads/main:refs/heads/gamma\t[remote rejected] (hook declined)"),
        "{porcelain}"
    );
    assert!(porcelain.contains("*\trefs/heads/main:refs/heads/delta\t[new branch]"), "{porcelain}");
    // The repo's gamma did not move; delta is the new commit.
    assert_eq!(front.branch_commit("alice", "hosts", "gamma").as_deref(), Some(good.as_str()));
    assert_eq!(front.branch_commit("alice", "hosts", "delta").as_deref(), Some(bad.as_str()));
    // The running gamma job is untouched: same version, runner, allocation.
    let gamma = nomad::job(&w.agent, ns, "gamma");
    assert_eq!(gamma["Version"], 0);
    assert_eq!(runner_of(&gamma), gamma_runner);
    let allocs = nomad::allocs(&w.agent, ns, "gamma");
    assert_eq!(allocs.len(), 1);
    assert_eq!(allocs[0]["ID"], gamma_alloc.as_str());
    assert_eq!(allocs[0]["ClientStatus"], "running");
    nomad::wait_running(&w.agent, ns, "delta", 0, BOOT);

    // Push options never reach the hook: the server does not offer them.
    let out = work.git(&["push", "-o", "ci.skip", "origin", "main:delta"]);
    assert!(!out.status.success());
    assert_contains(&stderr(&out), &["the receiving end does not support push options"]);

    // A tag is refused with a reason, and so is a branch that is no host name.
    let out = work.push(&["main:refs/tags/v1", "main:feature/x"]);
    let log = stderr(&out);
    assert!(!out.status.success());
    assert_contains(
        &log,
        &[
            "REJECTED refs/tags/v1: refs/tags/v1 is a tag; only branches (refs/heads/<host>) are deployed",
            "REJECTED refs/heads/feature/x: refs/heads/feature/x cannot be deployed: branch name \"feature/x\" contains '/'; a branch names a host",
        ],
    );
}

/// What happens after registration is reported, not undone: a runner that
/// builds but cannot boot, and a guest larger than any node. Both refs move
/// (the branch says what Nomad was asked to run).
#[test]
fn gitfront_failed_deployments_are_reported_and_the_refs_move() {
    if !require_root("gitfront_failed_deployments_are_reported_and_the_refs_move") {
        return;
    }
    let front_dir = open_tempdir();
    let w = world("gfdepl", true, front_dir.path());
    let front = Front::start(w.netns.clone(), front_dir.path(), NOMAD);
    let ns = "alice-broken";
    let nodes = w.agent.api("/v1/nodes");
    let node = w.agent.api(&format!("/v1/node/{}", nodes[0]["ID"].as_str().expect("a node")));
    let node_name = node["Name"].as_str().expect("node name").to_string();
    let node_mem = node["NodeResources"]["Memory"]["MemoryMB"].as_u64().expect("node memory") as u32;
    let big = node_mem + 1024;
    // Within gitfront's limit, so that Nomad is asked.
    let config = std::fs::read_to_string(&front.config).unwrap();
    std::fs::write(&front.config, format!("{config}\n[limits]\nmax_mem = {}\n", big * 2)).unwrap();

    let work = front.workdir("alice", "broken", "broken");
    let commit = work.commit_flake(
        &[Host::new("iota", 12).hypervisor("cloud-hypervisor"), Host::new("kappa", 13).mem(big)],
        "iota cannot boot, kappa fits no node",
    );
    let out = work.push(&["main:iota", "main:kappa"]);
    let log = stderr(&out);
    // As documented: what happens after registration does not undo it.
    assert!(out.status.success(), "the push must succeed:\n{log}");
    let porcelain = text(&out.stdout);
    for host in ["iota", "kappa"] {
        assert!(porcelain.contains(&format!("*\trefs/heads/main:refs/heads/{host}\t[new branch]")), "{porcelain}");
        assert_eq!(front.branch_commit("alice", "broken", host).as_deref(), Some(commit.as_str()));
    }

    // iota: placed, started, exits 1 each time; Nomad gives up after the
    // policy's 2 restarts. The push names the node, the allocation, the
    // task's exit and Nomad's reason, and what the VMM printed.
    let allocs = nomad::allocs(&w.agent, ns, "iota");
    // The oldest: Nomad may have rescheduled it meanwhile.
    let failed = allocs.last().expect("an iota allocation");
    let failed_id = failed["ID"].as_str().unwrap();
    assert_eq!(failed["ClientStatus"], "failed", "{failed}");
    assert_eq!(failed["NodeName"], node_name.as_str());
    assert_eq!(failed["TaskStates"]["vm"]["Failed"], true);
    assert_eq!(failed["TaskStates"]["vm"]["Restarts"], 2);
    let short = &failed_id[..8];
    assert_contains(
        &log,
        &[
            "-microvm-cloud-hypervisor-iota (1 vCPU, 256 MiB) in ",
            &format!("remote: [iota] registered job iota version 0 in namespace {ns}"),
            &format!("remote: [iota] allocation {short} placed on node {node_name}"),
            "remote: [iota]   Restarting: Task restarting in ",
            &format!(
                "remote: [iota] FAILED on node {node_name} (allocation {short}): task vm failed after 2 restarts: \
                 Exit Code: 1; not restarted: Exceeded allowed attempts 2 in interval 10m0s and mode is \"fail\""
            ),
            "line(s) of task vm's stderr:",
            "remote: [iota]   | microvm-run: cloud-hypervisor runner iota is a layout-only fake, not bootable here",
            "remote: [iota] the branch moves anyway: job iota version 0 stays registered and Nomad reschedules it; \
             push a fix, or delete the branch (`git push <remote> :iota`) to stop it",
        ],
    );
    // A VM that exits at once is "running" between each start and exit:
    // that must not pass for a deployed VM.
    for wrong in ["[iota] running on node", "[iota] deployment "] {
        assert!(!log.contains(wrong), "{wrong:?} in:\n{log}");
    }
    // Every attempt's events, each once, up to Nomad giving up: more than
    // the 10 Nomad keeps per task.
    for (event, n) in [("Started: Task started by client", 3), ("Terminated: Exit Code: 1", 3), ("Not Restarting: ", 1)]
    {
        let seen = log.matches(&format!("remote: [iota]   {event}")).count();
        assert_eq!(seen, n, "{event:?} {seen} times in:\n{log}");
    }

    // kappa: Nomad cannot place it; its blocked evaluation says why, and
    // so does the push.
    let mem_mb = big + 64;
    assert_contains(
        &log,
        &[
            &format!("-microvm-qemu-kappa (1 vCPU, {big} MiB) in "),
            &format!("remote: [kappa] registered job kappa version 0 in namespace {ns}"),
            &format!(
                "remote: [kappa] cannot place the VM (group vm: 200 MHz CPU, {mem_mb} MiB memory): \
                 1 node(s) evaluated; 1 out of resources: memory (1)"
            ),
            "remote: [kappa] Nomad will place it once a node fits (blocked evaluation ",
            "remote: [kappa] the branch moves anyway: job kappa version 0 stays registered and waits for a node \
             that can take it; push a change, or delete the branch (`git push <remote> :kappa`) to drop it",
        ],
    );
    assert!(!log.contains("[kappa] allocation "), "{log}");
    assert!(nomad::allocs(&w.agent, ns, "kappa").is_empty(), "no kappa allocation");
    let evals = w.agent.api(&format!("/v1/job/kappa/evaluations?namespace={ns}"));
    let evals = evals.as_array().unwrap();
    let blocked = evals.iter().find(|e| e["Status"] == "blocked").expect("a blocked evaluation");
    assert!(log.contains(&format!("(blocked evaluation {})", &blocked["ID"].as_str().unwrap()[..8])), "{log}");
    let placed = evals.iter().find(|e| e["FailedTGAllocs"]["vm"].is_object()).expect("the failed placement");
    let metric = &placed["FailedTGAllocs"]["vm"];
    assert_eq!(metric["NodesExhausted"], 1, "{metric}");
    assert_eq!(metric["DimensionExhausted"]["memory"], 1, "{metric}");

    // Deleting both branches stops both jobs (kappa never had a VM).
    let out = work.push(&[":iota", ":kappa"]);
    let log = stderr(&out);
    assert!(out.status.success(), "delete failed:\n{log}");
    assert_contains(
        &log,
        &["remote: [iota] stopped job iota: its VM is gone", "remote: [kappa] stopped job kappa: it had no VM"],
    );
    for host in ["iota", "kappa"] {
        assert_eq!(nomad::job(&w.agent, ns, host)["Stop"], true);
        assert_eq!(front.branch_commit("alice", "broken", host), None);
    }
}

#[test]
fn gitfront_refuses_and_creates_nothing() {
    if !require_root("gitfront_refuses_and_creates_nothing") {
        return;
    }
    let dir = open_tempdir();
    let netns = std::sync::Arc::new(Netns::new("gfref"));
    // No Nomad at all: nothing here gets that far.
    let front = Front::start(netns, dir.path(), "http://127.0.0.1:4999");
    // bob's repo, made directly on disk (a push of bob's would need Nomad).
    let bob_commit = front.seed_repo(
        "bob",
        "fleet",
        "zeta",
        &[("flake.nix", microvm_e2e::gitfront::flake_nix(&[Host::new("zeta", 9)]))],
        "bob's",
    );
    let bob_repo = front.repo_dir("bob", "fleet");
    let before = tree(dir.path());

    let refused = |user: &str, cmd: Option<&str>, reason: &str| {
        let out = front.ssh(user, cmd);
        let err = stderr(&out);
        assert!(!out.status.success(), "{cmd:?} was allowed: {err}");
        assert!(err.contains("gitfront: ") && err.contains(reason), "{cmd:?}: {err:?} lacks {reason:?}");
        assert_eq!(err.trim().lines().count(), 1, "{cmd:?}: one line: {err:?}");
        assert!(out.stdout.is_empty(), "{cmd:?} printed {:?}", text(&out.stdout));
    };
    refused("alice", None, "refused: no shell here");
    refused("alice", Some("ls"), "refused: \"ls\" is not allowed");
    refused("alice", Some("ls -la /"), "refused: \"ls\" is not allowed");
    refused("alice", Some("bash -i"), "refused: \"bash\" is not allowed");
    // Each command that would create a file names its own under the test's
    // dir; none may exist afterwards.
    let pwned = |n: u32| dir.path().join(format!("pwned-{n}"));
    let p = |n: u32| pwned(n).display().to_string();
    refused("alice", Some(&format!("scp -t {}", p(1))), "refused: \"scp\" is not allowed");
    refused("alice", Some(&format!("touch {}", p(2))), "refused: \"touch\" is not allowed");
    refused("alice", Some(&format!("git-upload-pack 'fleet'; touch {}", p(3))), "exactly one argument");
    refused("alice", Some(&format!("git-upload-pack 'fleet' && touch {}", p(4))), "exactly one argument");
    refused("alice", Some(&format!("git-upload-pack '$(touch {})'", p(5))), "bad repo name");
    refused("alice", Some("git-upload-pack '../bob/fleet'"), "bad repo name");
    refused("alice", Some("git-upload-pack 'bob/fleet'"), "contains '/'");
    refused("alice", Some(&format!("git-upload-pack '{}'", bob_repo.display())), "contains '/'");
    refused("alice", Some("git-receive-pack '../bob/fleet.git'"), "contains '..'");
    refused("alice", Some(&format!("git-receive-pack 'fleet' --upload-pack='touch {}'", p(6))), "exactly one argument");
    refused("alice", Some(&format!("git-upload-pack '--upload-pack=touch {}'", p(7))), "bad repo name");
    refused("alice", Some("git-upload-pack 'fleet'"), "no repo fleet yet");
    refused("bob", Some("git-receive-pack 'a b'"), "contains a space");

    // The real clients, as people would try it.
    let work = dir.path().join("work");
    let git_refused = |args: &[&str], reason: &str| {
        let out = front.git("alice", &work, args);
        let err = stderr(&out);
        assert!(!out.status.success(), "git {args:?} was allowed: {err}");
        assert!(err.contains(reason), "git {args:?}: {err:?} lacks {reason:?}");
    };
    git_refused(&["clone", "root@127.0.0.1:../bob/fleet", "c1"], "contains '..'");
    git_refused(&["clone", "root@127.0.0.1:~bob/fleet", "c2"], "contains '~'");
    git_refused(&["clone", &format!("root@127.0.0.1:{}", bob_repo.display()), "c3"], "contains '/'");
    git_refused(&["clone", "root@127.0.0.1:fleet", "c4"], "no repo fleet yet");
    // The client's --upload-pack/--receive-pack become the remote command.
    let upload = format!("--upload-pack=touch {}; git-upload-pack", p(8));
    git_refused(&["clone", &upload, "root@127.0.0.1:fleet", "c5"], "\"touch\" is not allowed");
    let upload = format!("--upload-pack=touch {}", p(9));
    git_refused(&["clone", &upload, "root@127.0.0.1:fleet", "c6"], "\"touch\" is not allowed");
    let alice = front.workdir("alice", "alice", "fleet");
    alice.commit_flake(&[Host::new("eta", 8)], "alice's");
    let push_refused = |url: &str, reason: &str| {
        let out = alice.git(&["push", url, "main:eta"]);
        let err = stderr(&out);
        assert!(!out.status.success(), "push to {url} was allowed: {err}");
        assert!(err.contains(reason), "push to {url}: {err:?} lacks {reason:?}");
    };
    push_refused("root@127.0.0.1:../bob/fleet", "contains '..'");
    push_refused(&format!("root@127.0.0.1:{}", bob_repo.display()), "contains '/'");
    push_refused("root@127.0.0.1:bob/fleet", "contains '/'");
    push_refused("root@127.0.0.1:my repo", "contains a space");
    push_refused("root@127.0.0.1:it's", "exactly one argument");
    push_refused("root@127.0.0.1:say\"hi\"", "contains a quote");
    push_refused("root@127.0.0.1:a;reboot", "contains ';'");
    push_refused(&format!("root@127.0.0.1:{}", "r".repeat(101)), "101 bytes, over the limit of 100");
    // scp, both protocols (legacy scp -t and SFTP).
    let file = work.join("payload");
    std::fs::write(&file, "x").unwrap();
    for legacy in [true, false] {
        let mut cmd = front.netns.command("scp");
        if legacy {
            cmd.arg("-O");
        }
        let key = &front.alice.private;
        cmd.args(["-F", "/dev/null", "-P", "2222", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no"])
            .args(["-o", "UserKnownHostsFile=/dev/null", "-o", "IdentitiesOnly=yes", "-i"])
            .arg(key)
            .arg(&file)
            .arg(format!("root@127.0.0.1:{}", p(10 + legacy as u32)));
        let out = cmd.output().unwrap();
        assert!(!out.status.success(), "scp (legacy: {legacy}) was allowed");
    }
    let receive = format!("--receive-pack=touch {}; git-receive-pack", p(12));
    let out = alice.git(&["push", &receive, "root@127.0.0.1:fleet", "main:eta"]);
    assert!(!out.status.success() && stderr(&out).contains("\"touch\" is not allowed"), "{}", stderr(&out));
    for n in 1..=12 {
        assert!(!pwned(n).exists(), "{} was created", pwned(n).display());
    }

    // Nothing was created: no repo, no scratch dir, bob's repo unchanged.
    let work_dirs = |t: Vec<String>| t.into_iter().filter(|p| !p.starts_with("work")).collect::<Vec<_>>();
    assert_eq!(work_dirs(tree(dir.path())), work_dirs(before), "files appeared");
    assert_eq!(front.branch_commit("bob", "fleet", "zeta").as_deref(), Some(bob_commit.as_str()));
    assert!(!dir.path().join("state").exists(), "no state dir");

    // The push size limit (`limits.max_push_bytes`; the config is read per
    // session): a 1 MB incompressible file does not fit in 100 kB.
    let config = std::fs::read_to_string(&front.config).unwrap();
    std::fs::write(&front.config, format!("{config}\n[limits]\nmax_push_bytes = 100000\n")).unwrap();
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let noise: Vec<u8> = (0..1_000_000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect();
    std::fs::write(alice.dir.join("blob"), noise).unwrap();
    alice.git_ok(&["add", "blob"]);
    alice.git_ok(&["commit", "-q", "-m", "big"]);
    let out = alice.push(&["main:eta"]);
    assert!(!out.status.success());
    assert_contains(&stderr(&out), &["pack exceeds maximum allowed size"]);
    assert_eq!(front.branch_commit("alice", "fleet", "eta"), None);
}

#[test]
fn gitfront_nomad_down_rejects_the_push_and_registers_nothing() {
    if !require_root("gitfront_nomad_down_rejects_the_push_and_registers_nothing") {
        return;
    }
    let front_dir = open_tempdir();
    // A persistent agent: its state survives the restart below.
    let mut w = world("gfdown", false, front_dir.path());
    let front = Front::start(w.netns.clone(), front_dir.path(), NOMAD);
    let ns = "alice-solo";
    let work = front.workdir("alice", "solo", "solo");
    let first = work.commit_flake(&[Host::new("epsilon", 6)], "epsilon");
    let out = work.push(&["main:epsilon"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let alloc = nomad::wait_running(&w.agent, ns, "epsilon", 0, BOOT);
    let runner = runner_of(&nomad::job(&w.agent, ns, "epsilon"));

    // Nomad goes away; a new commit (and a new host) cannot be deployed.
    w.agent.stop();
    work.commit_flake(&[Host::new("epsilon", 6).mem(300), Host::new("zeta", 7)], "bigger epsilon, zeta");
    let out = work.push(&["main:epsilon", "main:zeta"]);
    let log = stderr(&out);
    assert!(!out.status.success(), "{log}");
    for host in ["epsilon", "zeta"] {
        assert_contains(
            &log,
            &[&format!("remote: [{host}] REJECTED refs/heads/{host}: cannot reach Nomad at http://127.0.0.1:4646: ")],
        );
    }
    // Deleting a branch needs Nomad too: refused, the branch stays.
    let out = work.push(&[":epsilon"]);
    assert!(!out.status.success());
    assert_contains(&stderr(&out), &["REJECTED refs/heads/epsilon: cannot reach Nomad"]);
    assert_eq!(front.branch_commit("alice", "solo", "epsilon").as_deref(), Some(first.as_str()));
    assert_eq!(front.branch_commit("alice", "solo", "zeta"), None);

    // Back up: nothing half-registered — epsilon as before, no zeta.
    w.agent.restart();
    let job = nomad::job(&w.agent, ns, "epsilon");
    assert_eq!(job["Version"], 0);
    assert_eq!(runner_of(&job), runner);
    let missing = w.agent.nomad(&["operator", "api", &format!("/v1/job/zeta?namespace={ns}")]);
    assert!(!missing.status.success() || text(&missing.stdout).contains("not found"), "zeta exists");
    let allocs = nomad::allocs(&w.agent, ns, "epsilon");
    assert_eq!(allocs[0]["ID"], alloc.as_str());
    let st = front.ssh("alice", Some("status"));
    assert!(st.status.success(), "{}", stderr(&st));
    assert_contains(&text(&st.stdout), &["solo/epsilon: ", "version 0", &first[..8]]);
    assert!(!text(&st.stdout).contains("zeta"), "{}", text(&st.stdout));
}

/// One branch of a hostile push: (host, files, symlinks, what the
/// rejection says).
type Attack<'a> = (&'a str, Vec<(&'a str, String)>, Vec<(&'a str, &'a str)>, Vec<String>);

/// A random token, so that finding it anywhere means it was copied.
fn random_token(tag: &str) -> String {
    let mut bytes = [0u8; 16];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom").unwrap(), &mut bytes).unwrap();
    format!("{tag}-{}", bytes.iter().map(|b| format!("{b:02x}")).collect::<String>())
}

fn store_paths() -> std::collections::BTreeSet<String> {
    std::fs::read_dir("/nix/store").unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect()
}

/// The store paths added since `before` that hold one of `needles` in a
/// file (symlinks are not followed: a link to a secret is not its content).
fn paths_holding(before: &std::collections::BTreeSet<String>, needles: &[&str]) -> Vec<String> {
    fn holds(p: &Path, needles: &[&str]) -> bool {
        let Ok(m) = std::fs::symlink_metadata(p) else { return false };
        if m.is_dir() {
            let entries = std::fs::read_dir(p).map(|d| d.flatten().collect::<Vec<_>>()).unwrap_or_default();
            return entries.iter().any(|e| holds(&e.path(), needles));
        }
        if !m.is_file() {
            return false;
        }
        let data = std::fs::read(p).unwrap_or_default();
        needles.iter().any(|n| data.windows(n.len()).any(|w| w == n.as_bytes()))
    }
    store_paths()
        .difference(before)
        .filter(|name| holds(&Path::new("/nix/store").join(name), needles))
        .cloned()
        .collect()
}

/// A pushed flake runs as the gitfront account, which can read the Nomad
/// token and every user's repo; nothing of either may reach the store
/// (where the pusher's VM could get it) or the push output. Each branch
/// tries one way; each is refused with the reason, nothing is registered.
#[test]
fn gitfront_flakes_cannot_read_local_files() {
    if !require_root("gitfront_flakes_cannot_read_local_files") {
        return;
    }
    let front_dir = open_tempdir();
    let dir = front_dir.path();
    let w = world("gfread", true, dir);
    let front = Front::start(w.netns.clone(), dir, NOMAD);

    // The Nomad token gitfront uses, and a tarball of it.
    let token = random_token("NOMAD-TOKEN");
    let secrets = dir.join("secrets");
    std::fs::create_dir_all(&secrets).unwrap();
    let token_file = secrets.join("nomad-token");
    std::fs::write(&token_file, &token).unwrap();
    let tar = dir.join("token.tar.gz");
    let out =
        std::process::Command::new("tar").arg("-czf").arg(&tar).arg("-C").arg(&secrets).arg(".").output().unwrap();
    assert!(out.status.success());
    let config = std::fs::read_to_string(&front.config).unwrap();
    let config = config.replace("[nomad]\n", &format!("[nomad]\ntoken_file = \"{}\"\n", token_file.display()));
    std::fs::write(&front.config, config).unwrap();

    // bob's repo, with something only bob should see.
    let bob_mark = random_token("BOB-PRIVATE");
    let bob_commit = front.seed_repo(
        "bob",
        "fleet",
        "zeta",
        &[("flake.nix", microvm_e2e::gitfront::flake_nix(&[Host::new("zeta", 9)])), ("notes", bob_mark.clone())],
        "bob's",
    );
    let bob_repo = front.repo_dir("bob", "fleet");

    let token_path = token_file.display().to_string();
    let bob_path = bob_repo.display().to_string();
    let tar_path = tar.display().to_string();
    let fake_hash = "sha256-AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
    let host = |name: &str, ip: u8| Host::new(name, ip);
    let flake = |h: Host, inputs: &str| microvm_e2e::gitfront::flake_nix_with(&[h], inputs);
    let lock_with_token = serde_json::json!({
        "nodes": {
            "root": { "inputs": { "leak": "leak" } },
            "leak": {
                "flake": false,
                "locked": { "type": "path", "path": token_path, "narHash": fake_hash, "lastModified": 1 },
                "original": { "type": "path", "path": token_path }
            }
        },
        "root": "root",
        "version": 7
    });
    let attacks: Vec<Attack> = vec![
        (
            "pathinput",
            vec![(
                "flake.nix",
                flake(
                    host("pathinput", 20).env("LEAK", "builtins.readFile inputs.leak"),
                    &format!("leak = {{ url = \"path:{token_path}\"; flake = false; }};"),
                ),
            )],
            vec![],
            vec![format!(
                "REJECTED refs/heads/pathinput: flake.nix: input leak (path:{token_path}) reads local files; \
                 pushed flakes may only fetch inputs over the network"
            )],
        ),
        (
            "bobinput",
            vec![(
                "flake.nix",
                flake(
                    host("bobinput", 21).env("LEAK", "builtins.readFile \"${inputs.bob}/notes\""),
                    &format!("bob = {{ url = \"git+file://{bob_path}?ref=zeta\"; flake = false; }};"),
                ),
            )],
            vec![],
            vec![format!("REJECTED refs/heads/bobinput: flake.nix: input bob (git+file://{bob_path}) reads local files")],
        ),
        (
            "lockedpath",
            vec![
                (
                    "flake.nix",
                    flake(
                        host("lockedpath", 22).env("LEAK", "builtins.readFile inputs.leak"),
                        &format!("leak = {{ url = \"path:{token_path}\"; flake = false; }};"),
                    ),
                ),
                ("flake.lock", lock_with_token.to_string()),
            ],
            vec![],
            vec![format!("REJECTED refs/heads/lockedpath: flake.lock: input leak (path:{token_path}) reads local files")],
        ),
        (
            "locklink",
            vec![("flake.nix", flake(host("locklink", 23), ""))],
            vec![("flake.lock", token_path.as_str())],
            vec!["REJECTED refs/heads/locklink: flake.lock is a symlink; it must be a file of the commit".into()],
        ),
        (
            "fetchgit",
            vec![(
                "flake.nix",
                flake(
                    host("fetchgit", 24).env(
                        "LEAK",
                        &format!(
                            "builtins.readFile \"${{builtins.fetchGit {{ url = \"file://{bob_path}\"; rev = \"{bob_commit}\"; }}}}/notes\""
                        ),
                    ),
                    "",
                ),
            )],
            vec![],
            vec![
                "REJECTED refs/heads/fetchgit: building nixosConfigurations.fetchgit.config.microvm.declaredRunner failed"
                    .into(),
                format!("access to absolute path '{bob_path}' is forbidden"),
            ],
        ),
        (
            "fetchtarball",
            vec![(
                "flake.nix",
                flake(
                    host("fetchtarball", 25).env(
                        "LEAK",
                        &format!(
                            "builtins.readFile \"${{builtins.fetchTarball {{ url = \"file://{tar_path}\"; sha256 = \"{fake_hash}\"; }}}}/nomad-token\""
                        ),
                    ),
                    "",
                ),
            )],
            vec![],
            vec![
                "REJECTED refs/heads/fetchtarball: building nixosConfigurations.fetchtarball.config.microvm.declaredRunner failed"
                    .into(),
                format!("access to absolute path '{tar_path}' is forbidden"),
            ],
        ),
        (
            // With a wrong hash, plain pure evaluation would download the
            // file into the store and print its hash; nixConfig asks to
            // lift the restriction.
            "fetchurl",
            vec![(
                "flake.nix",
                flake(
                    host("fetchurl", 26).env(
                        "LEAK",
                        &format!(
                            "builtins.readFile (builtins.fetchurl {{ url = \"file://{token_path}\"; sha256 = \"{fake_hash}\"; }})"
                        ),
                    ),
                    "",
                )
                .replacen(
                    "outputs =",
                    "nixConfig = { restrict-eval = false; allowed-uris = \"file://\"; };\n  outputs =",
                    1,
                ),
            )],
            vec![],
            vec![
                "ignoring untrusted flake configuration setting 'restrict-eval'".into(),
                format!("access to absolute path '{token_path}' is forbidden"),
                "REJECTED refs/heads/fetchurl: building nixosConfigurations.fetchurl.config.microvm.declaredRunner failed"
                    .into(),
            ],
        ),
        (
            // getFlake of a locked local ref is fetched without any check,
            // restrict-eval or not (nix copies the path, then compares the
            // hash and prints it): only the confinement stops it.
            "getflakepath",
            vec![(
                "flake.nix",
                flake(
                    host("getflakepath", 29).env(
                        "LEAK",
                        &format!(
                            "builtins.readFile \"${{(builtins.getFlake \"path:{}?narHash={}\").outPath}}/nomad-token\"",
                            secrets.display(),
                            fake_hash.replace('+', "%2B").replace('=', "%3D")
                        ),
                    ),
                    "",
                ),
            )],
            vec![],
            vec![
                "REJECTED refs/heads/getflakepath: building nixosConfigurations.getflakepath.config.microvm.declaredRunner failed"
                    .into(),
                "Permission denied".into(),
            ],
        ),
        (
            "getflakegit",
            vec![(
                "flake.nix",
                flake(
                    host("getflakegit", 30).env(
                        "LEAK",
                        &format!(
                            "builtins.readFile \"${{(builtins.getFlake \"git+file://{bob_path}?ref=zeta&rev={bob_commit}\").outPath}}/notes\""
                        ),
                    ),
                    "",
                ),
            )],
            vec![],
            vec![
                "REJECTED refs/heads/getflakegit: building nixosConfigurations.getflakegit.config.microvm.declaredRunner failed"
                    .into(),
            ],
        ),
        (
            "readlink",
            vec![("flake.nix", flake(host("readlink", 27).env("LEAK", "builtins.readFile ./leak"), ""))],
            vec![("leak", token_path.as_str())],
            vec![
                "REJECTED refs/heads/readlink: building nixosConfigurations.readlink.config.microvm.declaredRunner failed"
                    .into(),
                format!("access to canonical path '{token_path}' is forbidden in restricted mode"),
            ],
        ),
    ];

    let work = front.workdir("alice", "evil", "evil");
    let mut commits = Vec::new();
    for (name, files, links, _) in &attacks {
        commits.push((name.to_string(), work.commit_tree(files, links, name)));
    }
    // Where Landlock turns the refusal into nix failing to open the file
    // (before gitfront could name the input that wants it).
    let confined_reasons = [
        (
            "pathinput",
            vec![
                "REJECTED refs/heads/pathinput: reading the inputs of flake.nix failed".to_string(),
                format!("opening file '{token_path}': Permission denied"),
            ],
        ),
        (
            "bobinput",
            vec![
                "REJECTED refs/heads/bobinput: reading the inputs of flake.nix failed".to_string(),
                format!("'{bob_path}' does not appear to be a git repository"),
            ],
        ),
    ];
    // Stopped by the confinement alone: left out of the unconfined round,
    // where they would copy the token and bob's repo into the store.
    let only_confined = ["getflakepath", "getflakegit"];
    let config = std::fs::read_to_string(&front.config).unwrap();
    for confined in [false, true] {
        // Each layer on its own: first the lock checks and nix's
        // restrictions without Landlock, then everything (the default).
        let mode = if confined { "landlock" } else { "none" };
        let text = config.replace("[build]\n", &format!("[build]\nconfinement = \"{mode}\"\n"));
        std::fs::write(&front.config, text).unwrap();
        let round: Vec<_> = attacks.iter().filter(|a| confined || !only_confined.contains(&a.0)).collect();
        let refspecs: Vec<String> = round
            .iter()
            .map(|a| format!("{}:refs/heads/{}", commits.iter().find(|(n, _)| n == a.0).unwrap().1, a.0))
            .collect();
        let refspecs: Vec<&str> = refspecs.iter().map(String::as_str).collect();
        let before = store_paths();
        let out = work.push(&refspecs);
        let log = stderr(&out);
        assert!(!out.status.success(), "the push must fail ({mode}):\n{log}");
        for (name, _, _, reasons) in &round {
            let reasons = match confined_reasons.iter().find(|(n, _)| n == name) {
                Some((_, r)) if confined => r,
                _ => reasons,
            };
            let reasons: Vec<&str> = reasons.iter().map(String::as_str).collect();
            assert_contains(&log, &reasons);
            assert!(!log.contains(&format!("[{name}] registered job")), "{name} was registered ({mode}):\n{log}");
            assert_eq!(front.branch_commit("alice", "evil", name), None, "{name} moved ({mode})");
        }
        assert!(!log.contains(&token) && !log.contains(&bob_mark), "a secret is in the push output ({mode}):\n{log}");
        let jobs = w.agent.api("/v1/jobs?namespace=*");
        let ours: Vec<_> = jobs.as_array().unwrap().iter().filter(|j| j["Namespace"] == "alice-evil").collect();
        assert!(ours.is_empty(), "jobs registered ({mode}): {ours:?}");
        let leaked = paths_holding(&before, &[&token, &bob_mark]);
        assert!(leaked.is_empty(), "the store got a secret ({mode}): {leaked:?}");
    }

    // Control: the same `pathinput` flake, evaluated as gitfront did before
    // (pure evaluation, the flake's own inputs), does copy the token into
    // the store, and the scan above finds it.
    let (_, commit) = commits.iter().find(|(n, _)| n == "pathinput").unwrap();
    let checkout = dir.join("control");
    std::fs::create_dir_all(&checkout).unwrap();
    let archive = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("git --git-dir {}/.git archive {commit} | tar -x -C {}", work.dir.display(), checkout.display()))
        .output()
        .unwrap();
    assert!(archive.status.success(), "{}", stderr(&archive));
    let before = store_paths();
    let eval = std::process::Command::new("nix")
        .args(["--extra-experimental-features", "nix-command flakes", "eval", "--raw"])
        .arg(format!("path:{}#nixosConfigurations.pathinput.config.microvm.declaredRunner.LEAK", checkout.display()))
        .output()
        .unwrap();
    assert_eq!(text(&eval.stdout), token, "the control evaluation reads the token: {}", stderr(&eval));
    let leaked = paths_holding(&before, &[&token]);
    assert!(!leaked.is_empty(), "the scan does not see what the control copied");
    for p in &leaked {
        let del =
            std::process::Command::new("nix-store").arg("--delete").arg(format!("/nix/store/{p}")).output().unwrap();
        assert!(del.status.success(), "nix-store --delete {p}: {}", stderr(&del));
    }

    // A branch of the same repo with an ordinary input-less flake still deploys.
    let good = work.commit_tree(&[("flake.nix", microvm_e2e::gitfront::flake_nix(&[host("fine", 28)]))], &[], "fine");
    let out = work.push(&[&format!("{good}:refs/heads/fine")]);
    assert!(out.status.success(), "{}", stderr(&out));
    nomad::wait_running(&w.agent, "alice-evil", "fine", 0, BOOT);
}

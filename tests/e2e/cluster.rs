//! Issue 8, the cluster: one Nomad server and three clients on one machine
//! (tests/support/cluster.rs: a network namespace and address per node on
//! 198.51.100.0/24, a Nix store per client, one shared `file://` binary
//! cache). gitfront runs next to the server and pushes there; the clients'
//! drivers fetch what they are asked to run from it.
//!
//! One test, in phases, on one cluster (booting three clients and three
//! guests under TCG is most of the time; doing it once keeps the file
//! within a few minutes):
//!
//! 1. a push of three hosts gives three VMs on three different clients,
//!    each of which fetched its runner from the cache (its store was empty);
//! 2. draining a node moves its VM: graceful shutdown of the old one, then
//!    the new one boots on another client;
//! 3. killing a client (its agent and its whole namespace) gets its VMs
//!    replaced on the other clients once the server has declared it down
//!    and the job's `stop_on_client_after` + kill timeout have passed;
//! 4. cutting a client off the network (agent and VM alive) makes that
//!    client stop its VM after `stop_on_client_after` without a heartbeat,
//!    before the server places the replacement on a node that joined
//!    meanwhile; when the link comes back the old VM stays stopped.
//!
//! Throughout, a watcher samples every 200 ms which node runs each VM (the
//! `microvm@<host>` VMM processes, machine-wide) and the test fails if any
//! VM ever runs twice.
//!
//! The second test is the case Nomad's policy alone does not cover: the
//! Nomad agent dies but the node and its VMs live on; the driver's
//! `stop_without_agent_after` covers it.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use microvm_e2e::cluster::{Capacity, Cluster, NOMAD_ADDR};
use microvm_e2e::gitfront::{Front, Host, config_toml, text};
use microvm_e2e::runner::virtiofsd_bin;
use microvm_e2e::{open_tempdir, require_root, wait_until};
use serde_json::Value;

/// Hosts of the pushed flake (branch = host = job) and their guest addresses.
const HOSTS: [(&str, u8); 3] = [("cl-red", 21), ("cl-green", 22), ("cl-blue", 23)];
const NS: &str = "alice-fleet";
const BOOT: Duration = Duration::from_secs(180);
/// The job policy gitfront writes, shortened for the test (defaults: 30 s
/// and 1 m): time the guest gets to shut down, and how long a client cut
/// off from the servers keeps its VMs.
const KILL_TIMEOUT: Duration = Duration::from_secs(20);
const STOP_ON_CLIENT_AFTER: Duration = Duration::from_secs(10);
/// Each client offers room for exactly two VMs (2 × 200 MHz, 2 × (256 +
/// 64) MiB): see tests/support/cluster.rs on why spread needs that.
const CAPACITY: Capacity = Capacity { cpu: 400, memory: 640 };

fn assert_contains(haystack: &str, needles: &[&str]) {
    for n in needles {
        assert!(haystack.contains(n), "missing {n:?} in:\n{haystack}");
    }
}

fn s(v: &Value) -> String {
    v.as_str().unwrap_or_default().to_string()
}

fn runner_of(job: &Value) -> String {
    s(&job["TaskGroups"][0]["Tasks"][0]["Config"]["runner"])
}

/// Task events of the allocation's task `vm` as (unix ns, type, message).
fn events(alloc: &Value) -> Vec<(i64, String, String)> {
    alloc["TaskStates"]["vm"]["Events"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| (e["Time"].as_i64().unwrap_or(0), s(&e["Type"]), s(&e["DisplayMessage"])))
        .collect()
}

fn events_text(alloc: &Value) -> String {
    events(alloc).iter().map(|(_, t, m)| format!("{t}: {m}")).collect::<Vec<_>>().join("\n")
}

/// Time of the first event of type `ty` (unix ns).
fn event_time(alloc: &Value, ty: &str) -> i64 {
    events(alloc)
        .iter()
        .find(|(_, t, _)| t == ty)
        .map(|(time, _, _)| *time)
        .unwrap_or_else(|| panic!("no {ty:?} event in:\n{}", events_text(alloc)))
}

fn unix_ns() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as i64
}

/// The VMM and virtiofsd processes of `host`, machine-wide (virtiofsd
/// sandboxes itself into namespaces of its own: it is not in the node's).
fn leftovers(host: &str) -> Vec<i32> {
    let mut v = microvm_e2e::vm::pgrep(&format!("^microvm@{host} "));
    v.extend(microvm_e2e::vm::pgrep(&format!("virtiofsd .*--socket-path={host}-virtiofs-")));
    v
}

/// RFC 3339 (as Nomad writes times in JSON) to unix ns.
fn rfc3339_ns(t: &str) -> i64 {
    let out = std::process::Command::new("date").args(["-u", "+%s%N", "-d", t]).output().unwrap();
    assert!(out.status.success(), "date -d {t}: {}", text(&out.stderr));
    text(&out.stdout).trim().parse().expect("date +%s%N")
}

/// When the server last declared node `name` down ("Node heartbeat
/// missed"; its allocations are marked lost in the same step), unix ns.
fn heartbeat_missed_at(cluster: &Cluster, name: &str) -> i64 {
    let node = cluster.api(&format!("/v1/node/{}", cluster.node_id(name)));
    let events = node["Events"].as_array().cloned().unwrap_or_default();
    let e = events
        .iter()
        .rev()
        .find(|e| e["Message"] == "Node heartbeat missed")
        .unwrap_or_else(|| panic!("{name}: no missed heartbeat in {}", node["Events"]));
    rfc3339_ns(&s(&e["Timestamp"]))
}

fn secs(ns: i64) -> f64 {
    ns as f64 / 1e9
}

/// The node gitfront reported for `host` ("remote: [host] running on node X (…").
fn reported_node(log: &str, host: &str) -> String {
    let prefix = format!("remote: [{host}] running on node ");
    let line = log.lines().find_map(|l| l.find(&prefix).map(|i| &l[i + prefix.len()..]));
    let line = line.unwrap_or_else(|| panic!("no {prefix:?} in:\n{log}"));
    line.split_whitespace().next().unwrap_or_default().to_string()
}

/// The driver fetched `runner` from the cache for this allocation.
fn assert_fetched(alloc: &Value, runner: &str, cache: &str) {
    let ev = events_text(alloc);
    assert_contains(
        &ev,
        &[&format!("runner not on this node: fetching {runner}"), &format!("fetched the runner from {cache}")],
    );
}

#[test]
fn cluster_push_spreads_vms_drain_and_node_loss_move_them_never_twice() {
    if !require_root("cluster_push_spreads_vms_drain_and_node_loss_move_them_never_twice") {
        return;
    }
    let t0 = Instant::now();
    let mut timings: Vec<String> = Vec::new();
    let mut lap = |what: &str, since: Instant| {
        let line = format!("{what}: {:.1} s", since.elapsed().as_secs_f64());
        eprintln!("TIMING {line}");
        timings.push(line);
    };
    let front_dir = open_tempdir();
    let cache_dir = front_dir.path().join("cache");
    let cache = format!("file://{}", cache_dir.display());
    let cluster_dir;
    {
        let mut cluster = Cluster::start("clu", &["c1", "c2", "c3"], CAPACITY, Some(&cache_dir));
        cluster_dir = cluster.dir.path().to_path_buf();
        lap("cluster up (server + 3 clients ready)", t0);
        // The operator's choice for a VM cluster: spread, not Nomad's default binpack.
        cluster.nomad_ok(&["operator", "scheduler", "set-config", "-scheduler-algorithm=spread"]);
        let sched = cluster.nomad_ok(&["operator", "scheduler", "get-config"]);
        assert!(sched.lines().any(|l| l.starts_with("Scheduler Algorithm") && l.contains("spread")), "{sched}");

        let front = front_for(&cluster, front_dir.path());
        let hosts: Vec<&str> = HOSTS.iter().map(|(h, _)| *h).collect();
        let watch = cluster.watch(&hosts);

        // Each client has its own, empty, store; the plugin's virtiofsd is
        // reachable in its mount namespace (it lives outside /nix).
        let virtiofsd = virtiofsd_bin();
        for c in &cluster.clients {
            assert_eq!(c.store_entries(), Vec::<String>::new(), "{}'s store is empty before the push", c.name);
            let out = c.in_mounts("test").arg("-x").arg(&virtiofsd).status().unwrap();
            assert!(out.success(), "{} cannot see {}", c.name, virtiofsd.display());
        }

        // ---- 1. One push, three hosts, three VMs on three clients.
        let t1 = Instant::now();
        let work = front.workdir("alice", "fleet", "fleet");
        let flake: Vec<Host> = HOSTS.iter().map(|(h, ip)| Host::new(h, *ip)).collect();
        work.commit_flake(&flake, "three hosts");
        let refspecs: Vec<String> = hosts.iter().map(|h| format!("main:{h}")).collect();
        let refspecs: Vec<&str> = refspecs.iter().map(String::as_str).collect();
        let out = work.push(&refspecs);
        let log = text(&out.stderr);
        assert!(out.status.success(), "push failed:\n{log}");
        lap("push of three hosts (build, copy, register, running)", t1);
        let mut placed = std::collections::BTreeMap::new();
        for h in &hosts {
            assert_contains(&log, &[&format!("remote: [{h}] copied to the binary cache {cache}")]);
            placed.insert(h.to_string(), reported_node(&log, h));
        }
        let distinct: BTreeSet<&String> = placed.values().collect();
        assert_eq!(distinct.len(), 3, "three VMs on three clients: {placed:?}");
        let mut allocs = std::collections::BTreeMap::new();
        let mut runners = std::collections::BTreeMap::new();
        for h in &hosts {
            let list = cluster.allocs(NS, h);
            assert_eq!(list.len(), 1, "{h}: one allocation");
            let a = cluster.alloc(NS, &s(&list[0]["ID"]));
            assert_eq!(s(&a["NodeName"]), placed[*h]);
            let runner = runner_of(&cluster.api(&format!("/v1/job/{h}?namespace={NS}")));
            assert_fetched(&a, &runner, &cache);
            cluster.wait_console(NS, &s(&a["ID"]), "microvm-test-guest: ready", BOOT);
            allocs.insert(h.to_string(), s(&a["ID"]));
            runners.insert(h.to_string(), runner);
        }
        lap("three guests ready", t1);
        // Each client's store now holds its VM's runner (and not the others').
        for h in &hosts {
            for c in &cluster.clients {
                let here = c.name == placed[*h];
                assert_eq!(c.store_has(&runners[*h]), here, "{h}'s runner in {}'s store", c.name);
            }
            assert_eq!(watch.nodes_of(h), vec![placed[*h].clone()], "{h} runs where Nomad placed it");
        }

        // ---- 2. Drain the node of the first host: graceful shutdown there,
        //         then the VM boots on another client.
        let t2 = Instant::now();
        let moved = hosts[0];
        let drained = placed[moved].clone();
        let drained_id = cluster.node_id(&drained);
        let old = allocs[moved].clone();
        cluster.nomad_ok(&["node", "drain", "-enable", "-yes", "-detach", "-deadline", "2m", &drained_id]);
        let new = cluster.wait_running_except(NS, moved, &[&old], BOOT);
        let new_id = s(&new["ID"]);
        let target = s(&new["NodeName"]);
        assert_ne!(target, drained, "moved off the drained node");
        cluster.wait_console(NS, &new_id, "microvm-test-guest: ready", BOOT);
        lap("drain: VM moved and ready on the new node", t2);
        let old_a = cluster.alloc(NS, &old);
        let new_a = cluster.alloc(NS, &new_id);
        assert_eq!(old_a["ClientStatus"], "complete", "{}", events_text(&old_a));
        assert_eq!(new_a["PreviousAllocation"], old.as_str());
        let console = cluster.console(NS, &old);
        assert_contains(&console, &["microvm-test-guest: graceful shutdown"]);
        let old_ev = events_text(&old_a);
        assert_contains(&old_ev, &["graceful shutdown: running microvm-shutdown", "VM exited with code 0"]);
        assert!(!old_ev.contains("SIGKILL") && !old_ev.contains("signal 9"), "a graceful stop:\n{old_ev}");
        assert_fetched(&new_a, &runners[moved], &cache);
        // Ordering, from Nomad's own event times.
        let killing = event_time(&old_a, "Killing");
        let killed = event_time(&old_a, "Killed");
        let received = event_time(&new_a, "Received");
        let started = event_time(&new_a, "Started");
        let driver_first = events(&new_a).iter().find(|(_, t, _)| t == "Driver").map(|(t, _, _)| *t).unwrap_or(started);
        eprintln!(
            "DRAIN ORDER (s after the old VM was told to stop): new alloc received by {target} {:+.1}, \
             old VM gone (Killed) {:+.1}, new task's first driver event {:+.1}, new VM started {:+.1}",
            secs(received - killing),
            secs(killed - killing),
            secs(driver_first - killing),
            secs(started - killing)
        );
        for (label, a) in [("old", &old_a), ("new", &new_a)] {
            for (t, ty, msg) in events(a) {
                eprintln!("DRAIN {label} {:+6.1} s {ty}: {msg}", secs(t - killing));
            }
        }
        assert!(event_time(&new_a, "Task Setup") >= killed, "the new task was set up before the old VM was gone");
        assert!(driver_first >= killed, "the new VM started being set up before the old one was gone");
        let target_log = cluster.client(&target).log();
        assert!(
            target_log
                .lines()
                .any(|l| l.contains("waiting for remote previous alloc to terminate") && l.contains(&new_id)),
            "{target} waited for the old allocation"
        );
        assert!(cluster.client(&target).store_has(&runners[moved]));
        assert_eq!(watch.max(moved), 1, "never two copies of {moved}:\n{}", watch.log());
        // The drain completes by itself; the node comes back into service.
        wait_until("the drain to complete", Duration::from_secs(90), Duration::from_millis(500), || {
            let n = cluster.api(&format!("/v1/node/{drained_id}"));
            if n["DrainStrategy"].is_null() { Ok(()) } else { Err(n["DrainStrategy"].to_string()) }
        });
        cluster.nomad_ok(&["node", "eligibility", "-enable", &drained_id]);
        lap("drain complete", t2);
        placed.insert(moved.to_string(), target.clone());
        allocs.insert(moved.to_string(), new_id);

        // ---- 3. Kill the client that now runs two VMs: agent and namespace.
        let t3 = Instant::now();
        let victim = target;
        let lost: Vec<&str> = hosts.iter().copied().filter(|h| placed[*h] == victim).collect();
        assert_eq!(lost.len(), 2, "{victim} runs two VMs: {placed:?}");
        let survivors: Vec<String> = cluster.clients.iter().map(|c| c.name.clone()).filter(|n| *n != victim).collect();
        let victim_netns = cluster.client(&victim).netns().name.clone();
        cluster.client_mut(&victim).kill();
        assert!(!std::path::Path::new("/run/netns").join(&victim_netns).exists(), "{victim_netns} deleted");
        for h in &lost {
            wait_until(
                &format!("{h} to be gone with {victim}"),
                Duration::from_secs(5),
                Duration::from_millis(100),
                || {
                    if watch.nodes_of(h).is_empty() { Ok(()) } else { Err(format!("{:?}", watch.nodes_of(h))) }
                },
            );
        }
        // Nothing of them is left on the machine (virtiofsd included).
        for h in &lost {
            wait_until(
                &format!("{h}'s processes to be gone"),
                Duration::from_secs(10),
                Duration::from_millis(100),
                || {
                    let left = leftovers(h);
                    if left.is_empty() { Ok(()) } else { Err(format!("{left:?}")) }
                },
            );
        }
        cluster.wait_node_status(&victim, &["down"], Duration::from_secs(60));
        let down_after = t3.elapsed();
        lap("kill: server declared the node down", t3);
        let t_down = Instant::now();
        let down_at = unix_ns();
        let mut replaced = Vec::new();
        for h in &lost {
            let old = allocs[*h].clone();
            let new = cluster.wait_running_except(NS, h, &[&old], Duration::from_secs(60) + BOOT);
            let new_id = s(&new["ID"]);
            let node = s(&new["NodeName"]);
            assert!(survivors.contains(&node), "{h} replaced on a live client, not {node}");
            let old_a = cluster.alloc(NS, &old);
            assert_eq!(old_a["ClientStatus"], "lost");
            let new_a = cluster.alloc(NS, &new_id);
            // A replacement for a lost allocation is not chained to it
            // (no PreviousAllocation: there is nothing to wait for); it
            // takes its place under the same name.
            assert_eq!(new_a["Name"], old_a["Name"]);
            // The server held it back until stop_on_client_after + the kill
            // timeout after it had marked the old one lost (node down).
            let lost = heartbeat_missed_at(&cluster, &victim);
            let held = secs(new_a["CreateTime"].as_i64().unwrap() - lost);
            eprintln!(
                "KILL {h}: node declared down {:+.1} s from when the test saw it; replacement {new_id} on {node} \
                 placed {held:.1} s after that",
                secs(lost - down_at)
            );
            let hold = (STOP_ON_CLIENT_AFTER + KILL_TIMEOUT).as_secs_f64();
            assert!(held >= hold - 1.0, "{h}: replaced {held:.1} s after it was lost, before the {hold} s hold");
            // A client that ran this VM before still has the runner.
            if events_text(&new_a).contains("runner not on this node") {
                assert_fetched(&new_a, &runners[*h], &cache);
            }
            assert!(cluster.client(&node).store_has(&runners[*h]));
            cluster.wait_console(NS, &new_id, "microvm-test-guest: ready", BOOT);
            replaced.push(format!("{h}: {victim} -> {node}"));
            placed.insert(h.to_string(), node);
            allocs.insert(h.to_string(), new_id);
        }
        lap("kill: both VMs running again elsewhere (since node down)", t_down);
        lap("kill: total", t3);
        eprintln!("KILL node down {:.1} s after the kill; replaced: {replaced:?}", down_after.as_secs_f64());
        for h in &hosts {
            assert_eq!(watch.max(h), 1, "never two copies of {h}:\n{}", watch.log());
        }

        // ---- 4. A partition: the node and its VM live on, cut off from
        //         the server. The client stops its VM after
        //         stop_on_client_after without a heartbeat; the server
        //         places the replacement only after that plus the kill
        //         timeout. A fresh node (empty store) joins first, so that
        //         there is room for it.
        let t4 = Instant::now();
        cluster.add_client("c4");
        assert_eq!(cluster.client("c4").store_entries(), Vec::<String>::new());
        let (cut_host, cut) = hosts
            .iter()
            .map(|h| (h.to_string(), placed[*h].clone()))
            .find(|(_, n)| placed.values().filter(|m| *m == n).count() == 1)
            .expect("a node with one VM");
        let old = allocs[&cut_host].clone();
        let cut_at = unix_ns();
        cluster.client(&cut).set_link(&cluster.switch, false);
        wait_until(&format!("{cut} to stop {cut_host}"), Duration::from_secs(60), Duration::from_millis(100), || {
            if watch.nodes_of(&cut_host).is_empty() { Ok(()) } else { Err(format!("{:?}", watch.nodes_of(&cut_host))) }
        });
        let stopped = secs(unix_ns() - cut_at);
        let status = cluster.wait_node_status(&cut, &["down", "disconnected"], Duration::from_secs(60));
        let down = secs(unix_ns() - cut_at);
        let new = cluster.wait_running_except(NS, &cut_host, &[&old], Duration::from_secs(90) + BOOT);
        let new_id = s(&new["ID"]);
        assert_eq!(s(&new["NodeName"]), "c4");
        let new_a = cluster.alloc(NS, &new_id);
        let placed_after = secs(new_a["CreateTime"].as_i64().unwrap() - cut_at);
        let started_after = secs(event_time(&new_a, "Started") - cut_at);
        let lost = secs(heartbeat_missed_at(&cluster, &cut) - cut_at);
        eprintln!(
            "PARTITION of {cut} ({cut_host}), s after the cut: its client stopped the VM {stopped:.1}, \
             server declared the node {status} {lost:.1} (test saw it {down:.1}), \
             replacement placed on c4 {placed_after:.1}, started {started_after:.1}"
        );
        let hold = (STOP_ON_CLIENT_AFTER + KILL_TIMEOUT).as_secs_f64();
        assert!(placed_after - lost >= hold - 1.0, "replacement not held back {hold} s");
        assert!(placed_after > stopped, "the replacement was placed while the cut-off VM still ran");
        assert_fetched(&new_a, &runners[&cut_host], &cache);
        cluster.wait_console(NS, &new_id, "microvm-test-guest: ready", BOOT);
        // The cut-off client stopped the VM itself, gracefully (its driver's
        // events are in its agent log: the server could not hear them).
        let cut_log: Vec<String> =
            cluster.client(&cut).log().lines().filter(|l| l.contains(&old)).map(str::to_string).collect();
        let cut_log = cut_log.join("\n");
        assert_contains(
            &cut_log,
            &[
                "stopping alloc for stop_after_client_disconnect",
                "graceful shutdown: running microvm-shutdown",
                "VM exited with code 0",
            ],
        );
        lap("partition: VM stopped on the cut-off node and running on c4", t4);
        // The partition heals: the node comes back and does not start the VM again.
        cluster.client(&cut).set_link(&cluster.switch, true);
        cluster.wait_node_status(&cut, &["ready"], Duration::from_secs(60));
        std::thread::sleep(Duration::from_secs(5));
        let old_a = cluster.alloc(NS, &old);
        eprintln!(
            "PARTITION healed: old allocation {old}: client status {}, desired {}",
            old_a["ClientStatus"], old_a["DesiredStatus"]
        );
        assert_eq!(watch.nodes_of(&cut_host), vec!["c4".to_string()]);
        placed.insert(cut_host.clone(), "c4".to_string());
        lap("partition: total", t4);

        for h in &hosts {
            assert_eq!(watch.max(h), 1, "never two copies of {h}:\n{}", watch.log());
            assert_eq!(watch.nodes_of(h), vec![placed[*h].clone()], "{h} runs where Nomad says");
        }
        eprintln!("WHERE THE VMS RAN ({} samples, 200 ms apart):\n{}", watch.samples(), watch.log());
        drop(watch);
        drop(front);
    }
    // Everything is gone: VMs, namespaces, mounts.
    wait_until("the VMs and their virtiofsd to be gone", Duration::from_secs(30), Duration::from_millis(200), || {
        let left: Vec<i32> = HOSTS.iter().flat_map(|(h, _)| leftovers(h)).collect();
        if left.is_empty() { Ok(()) } else { Err(format!("{left:?}")) }
    });
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(&cluster_dir.display().to_string()), "mounts left:\n{mounts}");
    let netns = std::process::Command::new("ip").args(["netns", "list"]).output().unwrap();
    let tag = format!("-{}-", std::process::id());
    assert!(
        !text(&netns.stdout).lines().any(|l| l.starts_with("mvt-clu") && l.contains(&tag)),
        "{}",
        text(&netns.stdout)
    );
    lap("whole test", t0);
    eprintln!("TIMINGS\n{}", timings.join("\n"));
}

/// What a node does when its Nomad agent dies (crash, OOM kill, or
/// `systemctl stop nomad` with the usual KillMode=process) but the machine
/// lives on: the driver's supervisors keep the VMs running, on purpose (an
/// agent restart must not reboot every VM). Nothing on the node then
/// enforces the job's `stop_on_client_after` (the Nomad client does that,
/// and it is gone), while the server declares the node down and places the
/// replacement after stop_on_client_after + the kill timeout. The driver's
/// `stop_without_agent_after` (10 s here, like the jobs' stop_on_client_after)
/// makes the supervisor shut the VM down once no agent renews its lease.
#[test]
fn a_dead_agent_on_a_live_node_does_not_leave_its_vm_running_beside_the_replacement() {
    if !require_root("a_dead_agent_on_a_live_node_does_not_leave_its_vm_running_beside_the_replacement") {
        return;
    }
    let front_dir = open_tempdir();
    let cache_dir = front_dir.path().join("cache");
    let mut cluster = Cluster::start("cla", &["a1", "a2"], CAPACITY, Some(&cache_dir));
    cluster.nomad_ok(&["operator", "scheduler", "set-config", "-scheduler-algorithm=spread"]);
    let front = front_for(&cluster, front_dir.path());
    let host = "cl-amber";
    let watch = cluster.watch(&[host]);
    let work = front.workdir("alice", "fleet", "fleet");
    work.commit_flake(&[Host::new(host, 31)], "one host");
    let out = work.push(&[&format!("main:{host}")]);
    assert!(out.status.success(), "push failed:\n{}", text(&out.stderr));
    let node = reported_node(&text(&out.stderr), host);
    let old = s(&cluster.allocs(NS, host)[0]["ID"]);
    cluster.wait_console(NS, &old, "microvm-test-guest: ready", BOOT);

    let t = Instant::now();
    cluster.client_mut(&node).crash_agent();
    eprintln!("AGENT CRASH: still running on {node}: {:?}", cluster.client(&node).processes());
    cluster.wait_node_status(&node, &["down"], Duration::from_secs(60));
    eprintln!("AGENT CRASH: {node} down after {:.1} s; VM on {:?}", t.elapsed().as_secs_f64(), watch.nodes_of(host));
    let new = cluster.wait_running_except(NS, host, &[&old], Duration::from_secs(90) + BOOT);
    eprintln!(
        "AGENT CRASH: replacement running on {} after {:.1} s; VM on {:?}",
        s(&new["NodeName"]),
        t.elapsed().as_secs_f64(),
        watch.nodes_of(host)
    );
    std::thread::sleep(Duration::from_secs(2));
    eprintln!("AGENT CRASH: where {host} ran:\n{}", watch.log());
    assert_eq!(watch.max(host), 1, "{host} ran twice:\n{}", watch.log());
    // The old VM shut down gracefully on its own: its supervisor's record
    // on the agentless node (nobody destroyed the task there) says so.
    let tasks = cluster.client(&node).state_dir.join("tasks");
    let events: String = std::fs::read_dir(&tasks)
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.path().join("events.jsonl")).ok())
        .collect();
    assert!(events.contains("no Nomad agent has been connected"), "{events}");
    assert!(events.contains("graceful shutdown: running microvm-shutdown"), "{events}");
    assert!(events.contains("VM exited with code 0"), "{events}");
}

/// gitfront in the server's namespace, writing jobs with this file's stop
/// timings.
fn front_for(cluster: &Cluster, dir: &std::path::Path) -> Front {
    let front = Front::start(cluster.server.netns().clone(), dir, NOMAD_ADDR);
    let job_policy = format!(
        "kill_timeout = \"{}s\"\nstop_on_client_after = \"{}s\"\n",
        KILL_TIMEOUT.as_secs(),
        STOP_ON_CLIENT_AFTER.as_secs()
    );
    std::fs::write(&front.config, config_toml(dir, NOMAD_ADDR, &job_policy)).unwrap();
    front
}

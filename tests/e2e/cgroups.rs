//! A VM runs in its task's own cgroup (v2) when Nomad names one, and the
//! cgroup goes with the task.
//!
//! The development machines are cgroup v1 hybrid, so a Nomad agent here
//! hands tasks its v1 cpuset partition and the driver leaves cgroups alone
//! (every other end-to-end test runs that way). This test plays the agent on
//! a v2 host: it names a `.scope` below a directory of the machine's real
//! cgroup2 hierarchy, as Nomad's `nomad.slice/share.slice` would be. The kernel here
//! enables no memory controller in v2, so `memory.max` and OOM accounting
//! are checked by the driver's unit tests only.

use std::path::{Path, PathBuf};
use std::time::Duration;

use microvm_e2e::plugin::{DirectWorld, vm_task};
use microvm_e2e::vm::leftovers;
use microvm_e2e::{require_root, wait_until};
use microvm_proto::drivers::{DestroyTaskRequest, LinuxResources, Resources, StartTaskRequest, StopTaskRequest};

/// Whether the machine has a cgroup2 hierarchy.
fn has_cgroup2() -> bool {
    std::fs::read_to_string("/proc/filesystems").is_ok_and(|t| t.lines().any(|l| l.ends_with("\tcgroup2")))
}

/// The cgroup of `pid` in the v2 hierarchy, as a path below its root.
fn cgroup_of(pid: i64) -> String {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
    text.lines().find_map(|l| l.strip_prefix("0::")).unwrap_or_default().to_string()
}

/// The machine's cgroup2 hierarchy mounted once more, below the test's dir
/// (the plugin runs under `ip netns exec`, which mounts its own /sys and so
/// hides /sys/fs/cgroup), and a directory in it standing in for Nomad's
/// share.slice. Both go on drop, with anything left in the slice.
struct Slice {
    mount: PathBuf,
    path: PathBuf,
}

impl Slice {
    fn new(dir: &Path) -> Slice {
        let mount = dir.join("cgroup2");
        std::fs::create_dir(&mount).unwrap();
        let ok = std::process::Command::new("mount").args(["-t", "cgroup2", "none"]).arg(&mount).status().unwrap();
        assert!(ok.success(), "mount cgroup2");
        let path = mount.join(format!("mvt-share-{}.slice", std::process::id()));
        std::fs::create_dir(&path).expect("a test slice in the cgroup2 hierarchy");
        Slice { mount, path }
    }
}

impl Drop for Slice {
    fn drop(&mut self) {
        if let Ok(entries) = std::fs::read_dir(&self.path) {
            for e in entries.flatten().filter(|e| e.path().is_dir()) {
                let _ = std::fs::write(e.path().join("cgroup.kill"), "1");
                std::thread::sleep(Duration::from_millis(200));
                let _ = std::fs::remove_dir(e.path());
            }
        }
        let _ = std::fs::remove_dir(&self.path);
        let _ = std::process::Command::new("umount").arg(&self.mount).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_vm_runs_in_its_tasks_cgroup_which_goes_with_the_task() {
    if !require_root("the_vm_runs_in_its_tasks_cgroup_which_goes_with_the_task") {
        return;
    }
    if !has_cgroup2() {
        assert!(std::env::var_os("CI").is_none(), "the CI machines have a cgroup2 hierarchy");
        eprintln!("SKIPPED: no cgroup2 hierarchy on this machine");
        return;
    }
    let dir = microvm_e2e::open_tempdir();
    // Before the plugin starts: its mount namespace is copied from ours.
    let slice = Slice::new(dir.path());
    let alloc = "eeeeeeee-0000-0000-0000-000000000000";
    let scope = slice.path.join(format!("{alloc}.vm.scope"));

    let w = DirectWorld::new("cgroups", "cg").await;
    let mut driver = w.driver.clone();
    let mut task = vm_task(alloc, "cgroups", 1, &w.runner);
    task.resources = Some(Resources {
        linux_resources: Some(LinuxResources {
            cpuset_cgroup: scope.display().to_string(),
            memory_limit_bytes: 300 << 20,
            ..Default::default()
        }),
        ..Default::default()
    });
    let id = task.id.clone();
    driver.start_task(StartTaskRequest { task: Some(task) }).await.expect("StartTask");

    // The VMM and both virtiofsd processes are in the scope; the supervisor
    // is not (it removes the scope at the end, which it could not do from inside).
    let relative = format!("/{}", scope.strip_prefix(&slice.mount).unwrap().display());
    let pids = microvm_e2e::vm::only_task_pids(&w.state_dir);
    let vmm = pids["vmm"]["pid"].as_i64().expect("VMM pid");
    let virtiofsd = pids["virtiofsd"][0][1]["pid"].as_i64().expect("virtiofsd pid");
    assert_eq!(cgroup_of(vmm), relative, "the VMM");
    assert_eq!(cgroup_of(virtiofsd), relative, "virtiofsd");
    let procs = std::fs::read_to_string(scope.join("cgroup.procs")).unwrap();
    let in_scope: Vec<i64> = procs.lines().filter_map(|l| l.parse().ok()).collect();
    assert!(in_scope.len() >= 3, "VMM, virtiofsd and its sandbox child: {in_scope:?}");
    let supervisor = pids["supervisor"]["pid"].as_i64().expect("supervisor pid");
    assert_ne!(cgroup_of(supervisor), relative, "the supervisor stays outside");
    if scope.join("memory.max").exists() {
        assert_eq!(std::fs::read_to_string(scope.join("memory.max")).unwrap().trim(), (300u64 << 20).to_string());
    }

    driver
        .stop_task(StopTaskRequest { task_id: id.clone(), timeout: None, signal: String::new() })
        .await
        .expect("StopTask");
    driver.destroy_task(DestroyTaskRequest { task_id: id, force: true }).await.expect("DestroyTask");
    wait_until("the scope to be removed", Duration::from_secs(10), Duration::from_millis(200), || {
        if scope.exists() { Err(format!("{} still there", scope.display())) } else { Ok(()) }
    });
    let left = leftovers(&w.netns, &w.state_dir, "cg");
    assert!(left.is_empty(), "left behind: {left:?}");
    assert!(slice.path.exists(), "the slice is Nomad's: untouched");
    drop(w);
}

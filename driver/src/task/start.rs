//! StartTask, step by step (microvm-skyflake.md §9): config → runner on this
//! node → checks → dirs and links → taps → supervisor (virtiofsd + VMM).
//! Whatever a failed start created is removed before the error returns:
//! Nomad does not call DestroyTask for a task whose start failed.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use microvm_proto::drivers::TaskConfig as ProtoTaskConfig;

use super::claims::{self, claim};
use super::nixstore;
use super::paths::{self, TaskPaths};
use super::state::DriverState;
use super::virtiofs::{self, ShareFlags};
use super::{TaskError, Tasks};
use crate::config::{self, PluginConfig, TaskConfig, under_any};
use crate::net::{MacvtapSpec, TapSpec};
use crate::plugin::handshake::PLUGIN_ENV_VARS;
use crate::runner::Runner;
use crate::supervisor::protocol::{self, LaunchSpec, Ready, VirtiofsdLaunch};

/// The PATH a runner's scripts get when the task's environment has none
/// (systemd's default plus NixOS's system profile).
const DEFAULT_PATH: &str =
    "/run/wrappers/bin:/run/current-system/sw/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// How long the supervisor may take to report: virtiofsd sockets plus exec.
const SUPERVISOR_REPORT: Duration = Duration::from_secs(60);

/// Undo log of a start in progress.
#[derive(Default)]
struct Undo {
    interfaces: Vec<String>,
    claims: Vec<String>,
    paths: Vec<PathBuf>,
    dirs: Vec<PathBuf>,
    cgroup: Option<PathBuf>,
}

pub(super) async fn start(tasks: &Arc<Tasks>, task: &ProtoTaskConfig) -> Result<DriverState, TaskError> {
    let config = tasks.config();
    let cfg = config::decode_task_config(&task.msgpack_driver_config).map_err(TaskError::Config)?;
    let mut undo = Undo::default();
    let paths = TaskPaths::new(&config.state_dir, task);
    match prepare(tasks, task, &config, &cfg, &paths, &mut undo).await {
        Ok(state) => Ok(state),
        Err(e) => {
            rollback(tasks, &config, &paths, undo);
            Err(e)
        }
    }
}

async fn prepare(
    tasks: &Arc<Tasks>,
    task: &ProtoTaskConfig,
    config: &PluginConfig,
    cfg: &TaskConfig,
    paths: &TaskPaths,
    undo: &mut Undo,
) -> Result<DriverState, TaskError> {
    let started = Instant::now();
    // 1. The runner, fetched if this node does not have it, and confined.
    check_runner_root(&cfg.runner, config)?;
    if std::fs::symlink_metadata(&cfg.runner).is_err() {
        if !config.substituters.is_empty() {
            tasks.emit(task, format!("runner not on this node: fetching {}", cfg.runner.display()));
        }
        let from = nixstore::fetch(&config.nix, &config.substituters, &config.trusted_public_keys, &cfg.runner).await?;
        tasks.emit(task, format!("fetched the runner from {from}"));
    }
    let resolved = std::fs::canonicalize(&cfg.runner).unwrap_or_else(|_| cfg.runner.clone());
    check_runner_root(&resolved, config)?;
    let runner = Runner::read(&resolved).map_err(|source| TaskError::Runner { path: cfg.runner.clone(), source })?;

    let runner_ms = started.elapsed().as_millis() as u64;
    // 2. Checks that need no side effects.
    let (uid, gid) = vmm_identity(config)?;
    let bridge = bridge_for(cfg, config, tasks)?;
    check_sockets(&runner, paths)?;
    let shares = plan_shares(&runner, paths, config)?;
    for flags in shares.iter().map(|(_, f)| f) {
        if !flags.ignored.is_empty() {
            tasks.emit(task, format!("ignoring virtiofsd flags from the runner: {}", flags.ignored.join(" ")));
        }
    }
    if !shares.is_empty() && crate::fingerprint::which(&config.virtiofsd).is_none() {
        return Err(TaskError::Boot(format!(
            "the runner has virtiofs shares but virtiofsd ({}) is not installed: set the plugin's `virtiofsd`",
            config.virtiofsd.display()
        )));
    }

    // 3. Claims on host-wide names, then dirs and links. An earlier start
    // of this task Nomad never heard of (see orphan.rs) is taken over, or
    // removed: a retry with the same task id finds it in the task dir, one
    // with a new id as the owner of the VM directory's claim.
    let workdir_claim = claims::workdir_claim(&paths.slug);
    let claim_owner = std::fs::read_link(claims::claims_dir(&config.state_dir).join(&workdir_claim)).ok();
    let stdout = path_or_null(&task.stdout_path);
    for earlier in std::iter::once(paths.task_dir.clone()).chain(claim_owner) {
        if !earlier.join(protocol::SPEC_FILE).exists() {
            continue;
        }
        if let Some(state) = super::orphan::adopt(tasks, task, &earlier, cfg, &runner.path, &stdout) {
            return Ok(state);
        }
        super::orphan::reclaim(tasks, task, &earlier).await;
    }
    std::fs::create_dir_all(&paths.task_dir).map_err(TaskError::io(format!("create {}", paths.task_dir.display())))?;
    undo.dirs.push(paths.task_dir.clone());
    claims::mark_starting(&paths.task_dir).map_err(TaskError::io("mark the task as starting"))?;
    let what = format!("VM directory {}", paths.work_dir.display());
    claim(&config.state_dir, &workdir_claim, &what, &paths.task_dir)?;
    undo.claims.push(workdir_claim);
    for name in runner.taps.iter().chain(runner.macvtaps.iter().map(|m| &m.id)) {
        let c = claims::tap_claim(name);
        claim(&config.state_dir, &c, &format!("interface {name}"), &paths.task_dir)?;
        undo.claims.push(c);
    }
    let vsock_cid = runner.vsock_cid.filter(|_| runner.hypervisor.kernel_vsock());
    if let Some(cid) = vsock_cid {
        let c = claims::vsock_claim(cid);
        claim(&config.state_dir, &c, &format!("vsock CID {cid}"), &paths.task_dir)?;
        undo.claims.push(c);
    }
    make_work_dir(&paths.work_dir, uid, gid)?;
    nixstore::relink(&paths.work_dir.join("current"), &runner.path).map_err(TaskError::io("link current"))?;
    let booted = paths.work_dir.join("booted");
    nixstore::relink(&booted, &runner.path).map_err(TaskError::io("link booted"))?;
    undo.paths.push(booted.clone());
    let gcroot = match &config.gcroots_dir {
        Some(dir) => nixstore::add_root(dir, &paths.slug, &booted)?,
        None => None,
    };
    undo.paths.extend(gcroot.clone());

    // 4. Interfaces: stale ones (no live owner, we hold the claim) go first.
    let taps_started = Instant::now();
    for name in &runner.taps {
        recreate(tasks, name, undo, |net| {
            net.create_tap(&TapSpec {
                name: name.clone(),
                multi_queue: runner.tap_flags.multi_queue,
                vnet_hdr: runner.tap_flags.vnet_hdr,
                owner_uid: uid,
                owner_gid: Some(gid),
            })
        })?;
        if let Some(bridge) = &bridge {
            tasks.net.attach_to_bridge(name, bridge).map_err(|source| TaskError::Net { name: name.clone(), source })?;
        }
    }
    for m in &runner.macvtaps {
        recreate(tasks, &m.id, undo, |net| {
            net.create_macvtap(&MacvtapSpec {
                name: m.id.clone(),
                mac: m.mac.clone(),
                link: m.link.clone(),
                mode: m.mode.clone(),
                owner_uid: uid,
                owner_gid: gid,
            })
        })?;
    }

    let taps_ms = taps_started.elapsed().as_millis() as u64;
    let cgroup = task_cgroup(tasks, task);
    undo.cgroup.clone_from(&cgroup);
    // 5. The supervisor boots the VM.
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let nofile = crate::supervisor::identity::virtiofsd_nofile();
    let launches: Vec<VirtiofsdLaunch> = shares
        .iter()
        .map(|(share, flags)| VirtiofsdLaunch {
            tag: share.tag.clone(),
            argv: virtiofs::argv(
                &config.virtiofsd,
                &share.socket,
                &share.source,
                &config.vmm_group,
                flags,
                threads,
                nofile,
            ),
            socket: share.socket.clone(),
            source: share.source.clone(),
        })
        .collect();
    let spec = LaunchSpec {
        task_id: task.id.clone(),
        task_dir: paths.task_dir.clone(),
        work_dir: paths.work_dir.clone(),
        runner: runner.path.clone(),
        hostname: runner.hostname.clone(),
        vmm_uid: uid,
        vmm_gid: gid,
        vmm_groups: vec![gid],
        stdout_path: stdout,
        stderr_path: path_or_null(&task.stderr_path),
        virtiofsd: launches,
        env: vmm_env(task, &paths.work_dir),
        default_stop_timeout: config.default_stop_timeout,
        shutdown_script: runner.microvm_shutdown(),
        hold: super::hold::HostHold {
            state_dir: config.state_dir.clone(),
            task_dir: paths.task_dir.clone(),
            work_dir: paths.work_dir.clone(),
            slug: paths.slug.clone(),
            interfaces: runner.taps.iter().cloned().chain(runner.macvtaps.iter().map(|m| m.id.clone())).collect(),
            gcroot: gcroot.clone(),
            cgroup: cgroup.clone(),
            vsock_cid,
        },
        plugin: crate::proc::ProcessId::of(std::process::id() as i32),
        stop_without_agent_after: config.stop_without_agent_after,
    };
    protocol::write_atomic(&paths.task_dir, protocol::SPEC_FILE, &spec)
        .map_err(TaskError::io("write the launch spec"))?;
    let spawn_started = Instant::now();
    let (pids, virtiofsd_ms, exec_ms) = spawn_supervisor(&tasks.self_exe, &paths.task_dir).await?;
    // One line per start with where the time went (read by bench/).
    tracing::info!(
        task_id = %task.id,
        runner_ms = runner_ms,
        taps_ms = taps_ms,
        supervisor_ms = spawn_started.elapsed().as_millis() as u64,
        virtiofsd_ms,
        exec_ms,
        total_ms = started.elapsed().as_millis() as u64,
        "task started"
    );

    Ok(DriverState {
        task_dir: paths.task_dir.clone(),
        work_dir: paths.work_dir.clone(),
        slug: paths.slug.clone(),
        config: cfg.clone(),
        runner: runner.path.clone(),
        hostname: runner.hostname.clone(),
        taps: runner.taps.clone(),
        macvtaps: runner.macvtaps.iter().map(|m| m.id.clone()).collect(),
        gcroot,
        cgroup,
        vsock_cid,
        supervisor: pids.supervisor,
        vmm: pids.vmm,
        started_at_ms: protocol::now_ms(),
    })
}

fn rollback(tasks: &Tasks, config: &PluginConfig, paths: &TaskPaths, undo: Undo) {
    for name in undo.interfaces.iter().rev() {
        let _ = tasks.net.delete_link(name);
    }
    for p in &undo.paths {
        let _ = std::fs::remove_file(p);
    }
    for c in &undo.claims {
        claims::release(&config.state_dir, c, &paths.task_dir);
    }
    for d in &undo.dirs {
        let _ = std::fs::remove_dir_all(d);
    }
    if let Some(cg) = &undo.cgroup {
        crate::cgroup::remove(cg, std::time::Duration::ZERO);
    }
}

/// The task's own cgroup with Nomad's memory limit for it, where the host
/// has one for it (cgroup v2, see `crate::cgroup`). A cgroup that cannot be
/// made is reported and the VM runs without it, as it would on a v1 host.
fn task_cgroup(tasks: &Tasks, task: &ProtoTaskConfig) -> Option<PathBuf> {
    let linux = task.resources.as_ref()?.linux_resources.as_ref()?;
    let path = crate::cgroup::task_cgroup(&linux.cpuset_cgroup)?;
    let limit = u64::try_from(linux.memory_limit_bytes).ok();
    match crate::cgroup::create(&path, limit) {
        Ok(()) => Some(path),
        Err(e) => {
            tasks.emit(
                task,
                format!("{}: the VM runs without Nomad's resource limits", crate::service::status::chain(&e)),
            );
            None
        }
    }
}

fn check_runner_root(path: &Path, config: &PluginConfig) -> Result<(), TaskError> {
    let normal = paths::normalize(path);
    if under_any(&normal, &config.allowed_runner_roots) {
        return Ok(());
    }
    let roots: Vec<String> = config.allowed_runner_roots.iter().map(|r| r.display().to_string()).collect();
    Err(TaskError::Refused {
        rule: "allowed_runner_roots",
        detail: format!("runner {} is not under {}", path.display(), roots.join(", ")),
    })
}

fn vmm_identity(config: &PluginConfig) -> Result<(u32, u32), TaskError> {
    use nix::unistd::{Group, User};
    let uid = match config.vmm_user.parse::<u32>() {
        Ok(uid) => uid,
        Err(_) => User::from_name(&config.vmm_user).ok().flatten().map(|u| u.uid.as_raw()).ok_or_else(|| {
            TaskError::Identity(format!("VMM user {:?} does not exist on this node", config.vmm_user))
        })?,
    };
    let gid = match config.vmm_group.parse::<u32>() {
        Ok(gid) => gid,
        Err(_) => Group::from_name(&config.vmm_group).ok().flatten().map(|g| g.gid.as_raw()).ok_or_else(|| {
            TaskError::Identity(format!("VMM group {:?} does not exist on this node", config.vmm_group))
        })?,
    };
    if uid == 0 && !config.allow_root_vmm {
        return Err(TaskError::Refused {
            rule: "allow_root_vmm",
            detail: format!("VMM user {:?} is root", config.vmm_user),
        });
    }
    Ok((uid, gid))
}

fn bridge_for(cfg: &TaskConfig, config: &PluginConfig, tasks: &Tasks) -> Result<Option<String>, TaskError> {
    let bridge = cfg.bridge.clone().or_else(|| config.default_bridge.clone());
    if let Some(b) = &cfg.bridge
        && !config.bridge_allowed(b)
    {
        return Err(TaskError::Refused {
            rule: "allowed_bridges",
            detail: format!("bridge {b:?} is not the default bridge nor in allowed_bridges"),
        });
    }
    if let Some(b) = &bridge {
        let is_bridge = tasks.net.is_bridge(b).map_err(|source| TaskError::Net { name: b.clone(), source })?;
        if !is_bridge {
            return Err(TaskError::Boot(format!("bridge {b:?} does not exist on this node (or is not a bridge)")));
        }
    }
    Ok(bridge)
}

fn check_sockets(runner: &Runner, paths: &TaskPaths) -> Result<(), TaskError> {
    let mut sockets =
        vec![paths.task_dir.join(protocol::CONTROL_SOCKET), paths.work_dir.join(format!("{}.sock", runner.hostname))];
    sockets.extend(runner.shares.iter().map(|s| paths::in_work_dir(&paths.work_dir, &s.socket)));
    for s in sockets {
        paths::check_socket_len(&s).map_err(|len| TaskError::SocketTooLong { path: s.clone(), len })?;
    }
    Ok(())
}

/// A share ready to launch: absolute socket, checked source.
struct PlannedShare {
    tag: String,
    socket: PathBuf,
    source: PathBuf,
}

/// Resolves each share and applies `allowed_share_roots`: sources may be
/// inside the VM's work dir, under an allowed root, or in /nix/store (then
/// always read-only). Symlinks are resolved so a link cannot point elsewhere.
fn plan_shares(
    runner: &Runner,
    paths: &TaskPaths,
    config: &PluginConfig,
) -> Result<Vec<(PlannedShare, ShareFlags)>, TaskError> {
    let scripts = match &runner.virtiofsd_config {
        Some(ini) => crate::supervisord::read(ini)
            .map_err(|e| TaskError::Boot(format!("cannot read the runner's virtiofsd config: {e}")))?,
        None => Vec::new(),
    };
    let store = Path::new("/nix/store");
    let mut planned = Vec::new();
    for share in &runner.shares {
        let lexical = paths::normalize(&paths::in_work_dir(&paths.work_dir, &share.source));
        // Existing sources are resolved; missing ones are created later, as root,
        // exactly at the lexical path (its parents are resolved here).
        let source = resolve_existing_prefix(&lexical);
        let in_work_dir = source.starts_with(&paths.work_dir);
        let allowed = in_work_dir || under_any(&source, &config.allowed_share_roots);
        let in_store = source.starts_with(store);
        if !(allowed || in_store) {
            return Err(TaskError::Refused {
                rule: "allowed_share_roots",
                detail: format!(
                    "share {:?} has source {}, outside the VM's directory and the allowed share roots",
                    share.tag,
                    source.display()
                ),
            });
        }
        let mut flags = scripts
            .iter()
            .find(|p| p.tag == share.tag)
            .map(|p| {
                let script = p.command.first().map(PathBuf::from).unwrap_or_default();
                match std::fs::read_to_string(&script) {
                    Ok(text) => virtiofs::flags_from_script(&text),
                    Err(_) => virtiofs::flags_from_script(&p.command.join(" ")),
                }
            })
            .unwrap_or_default();
        if in_store && !allowed {
            flags.readonly = true;
        }
        if runner.hypervisor == crate::runner::Hypervisor::Crosvm && flags.tag.is_none() {
            flags.tag = Some(share.tag.clone());
        }
        planned.push((
            PlannedShare { tag: share.tag.clone(), socket: paths::in_work_dir(&paths.work_dir, &share.socket), source },
            flags,
        ));
    }
    Ok(planned)
}

/// Canonicalises the longest existing prefix of `path` and appends the rest.
fn resolve_existing_prefix(path: &Path) -> PathBuf {
    let mut existing = path.to_path_buf();
    let mut rest = Vec::new();
    while !existing.as_os_str().is_empty() {
        if let Ok(real) = std::fs::canonicalize(&existing) {
            let mut out = real;
            for part in rest.iter().rev() {
                out.push(part);
            }
            return out;
        }
        match (existing.file_name().map(|f| f.to_os_string()), existing.parent()) {
            (Some(name), Some(parent)) => {
                rest.push(name);
                existing = parent.to_path_buf();
            }
            _ => break,
        }
    }
    path.to_path_buf()
}

/// microvm.nix's state dir: owned by the VMM user and group, 0775.
fn make_work_dir(dir: &Path, uid: u32, gid: u32) -> Result<(), TaskError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir).map_err(TaskError::io(format!("create {}", dir.display())))?;
    std::os::unix::fs::chown(dir, Some(uid), Some(gid)).map_err(TaskError::io(format!("chown {}", dir.display())))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o775))
        .map_err(TaskError::io(format!("chmod {}", dir.display())))
}

/// Deletes a stale interface of that name (we hold its claim, so no live
/// task owns it), then creates it.
fn recreate(
    tasks: &Tasks,
    name: &str,
    undo: &mut Undo,
    create: impl FnOnce(&dyn crate::net::HostNet) -> Result<(), crate::net::NetError>,
) -> Result<(), TaskError> {
    let net_err = |source| TaskError::Net { name: name.to_string(), source };
    if tasks.net.link_exists(name).map_err(net_err)? {
        tracing::info!(interface = name, "removing stale interface");
        tasks.net.delete_link(name).map_err(net_err)?;
    }
    create(tasks.net.as_ref()).map_err(net_err)?;
    undo.interfaces.push(name.to_string());
    Ok(())
}

fn path_or_null(p: &str) -> PathBuf {
    if p.is_empty() { PathBuf::from("/dev/null") } else { PathBuf::from(p) }
}

/// The VMM's environment: the task's (Nomad's variables and `env {}`), minus
/// go-plugin's, with a PATH for the runner's scripts and HOME in the work dir.
fn vmm_env(task: &ProtoTaskConfig, work_dir: &Path) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = task
        .env
        .iter()
        .filter(|(k, _)| !PLUGIN_ENV_VARS.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    if !env.iter().any(|(k, _)| k == "PATH") {
        env.push(("PATH".into(), DEFAULT_PATH.into()));
    }
    env.retain(|(k, _)| k != "HOME");
    env.push(("HOME".into(), work_dir.display().to_string()));
    env.sort();
    env
}

/// Spawns the supervisor; returns its pids and its virtiofsd and exec times.
async fn spawn_supervisor(self_exe: &Path, task_dir: &Path) -> Result<(protocol::Pids, u64, u64), TaskError> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(task_dir.join(protocol::LOG_FILE))
        .map_err(TaskError::io("open the supervisor log"))?;
    let mut cmd = tokio::process::Command::new(self_exe);
    cmd.arg("supervise")
        .arg(task_dir.join(protocol::SPEC_FILE))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(log)
        .kill_on_drop(true);
    for var in PLUGIN_ENV_VARS {
        cmd.env_remove(var);
    }
    let child = cmd.spawn().map_err(TaskError::io(format!("run {} supervise", self_exe.display())))?;
    let out = tokio::time::timeout(SUPERVISOR_REPORT, child.wait_with_output())
        .await
        .map_err(|_| TaskError::Boot(format!("the supervisor did not report within {SUPERVISOR_REPORT:?}")))?
        .map_err(TaskError::io("wait for the supervisor"))?;
    let line = String::from_utf8_lossy(&out.stdout);
    match serde_json::from_str::<Ready>(line.lines().next().unwrap_or("")) {
        Ok(Ready::Started { pids, virtiofsd_ms, exec_ms }) => Ok((pids, virtiofsd_ms, exec_ms)),
        Ok(Ready::Failed { error }) => Err(TaskError::Boot(error)),
        Err(_) => {
            // The task dir goes away with the failed start: keep the log's tail.
            let log = std::fs::read_to_string(task_dir.join(protocol::LOG_FILE)).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(5).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            Err(TaskError::Boot(format!(
                "the supervisor exited ({}) without reporting: {}",
                out.status,
                tail.join(" | ")
            )))
        }
    }
}

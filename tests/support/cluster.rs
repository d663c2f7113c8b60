//! A Nomad cluster on one machine: one server and N clients, each in its own
//! network namespace with its own address on 198.51.100.0/24 (TEST-NET-2),
//! joined by veth pairs to a bridge in a "switch" namespace the cluster
//! creates. Nothing is routed off the machine: no namespace has a default
//! route; clients reach the server by its address.
//!
//! Each client is a real Nomad agent with our driver and its OWN Nix store:
//! the agent runs in a private mount namespace where /nix is a bind mount of
//! a per-client directory (empty at the start; Debian's nix initialises a
//! store and its database there as root). The driver, its supervisors and the
//! VMs inherit that mount namespace, so a runner that is not in the client's
//! store is fetched from the shared binary cache (`substituters`), a
//! `file://` directory outside /nix that every client sees. The Nomad and
//! driver binaries, qemu (Debian's) and virtiofsd
//! (~/.cache/nomad-microvm/virtiofsd) live outside /nix; the guest kernel
//! and initrd are store paths in the runner's closure and come with it.
//!
//! The mount namespace is private (`unshare --propagation private` inside
//! `ip netns exec`), so neither the /nix bind mount nor Nomad's alloc
//! mounts are ever visible on the host; they go away with the last process
//! in the namespace. Dropping a client kills its agent's process group and
//! then everything still in its network namespace (plugin, supervisors,
//! qemu; virtiofsd sandboxes itself into namespaces of its own and exits
//! when its VMM is gone), which is also how [`Node::kill`] makes a node
//! "lost". [`Node::set_link`] cuts a node off the switch instead (a
//! partition: agent and VMs live on), [`Node::crash_agent`] kills the agent
//! alone.
//!
//! Clients are sized with `cpu_total_compute`/`memory_total_mb` (see
//! [`Capacity`]): Nomad scores only max(2, ⌈log2 n⌉) randomly chosen
//! feasible nodes per placement, so with three nodes and three separate
//! one-VM jobs even the `spread` algorithm can put the third VM next to
//! another one; a node that a placement would fill exactly scores 0 and is
//! passed over while an emptier one is left.

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::{Group, Netns, driver_bin, nomad_bin, open_tempdir, wait_until};

/// The cluster's network (the switch bridge carries no address itself).
pub const NET: &str = "198.51.100";
pub const SERVER_ADDR: &str = "198.51.100.10";
/// The server's HTTP API, reachable from every node's namespace.
pub const NOMAD_ADDR: &str = "http://198.51.100.10:4646";
/// The bridge each client's VMs join (as in [`crate::vm::World`]).
pub const VM_BRIDGE: &str = "br0";
pub const VM_HOST_ADDR: &str = "192.0.2.1";

/// What a client offers the scheduler (overrides the fingerprint).
#[derive(Clone, Copy)]
pub struct Capacity {
    /// MHz (`client.cpu_total_compute`).
    pub cpu: u32,
    /// MiB (`client.memory_total_mb`).
    pub memory: u32,
}

/// Server timing: how fast a silent client is declared down. Clients
/// heartbeat every TTL (min_heartbeat_ttl plus up to as much again, at
/// random); a node is down after TTL + grace without one: 15 to 20 s here
/// (Nomad's defaults: 10 s and 10 s). The grace is what a heartbeat may be
/// late on a loaded machine without the node being declared down.
const HEARTBEAT_HCL: &str = "heartbeat_grace = \"10s\"\n    min_heartbeat_ttl = \"5s\"";

pub struct Node {
    pub name: String,
    pub addr: String,
    /// Config, data dir, log.
    pub dir: PathBuf,
    /// Clients: the directory bind-mounted over /nix in the agent's mount namespace.
    pub nix_dir: Option<PathBuf>,
    /// Clients: the driver's state_dir.
    pub state_dir: PathBuf,
    netns: Option<Arc<Netns>>,
    process: Option<Group>,
    /// The netns inode ("net:[N]"), to tell which node a process runs on.
    netns_inode: u64,
}

impl Node {
    pub fn netns(&self) -> &Arc<Netns> {
        self.netns.as_ref().unwrap_or_else(|| panic!("node {} was killed", self.name))
    }

    pub fn is_alive(&self) -> bool {
        self.process.is_some()
    }

    /// The agent's pid (also the pid that holds the client's mount namespace).
    pub fn pid(&self) -> i32 {
        self.process.as_ref().map(Group::pid).unwrap_or_else(|| panic!("node {} is not running", self.name))
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }

    /// A command run in the agent's mount namespace (its /nix), through
    /// `nsenter --mount`: what the driver and the VMs on this node see.
    pub fn in_mounts(&self, program: &str) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.args(["-t", &self.pid().to_string(), "--mount", "--", program]);
        cmd
    }

    /// Names in this node's /nix/store (empty when the store does not exist yet).
    pub fn store_entries(&self) -> Vec<String> {
        let out = self.in_mounts("sh").args(["-c", "ls -A /nix/store 2>/dev/null || true"]).output().expect("nsenter");
        assert!(out.status.success(), "nsenter: {}", String::from_utf8_lossy(&out.stderr));
        let mut v: Vec<String> = String::from_utf8_lossy(&out.stdout).lines().map(str::to_string).collect();
        v.sort();
        v
    }

    /// Whether `path` is a valid path in this node's Nix database.
    pub fn store_has(&self, path: &str) -> bool {
        let out = self.in_mounts("nix-store").args(["--check-validity", path]).output().expect("nsenter nix-store");
        out.status.success()
    }

    /// Names (comm) of the processes in the node's network namespace, sorted.
    pub fn processes(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .netns()
            .pids()
            .into_iter()
            .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/comm")).ok())
            .map(|c| c.trim().to_string())
            .collect();
        v.sort();
        v
    }

    /// SIGKILL of the agent alone (a crashed or stopped Nomad agent): its
    /// driver plugin, the supervisors and the VMs keep running.
    pub fn crash_agent(&mut self) {
        if let Some(mut p) = self.process.take() {
            p.signal_leader(Signal::SIGKILL);
            let _ = p.wait_exit(Duration::from_secs(10));
            // Dropping the group handle would kill the plugin too.
            std::mem::forget(p);
        }
    }

    /// Kills the node the hard way: SIGKILL to the agent, then everything
    /// in its network namespace (driver, supervisors, virtiofsd, qemu) and
    /// the namespace itself (its veth goes with it). The mount namespace
    /// dies with its last process.
    pub fn kill(&mut self) {
        if let Some(mut p) = self.process.take() {
            p.signal_leader(Signal::SIGKILL);
            let _ = p.wait_exit(Duration::from_secs(10));
            drop(p);
        }
        if let Some(ns) = self.netns.take() {
            // The last reference deletes the namespace (a Front on the
            // server's namespace holds another one until it drops).
            drop(ns);
        }
    }

    /// Whether the node's network namespace still exists.
    pub fn netns_exists(&self) -> bool {
        self.netns.is_some()
    }

    /// Cuts the node off the switch (its veth's switch end goes down); the
    /// agent and its VMs keep running.
    pub fn set_link(&self, switch: &Netns, up: bool) {
        ip(&["-n", &switch.name, "link", "set", &veth_name(&self.name), if up { "up" } else { "down" }]);
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if std::thread::panicking() && self.process.is_some() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!("--- last agent log lines of {} ({}) ---", self.name, self.dir.display());
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
        }
        self.kill();
    }
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(out.status.success(), "ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
}

fn veth_name(node: &str) -> String {
    format!("v-{node}")
}

fn netns_inode(ns: &Netns) -> u64 {
    std::fs::metadata(format!("/run/netns/{}", ns.name)).map(|m| m.ino()).expect("netns file")
}

pub struct Cluster {
    /// Clients first: they drop (and stop their VMs) before the server.
    pub clients: Vec<Node>,
    pub server: Node,
    pub switch: Netns,
    /// The shared binary cache (`file://` + this), outside /nix.
    pub cache: PathBuf,
    capacity: Capacity,
    tag: String,
    /// Network namespace inode → node name, for [`VmWatch`].
    names: Arc<Mutex<HashMap<u64, String>>>,
    pub dir: tempfile::TempDir,
}

impl Cluster {
    /// A server and one client per name in `clients` (their addresses are
    /// .11, .12, …), every client's driver fetching from `cache` (a
    /// directory; created if missing). Returns once the server has a leader
    /// and every client is ready with a healthy microvm driver.
    pub fn start(tag: &str, clients: &[&str], capacity: Capacity, cache: Option<&Path>) -> Cluster {
        let dir = open_tempdir();
        let cache = cache.map(Path::to_path_buf).unwrap_or_else(|| dir.path().join("cache"));
        std::fs::create_dir_all(&cache).expect("cache dir");
        let switch = Netns::new(&format!("{tag}sw"));
        ip(&["-n", &switch.name, "link", "add", "sw0", "type", "bridge"]);
        ip(&["-n", &switch.name, "link", "set", "sw0", "up"]);

        let mut server = Self::node(&switch, dir.path(), &format!("{tag}s"), "server", SERVER_ADDR);
        server.write_server_config();
        server.launch(None);
        let names = Arc::new(Mutex::new(HashMap::from([(server.netns_inode, server.name.clone())])));
        let mut cluster =
            Cluster { clients: Vec::new(), server, switch, cache, capacity, tag: tag.to_string(), names, dir };
        cluster.wait_leader();
        for name in clients {
            cluster.launch_client(name);
        }
        for name in clients {
            cluster.wait_node_ready(name);
        }
        cluster
    }

    /// One more client (the next address), e.g. a node that joins later;
    /// waits until it is ready.
    pub fn add_client(&mut self, name: &str) {
        self.launch_client(name);
        self.wait_node_ready(name);
    }

    fn launch_client(&mut self, name: &str) {
        let i = self.clients.len();
        let addr = format!("{NET}.{}", 11 + i);
        let mut node = Self::node(&self.switch, self.dir.path(), &format!("{}{}", self.tag, i + 1), name, &addr);
        node.netns().add_bridge(VM_BRIDGE, &format!("{VM_HOST_ADDR}/24"));
        let nix_dir = node.dir.join("nix");
        std::fs::create_dir_all(&nix_dir).expect("nix dir");
        node.nix_dir = Some(nix_dir.clone());
        node.write_client_config(self.capacity, &self.cache);
        node.launch(Some(&nix_dir));
        self.names.lock().expect("names").insert(node.netns_inode, node.name.clone());
        self.clients.push(node);
    }

    fn node(switch: &Netns, root: &Path, ns_tag: &str, name: &str, addr: &str) -> Node {
        let netns = Arc::new(Netns::new(ns_tag));
        let veth = veth_name(name);
        ip(&["-n", &switch.name, "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &netns.name]);
        ip(&["-n", &switch.name, "link", "set", &veth, "master", "sw0", "up"]);
        ip(&["-n", &netns.name, "addr", "add", &format!("{addr}/24"), "dev", "eth0"]);
        ip(&["-n", &netns.name, "link", "set", "eth0", "up"]);
        let dir = root.join(name);
        std::fs::create_dir_all(dir.join("plugins")).expect("node dir");
        let link = dir.join("plugins/nomad-driver-microvm");
        std::os::unix::fs::symlink(driver_bin(), &link).expect("link driver");
        let netns_inode = netns_inode(&netns);
        Node {
            name: name.to_string(),
            addr: addr.to_string(),
            state_dir: dir.join("state"),
            dir,
            nix_dir: None,
            netns: Some(netns),
            process: None,
            netns_inode,
        }
    }

    /// The cluster's HTTP API through the `nomad` CLI, run in the server's
    /// namespace.
    pub fn nomad(&self, args: &[&str]) -> Output {
        self.server
            .netns()
            .command(nomad_bin())
            .args(args)
            .env("NOMAD_ADDR", NOMAD_ADDR)
            .env("NOMAD_CLI_SHOW_HINTS", "0")
            .env_remove("NOMAD_TOKEN")
            .stdin(Stdio::null())
            .output()
            .expect("run nomad")
    }

    pub fn nomad_ok(&self, args: &[&str]) -> String {
        crate::nomad::expect_success(args, self.nomad(args))
    }

    pub fn api(&self, path: &str) -> serde_json::Value {
        crate::nomad::parse_api_reply(path, &self.nomad_ok(&["operator", "api", path]))
    }

    fn wait_leader(&self) {
        wait_until("the server to elect itself", Duration::from_secs(60), Duration::from_millis(300), || {
            let out = self.nomad(&["operator", "api", "/v1/status/leader"]);
            let text = String::from_utf8_lossy(&out.stdout).to_string();
            if out.status.success() && text.contains(SERVER_ADDR) {
                Ok(())
            } else {
                Err(format!("{text}{}", String::from_utf8_lossy(&out.stderr)))
            }
        });
    }

    /// Nodes by name (as the server sees them).
    pub fn nodes(&self) -> BTreeMap<String, serde_json::Value> {
        let v = self.api("/v1/nodes");
        v.as_array()
            .into_iter()
            .flatten()
            .map(|n| (n["Name"].as_str().unwrap_or_default().to_string(), n.clone()))
            .collect()
    }

    pub fn node_id(&self, name: &str) -> String {
        self.nodes().get(name).and_then(|n| n["ID"].as_str()).unwrap_or_else(|| panic!("no node {name}")).to_string()
    }

    /// Waits until node `name` is ready with a healthy microvm driver.
    pub fn wait_node_ready(&self, name: &str) {
        wait_until(&format!("node {name} to be ready"), Duration::from_secs(120), Duration::from_millis(500), || {
            let nodes = self.nodes();
            let n = nodes.get(name).ok_or("not registered")?;
            let id = n["ID"].as_str().unwrap_or_default();
            let node = self.api(&format!("/v1/node/{id}"));
            let driver = &node["Drivers"]["microvm"];
            if node["Status"] == "ready" && driver["Healthy"] == true {
                Ok(())
            } else {
                Err(format!("status {}, microvm driver {}", node["Status"], driver))
            }
        });
    }

    /// Waits until the server reports node `name` with one of `statuses`
    /// ("down", "disconnected", "ready", …); returns it.
    pub fn wait_node_status(&self, name: &str, statuses: &[&str], limit: Duration) -> String {
        wait_until(&format!("node {name} to be {statuses:?}"), limit, Duration::from_millis(250), || {
            let nodes = self.nodes();
            let s = nodes.get(name).and_then(|n| n["Status"].as_str()).unwrap_or_default().to_string();
            if statuses.contains(&s.as_str()) { Ok(s) } else { Err(format!("status {s}")) }
        })
    }

    pub fn client(&self, name: &str) -> &Node {
        self.clients.iter().find(|c| c.name == name).unwrap_or_else(|| panic!("no client {name}"))
    }

    pub fn client_mut(&mut self, name: &str) -> &mut Node {
        self.clients.iter_mut().find(|c| c.name == name).unwrap_or_else(|| panic!("no client {name}"))
    }

    /// Allocations of job `id` in namespace `ns`, newest first.
    pub fn allocs(&self, ns: &str, id: &str) -> Vec<serde_json::Value> {
        let v = self.api(&format!("/v1/job/{id}/allocations?namespace={ns}"));
        let mut list = v.as_array().cloned().unwrap_or_default();
        list.sort_by_key(|a| std::cmp::Reverse(a["CreateIndex"].as_u64().unwrap_or(0)));
        list
    }

    pub fn alloc(&self, ns: &str, id: &str) -> serde_json::Value {
        self.api(&format!("/v1/allocation/{id}?namespace={ns}"))
    }

    /// Waits until job `id` has a running allocation other than those in
    /// `not`; returns it.
    pub fn wait_running_except(&self, ns: &str, id: &str, not: &[&str], limit: Duration) -> serde_json::Value {
        wait_until(&format!("{ns}/{id} to run a new allocation"), limit, Duration::from_millis(500), || {
            let allocs = self.allocs(ns, id);
            let fresh: Vec<&serde_json::Value> =
                allocs.iter().filter(|a| !not.contains(&a["ID"].as_str().unwrap_or_default())).collect();
            let a = fresh.first().ok_or_else(|| "no new allocation yet".to_string())?;
            if a["ClientStatus"] == "running" && a["TaskStates"]["vm"]["State"] == "running" {
                Ok((*a).clone())
            } else {
                Err(format!(
                    "{} on {}: {}",
                    a["ClientStatus"],
                    a["NodeName"],
                    crate::nomad::events_text(&a["TaskStates"]["vm"])
                ))
            }
        })
    }

    /// The VM's console (`nomad alloc logs`; the CLI reads it from the client).
    pub fn console(&self, ns: &str, alloc: &str) -> String {
        String::from_utf8_lossy(&self.nomad(&["alloc", "logs", "-namespace", ns, alloc, "vm"]).stdout).to_string()
    }

    pub fn wait_console(&self, ns: &str, alloc: &str, what: &str, limit: Duration) -> String {
        wait_until(&format!("console of {alloc} to show {what:?}"), limit, Duration::from_millis(500), || {
            let c = self.console(ns, alloc);
            if c.contains(what) {
                Ok(c)
            } else {
                Err(c.chars().rev().take(300).collect::<String>().chars().rev().collect())
            }
        })
    }

    /// Who runs which VM right now, read from /proc: see [`VmWatch`].
    pub fn watch(&self, hosts: &[&str]) -> VmWatch {
        VmWatch::start(hosts, self.names.clone())
    }
}

impl Node {
    fn common_hcl(&self) -> String {
        format!(
            r#"name = "{name}"
datacenter = "dc1"
data_dir = "{data}"
bind_addr = "0.0.0.0"
advertise {{
  http = "{addr}"
  rpc  = "{addr}"
  serf = "{addr}"
}}
disable_update_check = true
log_level = "DEBUG"
"#,
            name = self.name,
            data = self.dir.join("data").display(),
            addr = self.addr,
        )
    }

    fn write_server_config(&self) {
        let hcl = format!(
            "{common}server {{\n  enabled = true\n  bootstrap_expect = 1\n    {HEARTBEAT_HCL}\n}}\nclient {{\n  enabled = false\n}}\n",
            common = self.common_hcl()
        );
        std::fs::write(self.dir.join("agent.hcl"), hcl).expect("write agent.hcl");
    }

    fn write_client_config(&self, capacity: Capacity, cache: &Path) {
        let plugin = crate::vm::plugin_config(
            &self.state_dir,
            // A node whose agent died stops its VMs before the servers
            // place them elsewhere: at most the jobs' stop_on_client_after.
            &format!("    substituters = [\"file://{}\"]\n    stop_without_agent_after = \"10s\"\n", cache.display()),
        );
        let hcl = format!(
            r#"{common}plugin_dir = "{plugins}"
client {{
  enabled = true
  servers = ["{SERVER_ADDR}:4647"]
  network_interface = "eth0"
  cpu_total_compute = {cpu}
  memory_total_mb = {memory}
  options = {{
    # these probe 169.254.169.254: never let them run
    "fingerprint.denylist" = "env_aws,env_gce,env_azure,env_digitalocean"
  }}
}}
plugin "nomad-driver-microvm" {{
  config {{
{plugin}
  }}
}}
"#,
            common = self.common_hcl(),
            plugins = self.dir.join("plugins").display(),
            cpu = capacity.cpu,
            memory = capacity.memory,
        );
        std::fs::write(self.dir.join("agent.hcl"), hcl).expect("write agent.hcl");
    }

    /// Starts the agent in the node's network namespace; with `nix_dir`,
    /// in a private mount namespace where that directory is /nix.
    fn launch(&mut self, nix_dir: Option<&Path>) {
        let log =
            std::fs::OpenOptions::new().create(true).append(true).open(self.dir.join("agent.log")).expect("agent log");
        let config = format!("-config={}", self.dir.join("agent.hcl").display());
        let mut cmd = match nix_dir {
            Some(dir) => {
                // `ip netns exec` already gives a mount namespace (slave to
                // the host's); unshare makes a private one in which /nix is
                // bind-mounted, then sh execs the agent (same pid).
                let mut cmd = self.netns().command("unshare");
                cmd.args(["--mount", "--propagation", "private", "--", "sh", "-c"])
                    .args([r#"mount --bind "$1" /nix && shift && exec "$@""#, "sh"])
                    .arg(dir)
                    .arg(nomad_bin());
                cmd
            }
            None => self.netns().command(nomad_bin()),
        };
        cmd.arg("agent").arg(config);
        crate::agent_tmpdir(&mut cmd, &self.dir);
        cmd.stdin(Stdio::null()).stdout(log.try_clone().expect("log")).stderr(log);
        self.process = Some(Group::spawn(&format!("nomad agent {}", self.name), &mut cmd));
        if let Some(dir) = nix_dir {
            // The bind mount is in place once the agent runs (sh execs it):
            // its /nix is then the client's directory (same inode).
            let pid = self.pid();
            let want = std::fs::metadata(dir).map(|m| (m.dev(), m.ino())).expect("nix dir");
            wait_until("the client's /nix bind mount", Duration::from_secs(10), Duration::from_millis(50), || {
                let exe = std::fs::read_link(format!("/proc/{pid}/exe")).map_err(|e| e.to_string())?;
                if exe != nomad_bin() {
                    return Err(format!("still {}", exe.display()));
                }
                let nix = std::fs::metadata(format!("/proc/{pid}/root/nix")).map_err(|e| e.to_string())?;
                if (nix.dev(), nix.ino()) == want { Ok(()) } else { Err("/nix is not the client's".into()) }
            });
        }
    }
}

/// Watches, every 200 ms, which VMs run where: every process whose
/// command line starts with `microvm@<host>` (the VMM's argv[0], set by
/// microvm-run's `exec -a`), machine-wide, and the node (network
/// namespace) it runs in. Records the most copies ever seen per host and
/// every change, with the time since the watch started.
pub struct VmWatch {
    stop: Arc<AtomicBool>,
    state: Arc<Mutex<WatchState>>,
    thread: Option<std::thread::JoinHandle<()>>,
    pub started: Instant,
}

#[derive(Default)]
struct WatchState {
    max: BTreeMap<String, usize>,
    current: BTreeMap<String, Vec<String>>,
    log: Vec<String>,
    samples: u64,
}

fn scan(hosts: &[String], nodes: &Mutex<HashMap<u64, String>>) -> BTreeMap<String, Vec<String>> {
    let mut found: BTreeMap<String, Vec<String>> = hosts.iter().map(|h| (h.clone(), Vec::new())).collect();
    let Ok(dir) = std::fs::read_dir("/proc") else { return found };
    for e in dir.flatten() {
        let name = e.file_name();
        let Some(pid) = name.to_str().filter(|s| s.bytes().all(|b| b.is_ascii_digit())) else { continue };
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else { continue };
        let argv0 = cmdline.split(|b| *b == 0).next().unwrap_or_default();
        for h in hosts {
            if argv0 == format!("microvm@{h}").as_bytes() {
                let ns = std::fs::metadata(format!("/proc/{pid}/ns/net")).map(|m| m.ino()).unwrap_or(0);
                let node = nodes.lock().expect("names").get(&ns).cloned().unwrap_or_else(|| format!("netns:{ns}"));
                found.get_mut(h).expect("host").push(format!("{node}/pid {pid}"));
            }
        }
    }
    found
}

impl VmWatch {
    fn start(hosts: &[&str], nodes: Arc<Mutex<HashMap<u64, String>>>) -> VmWatch {
        let hosts: Vec<String> = hosts.iter().map(|h| h.to_string()).collect();
        let stop = Arc::new(AtomicBool::new(false));
        let state = Arc::new(Mutex::new(WatchState::default()));
        let started = Instant::now();
        let thread = {
            let (stop, state) = (stop.clone(), state.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    let found = scan(&hosts, &nodes);
                    let t = started.elapsed().as_secs_f64();
                    let mut st = state.lock().expect("watch state");
                    st.samples += 1;
                    for (h, where_) in &found {
                        let m = st.max.entry(h.clone()).or_default();
                        *m = (*m).max(where_.len());
                        if st.current.get(h) != Some(where_) {
                            let line = format!(
                                "{t:7.1}s {h}: {}",
                                if where_.is_empty() { "not running".to_string() } else { where_.join(", ") }
                            );
                            st.log.push(line);
                            st.current.insert(h.clone(), where_.clone());
                        }
                    }
                    drop(st);
                    std::thread::sleep(Duration::from_millis(200));
                }
            })
        };
        VmWatch { stop, state, thread: Some(thread), started }
    }

    /// The most copies of `host` seen at once so far.
    pub fn max(&self, host: &str) -> usize {
        self.state.lock().expect("watch state").max.get(host).copied().unwrap_or(0)
    }

    /// Nodes running `host` now (as last sampled).
    pub fn nodes_of(&self, host: &str) -> Vec<String> {
        let st = self.state.lock().expect("watch state");
        st.current
            .get(host)
            .map(|v| v.iter().map(|s| s.split('/').next().unwrap_or_default().to_string()).collect())
            .unwrap_or_default()
    }

    /// Every change so far, one line each.
    pub fn log(&self) -> String {
        self.state.lock().expect("watch state").log.join("\n")
    }

    pub fn samples(&self) -> u64 {
        self.state.lock().expect("watch state").samples
    }

    pub fn elapsed(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }
}

impl Drop for VmWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

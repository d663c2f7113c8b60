//! gitfront end to end: a real sshd (its own config, on 127.0.0.1 inside a
//! test's network namespace) whose keys are authorized with
//! `gitfront authorized-key`, a gitfront config, a `file://` binary cache,
//! git clients with their own keys, and test flakes without inputs whose
//! hosts build bootable test runners (tests/runner/make-runner.sh).
//!
//! sshd logs in as root: Debian's nix (no daemon) only works as root here.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use crate::runner::virtiofsd_bin;
use crate::{Group, Netns, repo_root, wait_until};

/// The port sshd listens on (inside the test's own namespace: always free).
pub const SSH_PORT: u16 = 2222;

/// What Debian's nix needs here, put after `nix` in each of gitfront's
/// default command templates: no sandbox (builders run make-runner.sh with
/// host tools), no substituters (no internet).
pub const DEBIAN_NIX_FLAGS: [&str; 6] = ["--option", "sandbox", "false", "--option", "substituters", ""];

/// gitfront's default `build.*_command` templates (`gitfront check-config`
/// of an empty file), each with [`DEBIAN_NIX_FLAGS`]: the tests run the
/// flags that keep pushed flakes from reading local files, as shipped.
fn default_commands() -> String {
    static COMMANDS: OnceLock<String> = OnceLock::new();
    COMMANDS
        .get_or_init(|| {
            let printed = run_ok(
                Command::new(crate::bins::gitfront_bin()).args(["check-config", "/dev/null"]),
                "gitfront check-config /dev/null",
            );
            let defaults: toml::Value = toml::from_str(&printed).expect("check-config prints TOML");
            let mut out = String::new();
            for key in ["command", "eval_command", "lock_command", "copy_command"] {
                let argv = defaults["build"][key].as_array().expect("an argv template");
                let mut argv: Vec<String> = argv.iter().map(|a| a.as_str().expect("a string").to_string()).collect();
                assert_eq!(argv[0], "nix", "build.{key}");
                argv.splice(1..1, DEBIAN_NIX_FLAGS.iter().map(|s| s.to_string()));
                let quoted: Vec<String> = argv.iter().map(|a| toml::Value::String(a.clone()).to_string()).collect();
                out += &format!("{key} = [{}]\n", quoted.join(", "));
            }
            out
        })
        .clone()
}

/// A gitfront config for tests; `nomad` is the agent's address.
pub fn config_toml(dir: &Path, nomad: &str, extra: &str) -> String {
    format!(
        r#"repos_root = "{dir}/repos"
state_dir = "{dir}/state"
binary_cache = "file://{dir}/cache"
path = "/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin"

[nomad]
address = "{nomad}"
request_timeout = "5s"
deploy_timeout = "3m"

[build]
{commands}timeout = "5m"

[job]
cpu_per_vcpu = 200
{extra}
"#,
        dir = dir.display(),
        commands = default_commands(),
    )
}

fn run_ok(cmd: &mut Command, what: &str) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(out.status.success(), "{what} failed: {}{}", text(&out.stdout), text(&out.stderr));
    text(&out.stdout).trim().to_string()
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// An ssh key pair; `private` is the key file.
pub struct Key {
    pub private: PathBuf,
    pub public: PathBuf,
}

impl Key {
    pub fn new(dir: &Path, name: &str) -> Key {
        let private = dir.join(name);
        run_ok(
            Command::new("ssh-keygen").args(["-q", "-t", "ed25519", "-N", "", "-C", name, "-f"]).arg(&private),
            "ssh-keygen",
        );
        Key { public: private.with_extension("pub"), private }
    }
}

/// sshd + gitfront config + the users' keys.
pub struct Front {
    pub netns: Arc<Netns>,
    pub dir: PathBuf,
    pub config: PathBuf,
    pub alice: Key,
    pub bob: Key,
    /// A key whose forced command is `env`: shows what environment this
    /// sshd gives forced commands (gitfront's among them).
    pub probe: Key,
    _sshd: Group,
}

impl Front {
    /// Writes the config (Nomad at `nomad`), authorizes alice's and bob's
    /// keys through `gitfront authorized-key`, starts sshd in `netns`.
    pub fn start(netns: Arc<Netns>, dir: &Path, nomad: &str) -> Front {
        let config = dir.join("gitfront.toml");
        std::fs::write(&config, config_toml(dir, nomad, "")).expect("write config");
        let keys = dir.join("keys");
        std::fs::create_dir_all(&keys).expect("keys dir");
        let alice = Key::new(&keys, "alice");
        let bob = Key::new(&keys, "bob");
        let probe = Key::new(&keys, "probe");
        let mut authorized = String::new();
        for (user, key) in [("alice", &alice), ("bob", &bob)] {
            let line = run_ok(
                Command::new(crate::bins::gitfront_bin())
                    .args(["authorized-key", "--user", user, "--config"])
                    .arg(&config)
                    .arg("--key-file")
                    .arg(&key.public),
                "gitfront authorized-key",
            );
            authorized += &line;
            authorized.push('\n');
        }
        let probe_key = std::fs::read_to_string(&probe.public).expect("probe key");
        authorized += &format!("command=\"env\",restrict {}", probe_key.trim());
        authorized.push('\n');
        let authorized_keys = dir.join("authorized_keys");
        std::fs::write(&authorized_keys, authorized).expect("authorized_keys");

        let host_key = dir.join("ssh_host_ed25519_key");
        run_ok(
            Command::new("ssh-keygen").args(["-q", "-t", "ed25519", "-N", "", "-f"]).arg(&host_key),
            "ssh-keygen host key",
        );
        let sshd_config = dir.join("sshd_config");
        std::fs::write(
            &sshd_config,
            format!(
                "Port {SSH_PORT}\nListenAddress 127.0.0.1\nHostKey {host_key}\nAuthorizedKeysFile {ak}\n\
                 PidFile {dir}/sshd.pid\nStrictModes no\nPermitRootLogin forced-commands-only\nUsePAM no\n\
                 PasswordAuthentication no\nKbdInteractiveAuthentication no\nPubkeyAuthentication yes\n\
                 PrintMotd no\nLogLevel VERBOSE\nAcceptEnv LANG LC_* GIT_PROTOCOL NIX_* NOMAD_*\n\
                 Subsystem sftp internal-sftp\n",
                host_key = host_key.display(),
                ak = authorized_keys.display(),
                dir = dir.display()
            ),
        )
        .expect("sshd_config");
        // sshd's privilege separation directory.
        std::fs::create_dir_all("/run/sshd").expect("/run/sshd");
        let log = dir.join("sshd.log");
        let log_file = std::fs::File::create(&log).expect("sshd log");
        let mut cmd = netns.command("/usr/sbin/sshd");
        cmd.args(["-D", "-e", "-f"])
            .arg(&sshd_config)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("log"))
            .stderr(log_file);
        let sshd = Group::spawn("sshd", &mut cmd);
        wait_until("sshd to listen", Duration::from_secs(20), Duration::from_millis(100), || {
            let l = std::fs::read_to_string(&log).unwrap_or_default();
            if l.contains(&format!("Server listening on 127.0.0.1 port {SSH_PORT}")) { Ok(()) } else { Err(l) }
        });
        Front { netns, dir: dir.to_path_buf(), config, alice, bob, probe, _sshd: sshd }
    }

    pub fn key(&self, user: &str) -> &Key {
        match user {
            "alice" => &self.alice,
            "bob" => &self.bob,
            "probe" => &self.probe,
            other => panic!("no key for {other}"),
        }
    }

    /// ssh's command line as `user`, sending the variables named in `env`
    /// (`SendEnv`; this sshd accepts `NIX_*` and `NOMAD_*`).
    fn ssh_command(&self, user: &str, env: &[(&str, &str)]) -> String {
        let mut ssh = format!(
            "ssh -F /dev/null -i {} -p {SSH_PORT} -o IdentitiesOnly=yes -o StrictHostKeyChecking=no \
             -o UserKnownHostsFile=/dev/null -o BatchMode=yes -o LogLevel=ERROR",
            self.key(user).private.display()
        );
        for (name, _) in env {
            ssh += &format!(" -o SendEnv={name}");
        }
        ssh
    }

    /// `ssh root@127.0.0.1 <command>` as `user` (no command: a shell).
    pub fn ssh(&self, user: &str, command: Option<&str>) -> Output {
        self.ssh_sending_env(user, command, &[])
    }

    /// Like [`Front::ssh`], with `env` set for ssh and sent to the server.
    fn ssh_sending_env(&self, user: &str, command: Option<&str>, env: &[(&str, &str)]) -> Output {
        let remote = command.map(|c| format!(" {}", shell_quote(c))).unwrap_or_default();
        self.netns
            .command("sh")
            .args(["-c", &format!("{} root@127.0.0.1{remote} </dev/null", self.ssh_command(user, env))])
            .envs(env.iter().copied())
            .output()
            .expect("run ssh")
    }

    /// The environment this sshd gives a forced command when the client
    /// sends `env` (`SendEnv`): the probe key's forced command prints it.
    pub fn forced_command_env(&self, env: &[(&str, &str)]) -> String {
        let out = self.ssh_sending_env("probe", None, env);
        assert!(out.status.success(), "probe: {}", text(&out.stderr));
        text(&out.stdout)
    }

    /// `git <args>` in `cwd` as `user`, inside the namespace.
    pub fn git(&self, user: &str, cwd: &Path, args: &[&str]) -> Output {
        self.git_sending_env(user, cwd, args, &[])
    }

    /// Like [`Front::git`], with `env` set for ssh and sent to the server
    /// (`SendEnv`; this sshd accepts `NIX_*` and `NOMAD_*`).
    pub fn git_sending_env(&self, user: &str, cwd: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
        let ssh = self.ssh_command(user, env);
        self.netns
            .command("git")
            .args(args)
            .current_dir(cwd)
            .envs(env.iter().copied())
            .env("GIT_SSH_COMMAND", ssh)
            .env("GIT_AUTHOR_NAME", user)
            .env("GIT_AUTHOR_EMAIL", format!("{user}@example.org"))
            .env("GIT_COMMITTER_NAME", user)
            .env("GIT_COMMITTER_EMAIL", format!("{user}@example.org"))
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .output()
            .expect("run git")
    }

    /// The bare repo gitfront keeps for `user`'s `repo`.
    pub fn repo_dir(&self, user: &str, repo: &str) -> PathBuf {
        self.dir.join("repos").join(user).join(format!("{repo}.git"))
    }

    /// The commit `branch` points to in the bare repo (None: no such ref).
    pub fn branch_commit(&self, user: &str, repo: &str, branch: &str) -> Option<String> {
        let out = Command::new("git")
            .arg("--git-dir")
            .arg(self.repo_dir(user, repo))
            .args(["rev-parse", "--verify", "--quiet", &format!("refs/heads/{branch}")])
            .output()
            .expect("git rev-parse");
        out.status.success().then(|| text(&out.stdout).trim().to_string())
    }

    /// A git work dir for `user` with `repo` on the front as `origin`.
    /// `user`'s bare repo `repo` made directly on disk (a push through
    /// gitfront would need Nomad): one commit of `files` on `branch`, made in
    /// work dir `user`. Returns the commit.
    pub fn seed_repo(&self, user: &str, repo: &str, branch: &str, files: &[(&str, String)], message: &str) -> String {
        let bare = self.repo_dir(user, repo);
        std::fs::create_dir_all(bare.parent().expect("repos dir")).expect("create the user's repos dir");
        let init = std::process::Command::new("git").args(["init", "-q", "--bare"]).arg(&bare).output().expect("git");
        assert!(init.status.success(), "git init --bare: {}", text(&init.stderr));
        let work = self.workdir(user, user, repo);
        let commit = work.commit_tree(files, &[], message);
        work.git_ok(&["push", "-q", bare.to_str().expect("UTF-8 repo path"), &format!("main:{branch}")]);
        commit
    }

    pub fn workdir(&self, user: &str, name: &str, repo: &str) -> Workdir<'_> {
        let dir = self.dir.join("work").join(name);
        std::fs::create_dir_all(&dir).expect("work dir");
        let w = Workdir { front: self, user: user.to_string(), dir };
        w.git_ok(&["init", "-q", "-b", "main"]);
        w.git_ok(&["remote", "add", "origin", &format!("root@127.0.0.1:{repo}")]);
        w
    }
}

/// Single-quotes for sh.
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

pub struct Workdir<'a> {
    front: &'a Front,
    pub user: String,
    pub dir: PathBuf,
}

impl Workdir<'_> {
    pub fn git(&self, args: &[&str]) -> Output {
        self.front.git(&self.user, &self.dir, args)
    }

    pub fn git_ok(&self, args: &[&str]) -> String {
        let out = self.git(args);
        assert!(out.status.success(), "git {args:?} failed: {}{}", text(&out.stdout), text(&out.stderr));
        text(&out.stdout).trim().to_string()
    }

    /// Writes flake.nix for `hosts` and commits it; returns the commit.
    pub fn commit_flake(&self, hosts: &[Host], message: &str) -> String {
        std::fs::write(self.dir.join("flake.nix"), flake_nix(hosts)).expect("write flake.nix");
        self.git_ok(&["add", "flake.nix"]);
        self.git_ok(&["commit", "-q", "-m", message]);
        self.git_ok(&["rev-parse", "HEAD"])
    }

    /// Makes the work tree exactly `files` (path, content) and `symlinks`
    /// (path, target), commits it and returns the commit.
    pub fn commit_tree(&self, files: &[(&str, String)], symlinks: &[(&str, &str)], message: &str) -> String {
        self.git_ok(&["rm", "-rq", "--ignore-unmatch", "."]);
        for (path, content) in files {
            std::fs::write(self.dir.join(path), content).expect("write file");
        }
        for (path, target) in symlinks {
            std::os::unix::fs::symlink(target, self.dir.join(path)).expect("symlink");
        }
        self.git_ok(&["add", "-A", "."]);
        self.git_ok(&["commit", "-q", "--allow-empty", "-m", message]);
        self.git_ok(&["rev-parse", "HEAD"])
    }

    /// `git push origin <refspecs>`; returns the output (not checked).
    pub fn push(&self, refspecs: &[&str]) -> Output {
        self.push_sending_env(refspecs, &[])
    }

    /// `git push` with `env` sent to the server through ssh's `SendEnv`.
    pub fn push_sending_env(&self, refspecs: &[&str], env: &[(&str, &str)]) -> Output {
        let mut args = vec!["push", "--porcelain", "origin"];
        args.extend_from_slice(refspecs);
        let out = self.front.git_sending_env(&self.user, &self.dir, &args, env);
        eprintln!(
            "--- git push {refspecs:?} (exit {:?}) ---\n{}{}",
            out.status.code(),
            text(&out.stdout),
            text(&out.stderr)
        );
        out
    }
}

/// One host of a test flake.
#[derive(Clone)]
pub struct Host {
    pub name: String,
    /// The guest's address is 192.0.2.<ip>.
    pub ip: u8,
    pub mem: u32,
    /// A build that fails with "deliberate build failure".
    pub broken: bool,
    /// make-runner.sh's `--hypervisor`: `qemu` boots; the others are
    /// layout-only runners whose microvm-run says "not bootable here" and
    /// exits 1.
    pub hypervisor: String,
    /// Extra attributes of the runner derivation: (name, Nix expression).
    pub env: Vec<(String, String)>,
}

impl Host {
    pub fn new(name: &str, ip: u8) -> Host {
        Host { name: name.into(), ip, mem: 256, broken: false, hypervisor: "qemu".into(), env: Vec::new() }
    }

    pub fn mem(mut self, mem: u32) -> Host {
        self.mem = mem;
        self
    }

    pub fn broken(mut self) -> Host {
        self.broken = true;
        self
    }

    /// A runner that builds but cannot boot (e.g. `cloud-hypervisor`).
    pub fn hypervisor(mut self, hv: &str) -> Host {
        self.hypervisor = hv.into();
        self
    }

    /// Adds `name = <expr>;` to the runner derivation (the expression may
    /// use the flake's `inputs` and `self`).
    pub fn env(mut self, name: &str, expr: &str) -> Host {
        self.env.push((name.into(), expr.into()));
        self
    }
}

/// Store paths the test flakes build from: make-runner.sh, the guest
/// kernel and initramfs, virtiofsd. Added once per test process.
struct Inputs {
    script: String,
    kernel: String,
    initrd: String,
    virtiofsd: String,
}

fn store_add(path: &Path) -> String {
    run_ok(Command::new("nix-store").arg("--add").arg(path), "nix-store --add")
}

fn inputs() -> &'static Inputs {
    static INPUTS: OnceLock<Inputs> = OnceLock::new();
    INPUTS.get_or_init(|| {
        let guest = run_ok(&mut Command::new(repo_root().join("tests/runner/guest.sh")), "guest.sh");
        let mut lines = guest.lines();
        let kernel = PathBuf::from(lines.next().expect("kernel path"));
        let initrd = PathBuf::from(lines.next().expect("initrd path"));
        Inputs {
            script: store_add(&repo_root().join("tests/runner/make-runner.sh")),
            kernel: store_add(&kernel),
            initrd: store_add(&initrd),
            virtiofsd: store_add(&virtiofsd_bin()),
        }
    })
}

/// A flake with no inputs: `nixosConfigurations.<host>.config.microvm`
/// with `declaredRunner` (make-runner.sh's `--emit-to` mode run as the
/// builder: a runner of the host's hypervisor — bootable for qemu — on the
/// test bridge with a `data` share), `vcpu` and `mem`.
///
/// The store paths it builds from are strings with their store context
/// added (`builtins.appendContext`, allowed in pure evaluation unlike
/// `builtins.storePath`), so they become the derivation's inputs and the
/// runner's closure holds the kernel, initrd and virtiofsd it boots with —
/// what `nix copy` puts into the binary cache.
pub fn flake_nix(hosts: &[Host]) -> String {
    flake_nix_with(hosts, "")
}

/// [`flake_nix`] with `inputs` (Nix attributes, e.g. `x.url = "…";`) and
/// `outputs` taking them as `inputs`.
pub fn flake_nix_with(hosts: &[Host], inputs_nix: &str) -> String {
    let i = inputs();
    let mut configs = String::new();
    for h in hosts {
        let runner = if h.broken {
            format!(
                r#"derivation {{ name = "microvm-qemu-{name}"; system = "x86_64-linux"; builder = "/bin/sh";
          args = [ "-c" "echo 'deliberate build failure: {name} is broken' >&2; exit 1" ]; }}"#,
                name = h.name
            )
        } else {
            let extra: String = h.env.iter().map(|(n, e)| format!("{n} = {e}; ")).collect();
            format!(
                "runner {{ host = \"{}\"; hv = \"{}\"; ip = {}; mem = {}; extra = {{ {extra}}}; }}",
                h.name, h.hypervisor, h.ip, h.mem
            )
        };
        configs += &format!(
            "      {name}.config.microvm = {{\n        declaredRunner = {runner};\n        vcpu = 1;\n        mem = {mem};\n      }};\n",
            name = h.name,
            mem = h.mem
        );
    }
    format!(
        r#"{{
  description = "gitfront e2e test flake";
  {inputs_line}outputs = {{ self, ... }}@inputs:
    let
      store = p: builtins.appendContext p {{ ${{p}} = {{ path = true; }}; }};
      script = store "{script}";
      kernel = store "{kernel}";
      initrd = store "{initrd}";
      virtiofsd = store "{virtiofsd}";
      runner = {{ host, hv, ip, mem, extra }}: derivation ({{
        name = "microvm-${{hv}}-${{host}}";
        system = "x86_64-linux";
        builder = "/bin/bash";
        PATH = "/usr/bin:/bin:/usr/sbin:/sbin";
        args = [ script "--hostname" host "--hypervisor" hv "--tap" "vm-${{host}}" "--share" "data:data"
          "--guest-ip" "192.0.2.${{toString ip}}/24" "--ping" "192.0.2.1" "--mem" (toString mem)
          "--kernel" kernel "--initrd" initrd "--virtiofsd" virtiofsd
          "--emit-to" (builtins.placeholder "out") ];
      }} // extra);
    in {{
      nixosConfigurations = {{
{configs}      }};
    }};
}}
"#,
        inputs_line = if inputs_nix.is_empty() { String::new() } else { format!("inputs = {{ {inputs_nix} }};\n  ") },
        script = i.script,
        kernel = i.kernel,
        initrd = i.initrd,
        virtiofsd = i.virtiofsd,
    )
}

/// Every path under `dir` (relative, sorted): to show nothing was created.
pub fn tree(dir: &Path) -> Vec<String> {
    fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) {
        let Ok(entries) = std::fs::read_dir(dir) else { return };
        for e in entries.flatten() {
            let p = e.path();
            out.push(p.strip_prefix(base).unwrap_or(&p).display().to_string());
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                walk(base, &p, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

/// Nomad state of gitfront's jobs, through the agent's HTTP API.
pub mod nomad {
    use super::*;
    use crate::Agent;

    pub fn job(agent: &Agent, ns: &str, id: &str) -> serde_json::Value {
        agent.api(&format!("/v1/job/{id}?namespace={ns}"))
    }

    /// Allocations, newest first.
    pub fn allocs(agent: &Agent, ns: &str, id: &str) -> Vec<serde_json::Value> {
        let v = agent.api(&format!("/v1/job/{id}/allocations?namespace={ns}"));
        let mut list = v.as_array().cloned().unwrap_or_default();
        list.sort_by_key(|a| std::cmp::Reverse(a["CreateIndex"].as_u64().unwrap_or(0)));
        list
    }

    /// The ID of the running allocation of the job's version `version`.
    pub fn wait_running(agent: &Agent, ns: &str, id: &str, version: u64, limit: Duration) -> String {
        wait_until(&format!("{ns}/{id} v{version} to run"), limit, Duration::from_millis(500), || {
            let allocs = allocs(agent, ns, id);
            let a = allocs.iter().find(|a| a["JobVersion"] == version).ok_or("no allocation of that version")?;
            if a["ClientStatus"] == "running" && a["TaskStates"]["vm"]["State"] == "running" {
                Ok(a["ID"].as_str().unwrap_or_default().to_string())
            } else {
                Err(format!("{} / {}", a["ClientStatus"], crate::nomad::events_text(&a["TaskStates"]["vm"])))
            }
        })
    }

    /// The VM's console (`nomad alloc logs`).
    pub fn console(agent: &Agent, ns: &str, alloc: &str) -> String {
        text(&agent.nomad(&["alloc", "logs", "-namespace", ns, alloc, "vm"]).stdout)
    }

    /// Waits for the console to show `what`.
    pub fn wait_console(agent: &Agent, ns: &str, alloc: &str, what: &str, limit: Duration) -> String {
        wait_until(&format!("console of {alloc} to show {what:?}"), limit, Duration::from_millis(500), || {
            let c = console(agent, ns, alloc);
            if c.contains(what) {
                Ok(c)
            } else {
                Err(c.chars().rev().take(300).collect::<String>().chars().rev().collect())
            }
        })
    }
}

//! Evaluating and building a host from an exported commit, and copying the
//! runner's closure to the binary cache, with the config's command
//! templates (real `nix` by default).
//!
//! The flake is referenced as `path:<dir>`: the directory holds exactly the
//! pushed commit (checkout.rs), and Nix copies it into the store as is.
//!
//! Before anything is evaluated for real, [`HostBuild::check_inputs`]
//! makes sure that nix will fetch nothing but network inputs of the allowed
//! schemes (flakelock.rs). Checking the committed `flake.lock` is not
//! enough: nix reads `flake.nix`'s inputs, and one that the lock does not
//! lock (say `path:/run/keys/…`, in a flake without a lock) is fetched into
//! the store *before* `--no-update-lock-file` refuses to change the lock.
//! So `build.lock_command` first computes the lock nix would use, in a
//! throwaway store of its own (where whatever that fetches is deleted with
//! the scratch dir), and that lock is checked too. The real evaluation then
//! runs with `--no-update-lock-file`: it uses that same lock or stops.
//!
//! Everything of one build lives in the push's scratch dir: the checkout
//! (`src/`), the lock command's store, and nix's `TMPDIR`, cache and `HOME`
//! (so no cache is shared between users' flakes). Under
//! `build.confinement = "landlock"` that dir (and, for the build, the dir
//! of its out link) is all nix may write, and beside the system and the
//! store all it may read (confine.rs).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Deserialize;

use crate::config::{Config, ConfineMode, expand};
use crate::confine::{ConfineError, Confinement};
use crate::exec::{self, ExecError, Finished, Stdout, clean_command};
use crate::flakelock::{self, LockError};
use crate::names::Branch;

/// microvm.nix's defaults for `microvm.vcpu` and `microvm.mem`, applied
/// by Nix so that a config without them gets the same VM microvm.nix would
/// build.
pub const APPLY: &str = "m: { vcpu = m.vcpu or 1; mem = m.mem or 512; }";

/// The guest's size, from its NixOS config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct Guest {
    pub vcpu: u32,
    pub mem: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Inputs(#[from] LockError),
    #[error(transparent)]
    Confine(#[from] ConfineError),
    #[error("reading the inputs of flake.nix failed")]
    LockCheck { output: Vec<String> },
    #[error("the lock command printed {text:?}, not flake metadata with `locks`")]
    LockOutput { text: String },
    #[error("flake.lock does not lock every input of flake.nix: run `nix flake lock` and commit flake.lock")]
    StaleLock { output: Vec<String> },
    #[error("evaluating {attr} failed")]
    Eval { attr: String, output: Vec<String> },
    #[error("{attr} evaluated to {text:?}, not {{\"vcpu\": <n>, \"mem\": <MiB>}} with positive whole numbers")]
    EvalOutput { attr: String, text: String },
    #[error("building {attr} failed")]
    Build { attr: String, output: Vec<String> },
    #[error("the build of {attr} made no result at {}", out_link.display())]
    NoResult {
        attr: String,
        out_link: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the build of {attr} produced {}, which is not in /nix/store", path.display())]
    NotInStore { attr: String, path: PathBuf },
    #[error("copying {path} to the binary cache {cache} failed")]
    Copy { path: String, cache: String, output: Vec<String> },
    #[error("{what} exceeded the build time limit of {}", crate::duration::format(*limit))]
    TimedOut { what: String, limit: Duration, output: Vec<String> },
    #[error("{what}")]
    Exec {
        what: String,
        #[source]
        source: ExecError,
    },
    #[error("cannot create {}", path.display())]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl BuildError {
    /// The command output worth showing with the error (its tail).
    pub fn output(&self) -> &[String] {
        match self {
            BuildError::Eval { output, .. }
            | BuildError::LockCheck { output }
            | BuildError::StaleLock { output }
            | BuildError::Build { output, .. }
            | BuildError::Copy { output, .. }
            | BuildError::TimedOut { output, .. } => output,
            _ => &[],
        }
    }
}

/// One host's build, from one exported commit.
pub struct HostBuild<'a> {
    config: &'a Config,
    /// The push's scratch dir for this build: `src/` is the checkout.
    scratch: PathBuf,
    dir: PathBuf,
    flake: String,
    /// nix's `allowed-uris` for the allowed input schemes.
    allowed_uris: String,
    branch: &'a Branch,
    deadline: Instant,
}

impl<'a> HostBuild<'a> {
    /// Evaluation and build of `branch` from the checkout in
    /// [`HostBuild::source_dir`] of `scratch` must both finish within the
    /// config's `build.timeout`, counted from now.
    pub fn new(config: &'a Config, scratch: &Path, branch: &'a Branch) -> HostBuild<'a> {
        let flake_dir = Self::source_dir(scratch);
        HostBuild {
            config,
            scratch: scratch.to_path_buf(),
            dir: flake_dir.clone(),
            flake: format!("path:{}", flake_dir.display()),
            allowed_uris: flakelock::allowed_uris(&config.build.allowed_input_schemes),
            branch,
            deadline: Instant::now() + config.build.timeout,
        }
    }

    /// Where the commit is exported to (checkout.rs) in `scratch`.
    pub fn source_dir(scratch: &Path) -> PathBuf {
        scratch.join("src")
    }

    pub fn runner_attr(&self) -> String {
        format!("nixosConfigurations.{}.config.microvm.declaredRunner", self.branch)
    }

    fn microvm_attr(&self) -> String {
        format!("nixosConfigurations.{}.config.microvm", self.branch)
    }

    /// Runs a nix command on the pushed flake: its scratch dirs as
    /// `TMPDIR`, cache and `HOME`, confined (unless configured otherwise)
    /// to the scratch dir and `writable`.
    fn run(&self, what: String, argv: Vec<String>, stdout: Stdout, writable: &[&Path]) -> Result<Finished, BuildError> {
        let limit = self.deadline.saturating_duration_since(Instant::now());
        let mut cmd = clean_command(&argv[0], &self.config.path);
        cmd.args(&argv[1..]);
        for (var, sub) in [("TMPDIR", "tmp"), ("XDG_CACHE_HOME", "cache"), ("HOME", "home")] {
            let dir = self.scratch.join(sub);
            std::fs::create_dir_all(&dir).map_err(|source| BuildError::Dir { path: dir.clone(), source })?;
            cmd.env(var, dir);
        }
        // Lives until the command has been spawned (its fd is the ruleset).
        let confinement = match self.config.build.confinement {
            ConfineMode::Landlock => {
                let mut dirs = vec![self.scratch.as_path()];
                dirs.extend_from_slice(writable);
                Some(Confinement::new(&dirs)?)
            }
            ConfineMode::None => None,
        };
        if let Some(c) = &confinement {
            c.apply(&mut cmd);
        }
        exec::run(cmd, stdout, limit).map_err(|e| match e {
            ExecError::TimedOut { output, .. } => {
                BuildError::TimedOut { what, limit: self.config.build.timeout, output }
            }
            source => BuildError::Exec { what, source },
        })
    }

    /// Refuses the flake if nix would fetch anything but allowed network
    /// inputs for it: checks the committed `flake.lock`, then the lock nix
    /// computes from `flake.nix` in a throwaway chroot store in the scratch
    /// dir (removed here).
    pub fn check_inputs(&self) -> Result<(), BuildError> {
        let schemes = &self.config.build.allowed_input_schemes;
        flakelock::check_committed(&self.dir, schemes)?;
        let store = self.scratch.join("lock-store");
        let store = store.as_path();
        let store_text = store.to_string_lossy();
        let argv = expand(
            &self.config.build.lock_command,
            &[("{flake}", &self.flake), ("{store}", &store_text), ("{allowed_uris}", &self.allowed_uris)],
        );
        let done = self.run("reading the inputs of flake.nix".into(), argv, Stdout::Capture, &[]);
        remove_store(store);
        let done = done?;
        if !done.status.success() {
            return Err(BuildError::LockCheck { output: done.output });
        }
        let text = String::from_utf8_lossy(&done.stdout).trim().to_string();
        let metadata: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
        let Some(locks) = metadata.get("locks") else {
            return Err(BuildError::LockOutput { text });
        };
        flakelock::check("flake.nix", locks, schemes)?;
        // What nix says when the lock it computed differs from the file:
        // the eval's --no-update-lock-file would refuse the same, after
        // fetching the missing inputs.
        if done.output.iter().any(|l| l.contains("not writing modified lock file")) {
            return Err(BuildError::StaleLock { output: done.output });
        }
        Ok(())
    }

    /// `microvm.vcpu` and `microvm.mem` of the host (defaults 1 and 512).
    pub fn guest(&self) -> Result<Guest, BuildError> {
        let attr = self.microvm_attr();
        let installable = format!("{}#{attr}", self.flake);
        let argv = expand(
            &self.config.build.eval_command,
            &[
                ("{installable}", &installable),
                ("{apply}", APPLY),
                ("{flake}", &self.flake),
                ("{attr}", &attr),
                ("{allowed_uris}", &self.allowed_uris),
            ],
        );
        let done = self.run(format!("evaluating {attr}"), argv, Stdout::Capture, &[])?;
        if !done.status.success() {
            return Err(BuildError::Eval { attr, output: done.output });
        }
        let text = String::from_utf8_lossy(&done.stdout).trim().to_string();
        match serde_json::from_str::<Guest>(&text) {
            Ok(g) if g.vcpu > 0 && g.mem > 0 => Ok(g),
            _ => Err(BuildError::EvalOutput { attr, text }),
        }
    }

    /// Builds the runner; `out_link` becomes a GC root pointing at it.
    /// Returns the runner's store path.
    pub fn runner(&self, out_link: &Path) -> Result<PathBuf, BuildError> {
        let attr = self.runner_attr();
        // nix writes the out link (its GC root) itself.
        let link_dir = out_link.parent().unwrap_or(Path::new("/"));
        std::fs::create_dir_all(link_dir).map_err(|source| BuildError::Dir { path: link_dir.to_path_buf(), source })?;
        let installable = format!("{}#{attr}", self.flake);
        let link = out_link.to_string_lossy();
        let argv = expand(
            &self.config.build.command,
            &[
                ("{installable}", &installable),
                ("{out_link}", &link),
                ("{flake}", &self.flake),
                ("{attr}", &attr),
                ("{allowed_uris}", &self.allowed_uris),
            ],
        );
        let done = self.run(format!("building {attr}"), argv, Stdout::Merge, &[link_dir])?;
        if !done.status.success() {
            return Err(BuildError::Build { attr, output: done.output });
        }
        let path = std::fs::read_link(out_link).map_err(|source| BuildError::NoResult {
            attr: attr.clone(),
            out_link: out_link.to_path_buf(),
            source,
        })?;
        if !path.starts_with("/nix/store/") {
            return Err(BuildError::NotInStore { attr, path });
        }
        Ok(path)
    }

    /// Copies `path` and its closure to the binary cache.
    pub fn copy_to_cache(&self, path: &Path) -> Result<Duration, BuildError> {
        let path_text = path.to_string_lossy();
        let cache = &self.config.binary_cache;
        let argv = expand(&self.config.build.copy_command, &[("{cache}", cache), ("{path}", &path_text)]);
        let limit = self.config.build.timeout;
        let mut cmd = clean_command(&argv[0], &self.config.path);
        cmd.args(&argv[1..]);
        let what = format!("copying {path_text} to {cache}");
        let done = exec::run(cmd, Stdout::Merge, limit).map_err(|e| match e {
            ExecError::TimedOut { output, .. } => BuildError::TimedOut { what: what.clone(), limit, output },
            source => BuildError::Exec { what: what.clone(), source },
        })?;
        if !done.status.success() {
            return Err(BuildError::Copy { path: path_text.into_owned(), cache: cache.clone(), output: done.output });
        }
        Ok(done.elapsed)
    }
}

/// Removes a chroot store nix made: its store paths are read-only, so
/// (unless we are root) their directories must be made writable first.
fn remove_store(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    fn writable(dir: &Path) {
        let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
        let Ok(entries) = std::fs::read_dir(dir) else { return };
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                writable(&e.path());
            }
        }
    }
    if dir.exists() {
        writable(dir);
        let _ = std::fs::remove_dir_all(dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A config whose commands are `sh -c <script>` with the placeholders
    /// as positional parameters (`$0`, `$1`, …).
    fn config(eval: &str, build: &str, timeout: &str) -> Config {
        let argv = |script: &str, phs: &[&str]| {
            let mut v = vec!["\"sh\"".to_string(), "\"-c\"".into(), format!("{script:?}")];
            v.extend(phs.iter().map(|p| format!("{p:?}")));
            format!("[{}]", v.join(", "))
        };
        let text = format!(
            "path = \"/usr/bin:/bin\"\n[build]\ntimeout = \"{timeout}\"\neval_command = {}\ncommand = {}\n",
            argv(eval, &["{installable}", "{apply}"]),
            argv(build, &["{installable}", "{out_link}"]),
        );
        Config::parse(Path::new("/t.toml"), &text).unwrap()
    }

    fn branch() -> Branch {
        Branch::parse("alpha").unwrap()
    }

    #[test]
    fn reads_the_guest_size_and_names_bad_output() {
        let tmp = tempfile::tempdir().unwrap();
        let scratch = tmp.path();
        let b = branch();
        let c = config(r#"echo '{"vcpu": 2, "mem": 128}'"#, "true", "10s");
        assert_eq!(HostBuild::new(&c, scratch, &b).guest().unwrap(), Guest { vcpu: 2, mem: 128 });
        let c = config(r#"echo '{"vcpu": 0, "mem": 128}'"#, "true", "10s");
        let e = HostBuild::new(&c, scratch, &b).guest().unwrap_err();
        assert!(e.to_string().starts_with("nixosConfigurations.alpha.config.microvm evaluated to "), "{e}");
        let c = config("echo 'error: attribute missing' >&2; exit 1", "true", "10s");
        let e = HostBuild::new(&c, scratch, &b).guest().unwrap_err();
        assert_eq!(e.to_string(), "evaluating nixosConfigurations.alpha.config.microvm failed");
        assert_eq!(e.output(), ["error: attribute missing"]);
    }

    #[test]
    fn passes_the_installable_and_reads_the_out_link() {
        let tmp = tempfile::tempdir().unwrap();
        let scratch = &tmp.path().join("scratch");
        let b = branch();
        // $0 = {installable}, $1 = {out_link}
        let c = config("true", r#"echo "$0" > "$1.seen"; ln -s /nix/store/aaaa-microvm-qemu-alpha "$1""#, "10s");
        let link = tmp.path().join("roots/alpha");
        let runner = HostBuild::new(&c, scratch, &b).runner(&link).unwrap();
        assert_eq!(runner, Path::new("/nix/store/aaaa-microvm-qemu-alpha"));
        let seen = std::fs::read_to_string(tmp.path().join("roots/alpha.seen")).unwrap();
        assert_eq!(
            seen.trim(),
            format!("path:{}/src#nixosConfigurations.alpha.config.microvm.declaredRunner", scratch.display())
        );

        let c = config("true", r#"ln -sfn /tmp/elsewhere "$1""#, "10s");
        let e = HostBuild::new(&c, scratch, &b).runner(&link).unwrap_err();
        assert!(matches!(e, BuildError::NotInStore { .. }), "{e}");
        let c = config("true", "echo 'builder failed' >&2; exit 1", "10s");
        let e = HostBuild::new(&c, scratch, &b).runner(&tmp.path().join("x")).unwrap_err();
        assert_eq!(e.output(), ["builder failed"]);
    }

    #[test]
    fn a_build_over_the_time_limit_is_killed_and_says_so() {
        let tmp = tempfile::tempdir().unwrap();
        let b = branch();
        let c = config("true", "echo compiling; sleep 30", "1s");
        let started = std::time::Instant::now();
        let e = HostBuild::new(&c, tmp.path(), &b).runner(&tmp.path().join("r")).unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(10));
        assert_eq!(
            e.to_string(),
            "building nixosConfigurations.alpha.config.microvm.declaredRunner exceeded the build time limit of 1s"
        );
        assert_eq!(e.output(), ["compiling"]);
    }

    /// A config whose lock command is `sh -c <script> {flake} {store} {allowed_uris}`.
    fn lock_config(script: &str) -> Config {
        let text = format!(
            "path = \"/usr/bin:/bin\"\n[build]\nlock_command = [\"sh\", \"-c\", {script:?}, \"{{flake}}\", \"{{store}}\", \"{{allowed_uris}}\"]\n"
        );
        Config::parse(Path::new("/t.toml"), &text).unwrap()
    }

    /// Prints flake metadata whose lock has the root input `s` = `locked`.
    fn metadata_script(locked: &str) -> String {
        format!(
            r#"echo '{{"locks": {{"nodes": {{"root": {{"inputs": {{"s": "s"}}}}, "s": {{"locked": {locked}, "original": {locked}}}}}, "root": "root", "version": 7}}}}'"#
        )
    }

    #[test]
    fn check_inputs_checks_the_committed_lock_and_the_computed_one() {
        let tmp = tempfile::tempdir().unwrap();
        let scratch = tmp.path();
        let src = HostBuild::source_dir(scratch);
        std::fs::create_dir(&src).unwrap();
        let store = scratch.join("lock-store");
        let b = branch();

        // The placeholders, and a store nix left read-only is removed.
        let c = lock_config(
            r#"echo "$0 $2" > "$1.args"; mkdir -p "$1/nix/store/x-source"; chmod -R a-w "$1"; echo '{"locks": {"nodes": {"root": {}}}}'"#,
        );
        HostBuild::new(&c, scratch, &b).check_inputs().unwrap();
        let args = std::fs::read_to_string(scratch.join("lock-store.args")).unwrap();
        assert_eq!(args.trim(), format!("path:{} https://", src.display()));
        assert!(!store.exists(), "the lock check's store is removed");

        // An input of flake.nix that no committed lock mentions.
        let c = lock_config(&metadata_script(r#"{"type": "path", "path": "/run/keys/token", "narHash": "sha256-x"}"#));
        let e = HostBuild::new(&c, scratch, &b).check_inputs().unwrap_err();
        assert_eq!(
            e.to_string(),
            "flake.nix: input s (path:/run/keys/token) reads local files; pushed flakes may only fetch inputs over the network"
        );
        let github = metadata_script(r#"{"type": "github", "owner": "o", "repo": "r", "rev": "a"}"#);
        let c = lock_config(&github);
        HostBuild::new(&c, scratch, &b).check_inputs().unwrap();
        // The same input, but flake.lock lacks it (nix says so on stderr).
        let c = lock_config(&format!(
            "echo \"warning: not writing modified lock file of flake 'path:/x':\" >&2; echo \"• Added input 's':\" >&2; {github}"
        ));
        let e = HostBuild::new(&c, scratch, &b).check_inputs().unwrap_err();
        assert_eq!(
            e.to_string(),
            "flake.lock does not lock every input of flake.nix: run `nix flake lock` and commit flake.lock"
        );
        assert_eq!(e.output().last().map(String::as_str), Some("• Added input 's':"));

        // The committed lock is checked before nix runs at all.
        let bad = r#"{"nodes": {"root": {"inputs": {"k": "k"}}, "k": {"locked": {"type": "git", "url": "file:///srv/bob.git"}}}}"#;
        std::fs::write(src.join("flake.lock"), bad).unwrap();
        let c = lock_config("touch \"$1.ran\"; exit 1");
        let e = HostBuild::new(&c, scratch, &b).check_inputs().unwrap_err();
        assert!(e.to_string().starts_with("flake.lock: input k (git+file:///srv/bob.git) reads local files"), "{e}");
        assert!(!scratch.join("lock-store.ran").exists(), "nix did not run");
        std::fs::remove_file(src.join("flake.lock")).unwrap();

        let c = lock_config("echo 'error: flake.nix: syntax error' >&2; exit 1");
        let e = HostBuild::new(&c, scratch, &b).check_inputs().unwrap_err();
        assert_eq!(e.to_string(), "reading the inputs of flake.nix failed");
        assert_eq!(e.output(), ["error: flake.nix: syntax error"]);
        let c = lock_config("echo 'not json'");
        let e = HostBuild::new(&c, scratch, &b).check_inputs().unwrap_err();
        assert_eq!(e.to_string(), "the lock command printed \"not json\", not flake metadata with `locks`");
    }
}

//! Evaluating and building a host from an exported commit, and copying the
//! runner's closure to the binary cache, with the config's command
//! templates (real `nix` by default).
//!
//! The flake is referenced as `path:<dir>`: the directory holds exactly the
//! pushed commit (checkout.rs), and Nix copies it into the store as is.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Deserialize;

use crate::config::{Config, expand};
use crate::exec::{self, ExecError, Finished, Stdout, clean_command};
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
    flake: String,
    branch: &'a Branch,
    deadline: Instant,
}

impl<'a> HostBuild<'a> {
    /// Evaluation and build of `branch` from `flake_dir` must both finish
    /// within the config's `build.timeout`, counted from now.
    pub fn new(config: &'a Config, flake_dir: &Path, branch: &'a Branch) -> HostBuild<'a> {
        HostBuild {
            config,
            flake: format!("path:{}", flake_dir.display()),
            branch,
            deadline: Instant::now() + config.build.timeout,
        }
    }

    pub fn runner_attr(&self) -> String {
        format!("nixosConfigurations.{}.config.microvm.declaredRunner", self.branch)
    }

    fn microvm_attr(&self) -> String {
        format!("nixosConfigurations.{}.config.microvm", self.branch)
    }

    fn run(&self, what: String, argv: Vec<String>, stdout: Stdout) -> Result<Finished, BuildError> {
        let limit = self.deadline.saturating_duration_since(Instant::now());
        let mut cmd = clean_command(&argv[0], &self.config.path);
        cmd.args(&argv[1..]);
        exec::run(cmd, stdout, limit).map_err(|e| match e {
            ExecError::TimedOut { output, .. } => {
                BuildError::TimedOut { what, limit: self.config.build.timeout, output }
            }
            source => BuildError::Exec { what, source },
        })
    }

    /// `microvm.vcpu` and `microvm.mem` of the host (defaults 1 and 512).
    pub fn guest(&self) -> Result<Guest, BuildError> {
        let attr = self.microvm_attr();
        let installable = format!("{}#{attr}", self.flake);
        let argv = expand(
            &self.config.build.eval_command,
            &[("{installable}", &installable), ("{apply}", APPLY), ("{flake}", &self.flake), ("{attr}", &attr)],
        );
        let done = self.run(format!("evaluating {attr}"), argv, Stdout::Capture)?;
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
        if let Some(dir) = out_link.parent() {
            std::fs::create_dir_all(dir).map_err(|source| BuildError::Dir { path: dir.to_path_buf(), source })?;
        }
        let installable = format!("{}#{attr}", self.flake);
        let link = out_link.to_string_lossy();
        let argv = expand(
            &self.config.build.command,
            &[("{installable}", &installable), ("{out_link}", &link), ("{flake}", &self.flake), ("{attr}", &attr)],
        );
        let done = self.run(format!("building {attr}"), argv, Stdout::Merge)?;
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
        let b = branch();
        let c = config(r#"echo '{"vcpu": 2, "mem": 128}'"#, "true", "10s");
        assert_eq!(HostBuild::new(&c, Path::new("/src"), &b).guest().unwrap(), Guest { vcpu: 2, mem: 128 });
        let c = config(r#"echo '{"vcpu": 0, "mem": 128}'"#, "true", "10s");
        let e = HostBuild::new(&c, Path::new("/src"), &b).guest().unwrap_err();
        assert!(e.to_string().starts_with("nixosConfigurations.alpha.config.microvm evaluated to "), "{e}");
        let c = config("echo 'error: attribute missing' >&2; exit 1", "true", "10s");
        let e = HostBuild::new(&c, Path::new("/src"), &b).guest().unwrap_err();
        assert_eq!(e.to_string(), "evaluating nixosConfigurations.alpha.config.microvm failed");
        assert_eq!(e.output(), ["error: attribute missing"]);
    }

    #[test]
    fn passes_the_installable_and_reads_the_out_link() {
        let tmp = tempfile::tempdir().unwrap();
        let b = branch();
        // $0 = {installable}, $1 = {out_link}
        let c = config("true", r#"echo "$0" > "$1.seen"; ln -s /nix/store/aaaa-microvm-qemu-alpha "$1""#, "10s");
        let link = tmp.path().join("roots/alpha");
        let runner = HostBuild::new(&c, Path::new("/src"), &b).runner(&link).unwrap();
        assert_eq!(runner, Path::new("/nix/store/aaaa-microvm-qemu-alpha"));
        let seen = std::fs::read_to_string(tmp.path().join("roots/alpha.seen")).unwrap();
        assert_eq!(seen.trim(), "path:/src#nixosConfigurations.alpha.config.microvm.declaredRunner");

        let c = config("true", r#"ln -sfn /tmp/elsewhere "$1""#, "10s");
        let e = HostBuild::new(&c, Path::new("/src"), &b).runner(&link).unwrap_err();
        assert!(matches!(e, BuildError::NotInStore { .. }), "{e}");
        let c = config("true", "echo 'builder failed' >&2; exit 1", "10s");
        let e = HostBuild::new(&c, Path::new("/src"), &b).runner(&tmp.path().join("x")).unwrap_err();
        assert_eq!(e.output(), ["builder failed"]);
    }

    #[test]
    fn a_build_over_the_time_limit_is_killed_and_says_so() {
        let tmp = tempfile::tempdir().unwrap();
        let b = branch();
        let c = config("true", "echo compiling; sleep 30", "1s");
        let started = std::time::Instant::now();
        let e = HostBuild::new(&c, Path::new("/src"), &b).runner(&tmp.path().join("r")).unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(10));
        assert_eq!(
            e.to_string(),
            "building nixosConfigurations.alpha.config.microvm.declaredRunner exceeded the build time limit of 1s"
        );
        assert_eq!(e.output(), ["compiling"]);
    }
}

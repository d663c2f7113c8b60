//! The operator's TOML config (`/etc/gitfront.toml`). Every key has a
//! default (README.md lists them); what is given is checked once, at load
//! time, and an error names the key and says what was expected.
//!
//! Nothing here comes from the environment: the ssh session's environment is
//! partly the client's (`SendEnv`/`AcceptEnv`), so even `NOMAD_ADDR` and
//! `NOMAD_TOKEN` are config keys (`nomad.address`, `nomad.token_file`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::duration;
use crate::names::{RepoName, UserName};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: line {line}: {message} (at `{text}`)", path.display())]
    Parse { path: PathBuf, line: usize, text: String, message: String },
    #[error("{}: `{key}`: {reason}", path.display())]
    Invalid { path: PathBuf, key: &'static str, reason: String },
}

/// The whole config, validated.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where the file came from (for messages, and for the hook command).
    pub file: PathBuf,
    /// `<repos_root>/<user>/<repo>.git` are the bare repos.
    pub repos_root: PathBuf,
    /// Scratch space (checkouts, hook dirs) and the GC roots of deployed runners.
    pub state_dir: PathBuf,
    /// The Nix store URL runners are copied to (`nix copy --to`), e.g. `file:///srv/cache`.
    pub binary_cache: String,
    /// `PATH` for git, tar and nix: the only variable gitfront passes on.
    pub path: String,
    pub nomad: NomadConfig,
    pub build: BuildConfig,
    pub job: JobConfig,
    pub limits: Limits,
}

#[derive(Debug, Clone)]
pub struct NomadConfig {
    /// Like `NOMAD_ADDR`: `http://host:port` (plain HTTP: gitfront has no TLS).
    pub address: String,
    /// A file holding the ACL token (like `NOMAD_TOKEN`), sent as `X-Nomad-Token`.
    pub token_file: Option<PathBuf>,
    pub datacenters: Vec<String>,
    /// Namespace per user and repo: `{user}` and `{repo}` are replaced.
    pub namespace: String,
    /// Limit for each HTTP request.
    pub request_timeout: Duration,
    /// How long a push follows a deployment before it stops waiting.
    pub deploy_timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct BuildConfig {
    /// Flake input schemes a pushed flake's lock may use (flakelock.rs):
    /// network ones only.
    pub allowed_input_schemes: Vec<String>,
    /// Whether nix runs under Landlock while it evaluates and builds
    /// (confine.rs).
    pub confinement: ConfineMode,
    /// argv templates; see [`BUILD_PLACEHOLDERS`] and friends.
    pub command: Vec<String>,
    pub eval_command: Vec<String>,
    /// Computes the lock nix would use, in a throwaway store (nixbuild.rs).
    pub lock_command: Vec<String>,
    pub copy_command: Vec<String>,
    /// Limit for evaluating + building one ref.
    pub timeout: Duration,
    /// Lines of build output shown when a build fails.
    pub log_tail_lines: usize,
}

/// `build.confinement`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfineMode {
    /// nix may open files only under the system dirs, the store and the
    /// push's scratch dir.
    Landlock,
    /// No confinement beyond nix's own (for kernels without Landlock).
    None,
}

impl ConfineMode {
    pub fn as_str(self) -> &'static str {
        match self {
            ConfineMode::Landlock => "landlock",
            ConfineMode::None => "none",
        }
    }
}

#[derive(Debug, Clone)]
pub struct JobConfig {
    /// Nomad CPU (MHz) reserved per guest vCPU.
    pub cpu_per_vcpu: u32,
    /// MiB reserved on top of the guest's memory (the VMM's own).
    pub memory_overhead: u32,
    /// Time the guest gets to shut down gracefully.
    pub kill_timeout: Duration,
    /// A client cut off from the servers stops its VMs after this long; the
    /// servers replace them only later (see job.rs).
    pub stop_on_client_after: Duration,
}

#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest pack a push may send (`receive.maxInputSize`).
    pub max_push_bytes: u64,
    pub max_vcpu: u32,
    /// MiB.
    pub max_mem: u32,
}

/// Placeholders each template may use; the first ones listed as required
/// must appear.
pub const BUILD_PLACEHOLDERS: &[&str] = &["{installable}", "{out_link}", "{flake}", "{attr}", "{allowed_uris}"];
pub const BUILD_REQUIRED: &[&str] = &["{installable}", "{out_link}"];
pub const EVAL_PLACEHOLDERS: &[&str] = &["{installable}", "{apply}", "{flake}", "{attr}", "{allowed_uris}"];
pub const EVAL_REQUIRED: &[&str] = &["{installable}", "{apply}"];
pub const LOCK_PLACEHOLDERS: &[&str] = &["{flake}", "{store}", "{allowed_uris}"];
pub const LOCK_REQUIRED: &[&str] = &["{flake}", "{store}"];
pub const COPY_PLACEHOLDERS: &[&str] = &["{cache}", "{path}"];
pub const COPY_REQUIRED: &[&str] = &["{cache}", "{path}"];

const NIX_FLAGS: [&str; 2] = ["--extra-experimental-features", "nix-command flakes"];

/// What keeps a pushed flake from reading local files while it is
/// evaluated (README.md, "Flake inputs"): no registry lookups (an input
/// nobody locked could be resolved to anything), `nixConfig` ignored,
/// eval-time fetchers and locked URL inputs limited to `allowed-uris`,
/// and (`restrict-eval`) no file outside the flake and the store.
const EVAL_FLAGS: [&str; 10] = [
    "--no-use-registries",
    "--option",
    "accept-flake-config",
    "false",
    "--option",
    "restrict-eval",
    "true",
    "--option",
    "allowed-uris",
    "{allowed_uris}",
];

fn nix_command(sub: &[&str]) -> Vec<String> {
    std::iter::once("nix").chain(NIX_FLAGS).chain(sub.iter().copied()).map(String::from).collect()
}

/// `nix <sub>` with [`EVAL_FLAGS`] and `lock_flag` after the subcommand.
fn nix_eval_command(sub: &[&str], lock_flag: &str, rest: &[&str]) -> Vec<String> {
    let mut argv = nix_command(sub);
    argv.extend(EVAL_FLAGS.iter().chain([&lock_flag]).chain(rest).map(|s| s.to_string()));
    argv
}

/// The file as written: everything optional, unknown keys refused.
#[derive(Debug, Default, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(deny_unknown_fields)]
struct RawConfig {
    repos_root: Option<PathBuf>,
    state_dir: Option<PathBuf>,
    binary_cache: Option<String>,
    path: Option<String>,
    #[serde(default)]
    nomad: RawNomad,
    #[serde(default)]
    build: RawBuild,
    #[serde(default)]
    job: RawJob,
    #[serde(default)]
    limits: RawLimits,
}

#[derive(Debug, Default, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(deny_unknown_fields)]
struct RawNomad {
    address: Option<String>,
    token_file: Option<PathBuf>,
    datacenters: Option<Vec<String>>,
    namespace: Option<String>,
    request_timeout: Option<String>,
    deploy_timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(deny_unknown_fields)]
struct RawBuild {
    allowed_input_schemes: Option<Vec<String>>,
    confinement: Option<String>,
    command: Option<Vec<String>>,
    eval_command: Option<Vec<String>>,
    lock_command: Option<Vec<String>>,
    copy_command: Option<Vec<String>>,
    timeout: Option<String>,
    log_tail_lines: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(deny_unknown_fields)]
struct RawJob {
    cpu_per_vcpu: Option<u32>,
    memory_overhead: Option<u32>,
    kill_timeout: Option<String>,
    stop_on_client_after: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(deny_unknown_fields)]
struct RawLimits {
    max_push_bytes: Option<u64>,
    max_vcpu: Option<u32>,
    max_mem: Option<u32>,
}

/// Every key with its default, as README.md documents them (and as
/// `gitfront check-config` prints an effective config).
pub fn defaults() -> Config {
    Config {
        file: PathBuf::new(),
        repos_root: PathBuf::from("/var/lib/gitfront/repos"),
        state_dir: PathBuf::from("/var/lib/gitfront"),
        binary_cache: "file:///var/lib/gitfront/cache".into(),
        path: "/run/current-system/sw/bin:/usr/local/bin:/usr/bin:/bin".into(),
        nomad: NomadConfig {
            address: "http://127.0.0.1:4646".into(),
            token_file: None,
            datacenters: vec!["*".into()],
            namespace: "{user}-{repo}".into(),
            request_timeout: Duration::from_secs(10),
            deploy_timeout: Duration::from_secs(300),
        },
        build: BuildConfig {
            allowed_input_schemes: crate::flakelock::DEFAULT_SCHEMES.iter().map(|s| s.to_string()).collect(),
            confinement: ConfineMode::Landlock,
            // The committed lock must lock every input: nix fetches exactly its nodes.
            command: nix_eval_command(
                &["build"],
                "--no-update-lock-file",
                &["--out-link", "{out_link}", "{installable}"],
            ),
            eval_command: nix_eval_command(
                &["eval"],
                "--no-update-lock-file",
                &["--json", "{installable}", "--apply", "{apply}"],
            ),
            // Not --no-update-lock-file: the lock nix computes (printed, not
            // written) names what a lock-less or stale input would fetch.
            lock_command: nix_eval_command(
                &["flake", "metadata"],
                "--no-write-lock-file",
                &["--json", "--store", "{store}", "{flake}"],
            ),
            copy_command: nix_command(&["copy", "--to", "{cache}", "{path}"]),
            timeout: Duration::from_secs(30 * 60),
            log_tail_lines: 30,
        },
        job: JobConfig {
            cpu_per_vcpu: 1000,
            memory_overhead: 64,
            kill_timeout: Duration::from_secs(30),
            stop_on_client_after: Duration::from_secs(60),
        },
        limits: Limits { max_push_bytes: 100 << 20, max_vcpu: 8, max_mem: 16384 },
    }
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
        Config::parse(path, &text)
    }

    /// Parses `text` (named `path` in messages).
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            // toml's own Display is a multi-line snippet; the message plus the
            // offending line (which names the key) reads better in one line.
            let start = e.span().map(|s| s.start).unwrap_or(0).min(text.len());
            let line = text[..start].matches('\n').count() + 1;
            let line_text = text.lines().nth(line - 1).unwrap_or("").trim().to_string();
            ConfigError::Parse { path: path.to_path_buf(), line, text: line_text, message: e.message().to_string() }
        })?;
        let invalid =
            |key: &'static str, reason: String| ConfigError::Invalid { path: path.to_path_buf(), key, reason };
        let dur = |key: &'static str, v: Option<String>, default: Duration| -> Result<Duration, ConfigError> {
            match v {
                None => Ok(default),
                Some(s) => match duration::parse(&s) {
                    Some(d) if !d.is_zero() => Ok(d),
                    Some(_) => Err(invalid(key, "must be longer than 0s".into())),
                    None => Err(invalid(key, format!("{s:?} is not a duration (like 30s, 5m, 1h)"))),
                },
            }
        };
        let d = defaults();
        let abs = |key: &'static str, v: Option<PathBuf>, default: PathBuf| -> Result<PathBuf, ConfigError> {
            let p = v.unwrap_or(default);
            if p.is_absolute() { Ok(p) } else { Err(invalid(key, format!("{} is not an absolute path", p.display()))) }
        };
        let positive = |key: &'static str, v: Option<u32>, default: u32| -> Result<u32, ConfigError> {
            match v.unwrap_or(default) {
                0 => Err(invalid(key, "must be at least 1".into())),
                n => Ok(n),
            }
        };

        let binary_cache = raw.binary_cache.unwrap_or(d.binary_cache);
        if !binary_cache.contains("://") {
            return Err(invalid(
                "binary_cache",
                format!("{binary_cache:?} is not a store URL (like file:///srv/cache)"),
            ));
        }
        let exec_path = raw.path.unwrap_or(d.path);
        if exec_path.is_empty() || exec_path.split(':').any(|p| !p.starts_with('/')) {
            return Err(invalid("path", format!("{exec_path:?} is not a list of absolute directories")));
        }

        let address = raw.nomad.address.unwrap_or(d.nomad.address).trim_end_matches('/').to_string();
        if address.starts_with("https://") {
            return Err(invalid("nomad.address", "https is not supported (gitfront speaks plain HTTP)".into()));
        }
        if !address.starts_with("http://") || address.len() <= "http://".len() {
            return Err(invalid("nomad.address", format!("{address:?} is not an http:// URL")));
        }
        let datacenters = raw.nomad.datacenters.unwrap_or(d.nomad.datacenters);
        if datacenters.is_empty() || datacenters.iter().any(|dc| dc.is_empty()) {
            return Err(invalid("nomad.datacenters", "must list at least one datacenter (\"*\" for all)".into()));
        }
        let namespace = raw.nomad.namespace.unwrap_or(d.nomad.namespace);
        check_template(&namespace, &["{user}", "{repo}"], &["{user}", "{repo}"])
            .map_err(|r| invalid("nomad.namespace", r))?;
        let nomad = NomadConfig {
            address,
            token_file: match raw.nomad.token_file {
                Some(p) => Some(abs("nomad.token_file", Some(p), PathBuf::new())?),
                None => None,
            },
            datacenters,
            namespace,
            request_timeout: dur("nomad.request_timeout", raw.nomad.request_timeout, d.nomad.request_timeout)?,
            deploy_timeout: dur("nomad.deploy_timeout", raw.nomad.deploy_timeout, d.nomad.deploy_timeout)?,
        };

        let argv = |key: &'static str,
                    v: Option<Vec<String>>,
                    default: Vec<String>,
                    allowed: &[&str],
                    required: &[&str]|
         -> Result<Vec<String>, ConfigError> {
            let argv = v.unwrap_or(default);
            if argv.is_empty() || argv[0].is_empty() {
                return Err(invalid(key, "must name a program".into()));
            }
            let mut joined = argv.join(" ");
            // `{flake}#{attr}` spells out what `{installable}` is.
            if joined.contains("{flake}") && joined.contains("{attr}") {
                joined.push_str(" {installable}");
            }
            check_template(&joined, allowed, required).map_err(|r| invalid(key, r))?;
            Ok(argv)
        };
        let allowed_input_schemes = raw.build.allowed_input_schemes.unwrap_or(d.build.allowed_input_schemes);
        if allowed_input_schemes.is_empty() {
            return Err(invalid(
                "build.allowed_input_schemes",
                "must list at least one scheme (like \"github\")".into(),
            ));
        }
        for s in &allowed_input_schemes {
            crate::flakelock::check_scheme(s).map_err(|r| invalid("build.allowed_input_schemes", r))?;
        }
        let confinement = match raw.build.confinement.as_deref() {
            None => d.build.confinement,
            Some("landlock") => ConfineMode::Landlock,
            Some("none") => ConfineMode::None,
            Some(other) => {
                return Err(invalid("build.confinement", format!("{other:?} is not \"landlock\" or \"none\"")));
            }
        };
        let repos_root = abs("repos_root", raw.repos_root, d.repos_root)?;
        let state_dir = abs("state_dir", raw.state_dir, d.state_dir)?;
        if confinement == ConfineMode::Landlock {
            let kept = [("repos_root", &repos_root), ("state_dir", &state_dir)]
                .into_iter()
                .chain(nomad.token_file.as_ref().map(|p| ("nomad.token_file", p)));
            for (key, path) in kept {
                if let Some(root) = crate::confine::readable_root(path) {
                    return Err(invalid(
                        key,
                        format!(
                            "{} is under {root}, which nix may read while it evaluates pushed flakes: keep it elsewhere \
                             (like /var/lib or /run/keys)",
                            path.display()
                        ),
                    ));
                }
            }
        }
        let build = BuildConfig {
            allowed_input_schemes,
            confinement,
            command: argv("build.command", raw.build.command, d.build.command, BUILD_PLACEHOLDERS, BUILD_REQUIRED)?,
            eval_command: argv(
                "build.eval_command",
                raw.build.eval_command,
                d.build.eval_command,
                EVAL_PLACEHOLDERS,
                EVAL_REQUIRED,
            )?,
            lock_command: argv(
                "build.lock_command",
                raw.build.lock_command,
                d.build.lock_command,
                LOCK_PLACEHOLDERS,
                LOCK_REQUIRED,
            )?,
            copy_command: argv(
                "build.copy_command",
                raw.build.copy_command,
                d.build.copy_command,
                COPY_PLACEHOLDERS,
                COPY_REQUIRED,
            )?,
            timeout: dur("build.timeout", raw.build.timeout, d.build.timeout)?,
            log_tail_lines: raw.build.log_tail_lines.unwrap_or(d.build.log_tail_lines),
        };

        let job = JobConfig {
            cpu_per_vcpu: positive("job.cpu_per_vcpu", raw.job.cpu_per_vcpu, d.job.cpu_per_vcpu)?,
            memory_overhead: raw.job.memory_overhead.unwrap_or(d.job.memory_overhead),
            kill_timeout: dur("job.kill_timeout", raw.job.kill_timeout, d.job.kill_timeout)?,
            stop_on_client_after: dur(
                "job.stop_on_client_after",
                raw.job.stop_on_client_after,
                d.job.stop_on_client_after,
            )?,
        };
        let limits = Limits {
            max_push_bytes: match raw.limits.max_push_bytes.unwrap_or(d.limits.max_push_bytes) {
                0 => return Err(invalid("limits.max_push_bytes", "must be at least 1".into())),
                n => n,
            },
            max_vcpu: positive("limits.max_vcpu", raw.limits.max_vcpu, d.limits.max_vcpu)?,
            max_mem: positive("limits.max_mem", raw.limits.max_mem, d.limits.max_mem)?,
        };

        Ok(Config {
            file: path.to_path_buf(),
            repos_root,
            state_dir,
            binary_cache,
            path: exec_path,
            nomad,
            build,
            job,
            limits,
        })
    }

    /// The bare repo of `user`'s `repo`.
    pub fn repo_dir(&self, user: &UserName, repo: &RepoName) -> PathBuf {
        self.repos_root.join(user.as_str()).join(repo.dir_name())
    }

    /// Scratch space for one push (hook dir, checkouts).
    pub fn tmp_dir(&self) -> PathBuf {
        self.state_dir.join("tmp")
    }

    /// GC roots (out links) of the runners deployed from `user`'s `repo`.
    pub fn roots_dir(&self, user: &UserName, repo: &RepoName) -> PathBuf {
        self.state_dir.join("roots").join(user.as_str()).join(repo.as_str())
    }

    /// The Nomad namespace of `user`'s `repo`.
    pub fn namespace(&self, user: &UserName, repo: &RepoName) -> Result<String, NamespaceError> {
        let ns = self.nomad.namespace.replace("{user}", user.as_str()).replace("{repo}", repo.as_str());
        // Nomad's own rule (nomad/structs: validNamespaceName).
        if ns.is_empty() || ns.len() > 128 || !ns.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            return Err(NamespaceError { namespace: ns });
        }
        Ok(ns)
    }

    /// The config as TOML, with every default filled in (`check-config`).
    pub fn to_toml(&self) -> String {
        let q = |s: &str| toml::Value::String(s.to_string()).to_string();
        let list = |v: &[String]| format!("[{}]", v.iter().map(|s| q(s)).collect::<Vec<_>>().join(", "));
        let mut out = String::new();
        out += &format!("repos_root = {}\n", q(&self.repos_root.to_string_lossy()));
        out += &format!("state_dir = {}\n", q(&self.state_dir.to_string_lossy()));
        out += &format!("binary_cache = {}\n", q(&self.binary_cache));
        out += &format!("path = {}\n", q(&self.path));
        out += "\n[nomad]\n";
        out += &format!("address = {}\n", q(&self.nomad.address));
        if let Some(t) = &self.nomad.token_file {
            out += &format!("token_file = {}\n", q(&t.to_string_lossy()));
        }
        out += &format!("datacenters = {}\n", list(&self.nomad.datacenters));
        out += &format!("namespace = {}\n", q(&self.nomad.namespace));
        out += &format!("request_timeout = {}\n", q(&duration::format(self.nomad.request_timeout)));
        out += &format!("deploy_timeout = {}\n", q(&duration::format(self.nomad.deploy_timeout)));
        out += "\n[build]\n";
        out += &format!("allowed_input_schemes = {}\n", list(&self.build.allowed_input_schemes));
        out += &format!("confinement = {}\n", q(self.build.confinement.as_str()));
        out += &format!("command = {}\n", list(&self.build.command));
        out += &format!("eval_command = {}\n", list(&self.build.eval_command));
        out += &format!("lock_command = {}\n", list(&self.build.lock_command));
        out += &format!("copy_command = {}\n", list(&self.build.copy_command));
        out += &format!("timeout = {}\n", q(&duration::format(self.build.timeout)));
        out += &format!("log_tail_lines = {}\n", self.build.log_tail_lines);
        out += "\n[job]\n";
        out += &format!("cpu_per_vcpu = {}\n", self.job.cpu_per_vcpu);
        out += &format!("memory_overhead = {}\n", self.job.memory_overhead);
        out += &format!("kill_timeout = {}\n", q(&duration::format(self.job.kill_timeout)));
        out += &format!("stop_on_client_after = {}\n", q(&duration::format(self.job.stop_on_client_after)));
        out += "\n[limits]\n";
        out += &format!("max_push_bytes = {}\n", self.limits.max_push_bytes);
        out += &format!("max_vcpu = {}\n", self.limits.max_vcpu);
        out += &format!("max_mem = {}\n", self.limits.max_mem);
        out
    }
}

#[derive(Debug, thiserror::Error)]
#[error(
    "namespace {namespace:?} (from `nomad.namespace`) is not a valid Nomad namespace: letters, digits and '-', at most 128"
)]
pub struct NamespaceError {
    pub namespace: String,
}

/// Checks that `template` uses only `allowed` placeholders and every one of
/// `required`.
fn check_template(template: &str, allowed: &[&str], required: &[&str]) -> Result<(), String> {
    // A placeholder is `{` lower-case letters or '_' `}`; other braces (a Nix
    // expression in an argument, say) are literal text.
    let mut rest = template;
    while let Some(start) = rest.find('{') {
        let word_len = rest[start + 1..].find(|c: char| !(c.is_ascii_lowercase() || c == '_')).unwrap_or(0);
        let end = start + 1 + word_len;
        if word_len > 0 && rest[end..].starts_with('}') {
            let ph = &rest[start..=end];
            if !allowed.contains(&ph) {
                return Err(format!("unknown placeholder {ph} (known: {})", allowed.join(" ")));
            }
            rest = &rest[end + 1..];
        } else {
            rest = &rest[start + 1..];
        }
    }
    if let Some(missing) = required.iter().find(|r| !template.contains(*r)) {
        if *missing == "{installable}" {
            return Err("must use {installable} (or {flake}#{attr})".into());
        }
        return Err(format!("must use {missing}"));
    }
    Ok(())
}

/// Replaces the placeholders of an argv template; each `(name, value)` is
/// `("{name}", value)`. Values are never split or interpreted: no shell.
pub fn expand(template: &[String], vars: &[(&str, &str)]) -> Vec<String> {
    template
        .iter()
        .map(|arg| {
            // One pass, left to right, so a value containing "{…}" is not
            // expanded again.
            let mut out = String::new();
            let mut rest = arg.as_str();
            'scan: while let Some(start) = rest.find('{') {
                for (name, value) in vars {
                    if rest[start..].starts_with(name) {
                        out += &rest[..start];
                        out += value;
                        rest = &rest[start + name.len()..];
                        continue 'scan;
                    }
                }
                out += &rest[..=start];
                rest = &rest[start + 1..];
            }
            out + rest
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, String> {
        Config::parse(Path::new("/etc/gitfront.toml"), text).map_err(|e| crate::error_chain(&e))
    }

    #[test]
    fn empty_file_is_all_defaults() {
        let c = parse("").unwrap();
        assert_eq!(c.repos_root, Path::new("/var/lib/gitfront/repos"));
        assert_eq!(c.nomad.address, "http://127.0.0.1:4646");
        assert_eq!(c.nomad.datacenters, vec!["*"]);
        assert_eq!(c.nomad.deploy_timeout, Duration::from_secs(300));
        assert_eq!(c.build.command[0], "nix");
        assert_eq!(c.build.timeout, Duration::from_secs(1800));
        assert_eq!(c.limits.max_push_bytes, 100 << 20);
        assert_eq!(c.job.kill_timeout, Duration::from_secs(30));
    }

    #[test]
    fn full_file_round_trips_through_to_toml() {
        let text = r#"
repos_root = "/srv/git"
state_dir = "/srv/gitfront"
binary_cache = "file:///srv/cache"
path = "/usr/bin:/bin"
[nomad]
address = "http://10.0.0.1:4646/"
token_file = "/run/secrets/nomad"
datacenters = ["dc1", "dc2"]
namespace = "t-{user}-{repo}"
request_timeout = "5s"
deploy_timeout = "2m"
[build]
allowed_input_schemes = ["github", "git+ssh"]
confinement = "none"
command = ["nix", "build", "-L", "--out-link", "{out_link}", "{installable}"]
eval_command = ["nix", "eval", "--json", "{flake}#{attr}", "--apply", "{apply}", "--impure"]
lock_command = ["nix", "flake", "metadata", "--json", "--store", "{store}", "{flake}", "--option", "allowed-uris", "{allowed_uris}"]
copy_command = ["nix", "copy", "--to", "{cache}", "{path}"]
timeout = "10m"
log_tail_lines = 5
[job]
cpu_per_vcpu = 500
memory_overhead = 32
kill_timeout = "20s"
stop_on_client_after = "45s"
[limits]
max_push_bytes = 1000
max_vcpu = 2
max_mem = 1024
"#;
        let c = parse(text).unwrap();
        assert_eq!(c.nomad.address, "http://10.0.0.1:4646", "trailing slash dropped");
        assert_eq!(c.nomad.token_file.as_deref(), Some(Path::new("/run/secrets/nomad")));
        assert_eq!(c.build.log_tail_lines, 5);
        assert_eq!(c.job.stop_on_client_after, Duration::from_secs(45));
        assert_eq!(c.limits.max_mem, 1024);
        let again = parse(&c.to_toml()).unwrap();
        assert_eq!(again.to_toml(), c.to_toml());
        assert_eq!(parse(&defaults().to_toml()).unwrap().to_toml(), defaults().to_toml());
    }

    /// Dotted keys of a JSON or TOML document's leaves (`nomad.address`, …).
    fn dotted(prefix: &str, v: &serde_json::Value, out: &mut std::collections::BTreeSet<String>) {
        match v.as_object() {
            Some(o) => {
                for (k, v) in o {
                    dotted(&if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") }, v, out);
                }
            }
            None => {
                out.insert(prefix.to_string());
            }
        }
    }

    /// `to_toml` is written by hand: it must print every key the file may
    /// have (the Raw structs, serialized with every field), and no other.
    #[test]
    fn to_toml_prints_every_key_the_file_accepts() {
        let mut accepted = std::collections::BTreeSet::new();
        dotted("", &serde_json::to_value(RawConfig::default()).unwrap(), &mut accepted);
        // token_file is the only key without a default: set it.
        let c = parse("[nomad]\ntoken_file = \"/run/keys/nomad\"").unwrap();
        let printed: toml::Value = toml::from_str(&c.to_toml()).unwrap();
        let mut keys = std::collections::BTreeSet::new();
        dotted("", &serde_json::to_value(printed).unwrap(), &mut keys);
        assert_eq!(keys, accepted);
        assert!(
            accepted.contains("build.allowed_input_schemes") && accepted.contains("limits.max_mem"),
            "{accepted:?}"
        );
    }

    #[test]
    fn default_templates_restrict_what_a_flake_can_read() {
        let d = defaults();
        for argv in [&d.build.command, &d.build.eval_command, &d.build.lock_command] {
            let joined = argv.join(" ");
            for flag in [
                "--no-use-registries",
                "--option accept-flake-config false",
                "--option restrict-eval true",
                "--option allowed-uris {allowed_uris}",
            ] {
                assert!(joined.contains(flag), "{joined:?} lacks {flag:?}");
            }
        }
        assert!(d.build.command.contains(&"--no-update-lock-file".to_string()));
        assert!(d.build.eval_command.contains(&"--no-update-lock-file".to_string()));
        assert!(d.build.lock_command.contains(&"--no-write-lock-file".to_string()));
        assert_eq!(d.build.allowed_input_schemes, crate::flakelock::DEFAULT_SCHEMES);
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            ("repos_root = \"repos\"", "`repos_root`: repos is not an absolute path"),
            ("binary_cache = \"/srv/cache\"", "`binary_cache`: \"/srv/cache\" is not a store URL"),
            ("path = \"bin:/usr/bin\"", "`path`:"),
            ("[nomad]\naddress = \"https://n:4646\"", "`nomad.address`: https is not supported"),
            ("[nomad]\naddress = \"127.0.0.1:4646\"", "`nomad.address`: \"127.0.0.1:4646\" is not an http:// URL"),
            ("[nomad]\ndatacenters = []", "`nomad.datacenters`: must list at least one"),
            ("[nomad]\nnamespace = \"{user}\"", "`nomad.namespace`: must use {repo}"),
            ("[nomad]\nnamespace = \"{user}-{repo}-{branch}\"", "`nomad.namespace`: unknown placeholder {branch}"),
            ("[nomad]\ndeploy_timeout = \"soon\"", "`nomad.deploy_timeout`: \"soon\" is not a duration"),
            ("[nomad]\nrequest_timeout = \"0s\"", "`nomad.request_timeout`: must be longer than 0s"),
            ("[build]\ncommand = [\"nix\", \"build\", \"{installable}\"]", "`build.command`: must use {out_link}"),
            ("[build]\ncommand = []", "`build.command`: must name a program"),
            (
                "[build]\neval_command = [\"nix\", \"eval\", \"{installable}\"]",
                "`build.eval_command`: must use {apply}",
            ),
            ("[build]\ncopy_command = [\"nix\", \"copy\", \"{path}\"]", "`build.copy_command`: must use {cache}"),
            ("[build]\ntimeout = \"30\"", "`build.timeout`: \"30\" is not a duration"),
            (
                "[build]\nallowed_input_schemes = [\"github\", \"path\"]",
                "`build.allowed_input_schemes`: path reads local files, which pushed flakes may never do",
            ),
            (
                "[build]\nallowed_input_schemes = [\"git+file\"]",
                "`build.allowed_input_schemes`: git+file reads local files",
            ),
            ("[build]\nallowed_input_schemes = [\"s3\"]", "`build.allowed_input_schemes`: unknown input scheme \"s3\""),
            ("[build]\nallowed_input_schemes = []", "`build.allowed_input_schemes`: must list at least one scheme"),
            ("[build]\nconfinement = \"chroot\"", "`build.confinement`: \"chroot\" is not \"landlock\" or \"none\""),
            (
                "[nomad]\ntoken_file = \"/etc/nomad/token\"",
                "`nomad.token_file`: /etc/nomad/token is under /etc, which nix may read while it evaluates pushed flakes",
            ),
            ("repos_root = \"/usr/local/git\"", "`repos_root`: /usr/local/git is under /usr, which nix may read"),
            (
                "[build]\nlock_command = [\"nix\", \"flake\", \"metadata\", \"{flake}\"]",
                "`build.lock_command`: must use {store}",
            ),
            (
                "[build]\nlock_command = [\"nix\", \"{store}\", \"{flake}\", \"{out_link}\"]",
                "`build.lock_command`: unknown placeholder {out_link}",
            ),
            ("[job]\ncpu_per_vcpu = 0", "`job.cpu_per_vcpu`: must be at least 1"),
            ("[limits]\nmax_vcpu = 0", "`limits.max_vcpu`: must be at least 1"),
            ("[limits]\nmax_push_bytes = 0", "`limits.max_push_bytes`: must be at least 1"),
        ];
        for (text, want) in cases {
            let e = parse(text).unwrap_err();
            assert!(e.starts_with("/etc/gitfront.toml: "), "{e}");
            assert!(e.contains(want), "{text:?}: {e:?} lacks {want:?}");
        }
        // Unknown keys and wrong types: toml's own message, which names the key.
        let e = parse("[nomad]\nadress = \"http://x\"").unwrap_err();
        assert!(e.contains("adress"), "{e}");
        let e = parse("[limits]\nmax_vcpu = \"two\"").unwrap_err();
        assert_eq!(
            e,
            "/etc/gitfront.toml: line 2: invalid type: string \"two\", expected u32 (at `max_vcpu = \"two\"`)"
        );
        let e = parse("repos = 1").unwrap_err();
        assert!(e.contains("repos"), "{e}");
    }

    #[test]
    fn secrets_may_sit_where_nix_reads_only_without_confinement() {
        let c = parse("[nomad]\ntoken_file = \"/etc/nomad/token\"\n[build]\nconfinement = \"none\"").unwrap();
        assert_eq!(c.build.confinement, ConfineMode::None);
        assert_eq!(parse("").unwrap().build.confinement, ConfineMode::Landlock);
    }

    #[test]
    fn literal_braces_are_not_placeholders() {
        let c = parse("[build]\neval_command = [\"nix\", \"eval\", \"{installable}\", \"--apply\", \"{apply}\", \"--arg\", \"x\", \"{ y = 1; }\"]")
            .unwrap();
        assert_eq!(c.build.eval_command.last().unwrap(), "{ y = 1; }");
    }

    #[test]
    fn namespaces() {
        let c = parse("").unwrap();
        let u = UserName::parse("alice").unwrap();
        assert_eq!(c.namespace(&u, &RepoName::parse("fleet").unwrap()).unwrap(), "alice-fleet");
        let long = RepoName::parse(&"r".repeat(100)).unwrap();
        let c = parse("[nomad]\nnamespace = \"{user}-{repo}-{repo}\"").unwrap();
        let e = c.namespace(&u, &long).unwrap_err();
        assert!(e.to_string().contains("is not a valid Nomad namespace"), "{e}");
    }

    #[test]
    fn expand_replaces_each_placeholder_once() {
        let t: Vec<String> =
            ["nix", "build", "{flake}#{attr}", "-o", "{out_link}", "{unknown}"].map(String::from).into();
        let got = expand(&t, &[("{flake}", "path:/x/{attr}"), ("{attr}", "a.b"), ("{out_link}", "/r")]);
        assert_eq!(got, ["nix", "build", "path:/x/{attr}#a.b", "-o", "/r", "{unknown}"]);
    }
}

//! The operator's plugin config (`plugin "nomad-driver-microvm" { config {} }`)
//! and the job's task config (`task { driver = "microvm" config {} }`): their
//! hclspec schemas and their decoding from go-cty msgpack.
//!
//! Nomad checks names and types against the schema before we see anything
//! (unknown keys and wrong types never reach us); what we check here is
//! meaning — absolute paths, durations, names — and each error names its key.

use std::path::{Path, PathBuf};
use std::time::Duration;

use microvm_proto::hclspec::Spec;

use crate::cty::{self, CtyError, Object};
use crate::hclspec::{attr, attr_or, object, quote, quote_list};

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ConfigError {
    #[error(transparent)]
    Decode(#[from] CtyError),
    #[error("`{key}`: {problem}")]
    Invalid { key: &'static str, problem: String },
}

fn invalid(key: &'static str, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { key, problem: problem.into() }
}

/// Plugin config defaults; the schema carries them too, so `nomad agent`
/// shows the effective values in `/v1/agent/self`.
pub mod defaults {
    pub const STATE_DIR: &str = "/var/lib/nomad-microvm";
    pub const VMM_USER: &str = "microvm";
    pub const VMM_GROUP: &str = "kvm";
    pub const VIRTIOFSD: &str = "virtiofsd";
    pub const NIX: &str = "nix";
    pub const STOP_TIMEOUT: &str = "30s";
    pub const GCROOTS_DIR: &str = "/nix/var/nix/gcroots/nomad-microvm";
    pub const RUNNER_ROOTS: &[&str] = &["/nix/store"];
    pub const FINGERPRINT_PERIOD: &str = "30s";
    pub const STOP_WITHOUT_AGENT_AFTER: &str = "0s";
}

/// Everything an operator sets once per node.
#[derive(Debug, Clone, PartialEq)]
pub struct PluginConfig {
    /// Per-VM working dirs and per-task supervisor state live here.
    pub state_dir: PathBuf,
    /// The VMM (`microvm-run`) runs as this user and group, like microvm.nix's `microvm:kvm`.
    pub vmm_user: String,
    pub vmm_group: String,
    /// Without this, a `vmm_user` of root is refused.
    pub allow_root_vmm: bool,
    /// Bridge the VM's taps join when the task config names none.
    pub default_bridge: Option<String>,
    /// Bridges a task may name; the default bridge is always allowed.
    pub allowed_bridges: Vec<String>,
    /// virtiofsd for runners that do not carry their own (legacy layout).
    pub virtiofsd: PathBuf,
    /// nix binary used to fetch a runner that is not in the local store.
    pub nix: PathBuf,
    /// Binary caches to fetch missing runners from, in order.
    pub substituters: Vec<String>,
    /// Keys fetched paths must be signed with; empty accepts unsigned paths
    /// (trust then comes from who can write the cache).
    pub trusted_public_keys: Vec<String>,
    /// How long a stop the driver starts itself (not Nomad) waits for the guest.
    pub default_stop_timeout: Duration,
    /// Indirect GC roots for booted runners; empty disables them.
    pub gcroots_dir: Option<PathBuf>,
    /// Runners must live under one of these.
    pub allowed_runner_roots: Vec<PathBuf>,
    /// Share sources may live under these (besides the VM's own working dir,
    /// and `/nix/store` read-only).
    pub allowed_share_roots: Vec<PathBuf>,
    /// How often the driver re-checks the host.
    pub fingerprint_period: Duration,
    /// A VM whose node has had no Nomad agent connected for this long is
    /// shut down by its supervisor (zero: never). Keep it at most the jobs'
    /// `disconnect.stop_on_client_after`, so a node whose agent died stops
    /// its VMs before the servers place replacements elsewhere.
    pub stop_without_agent_after: Duration,
    /// The private key `nomad alloc exec` and script checks log into guests
    /// with; none: ssh's own defaults (root's keys and config).
    pub exec_ssh_key_file: Option<PathBuf>,
}

impl Default for PluginConfig {
    fn default() -> Self {
        PluginConfig {
            state_dir: defaults::STATE_DIR.into(),
            vmm_user: defaults::VMM_USER.into(),
            vmm_group: defaults::VMM_GROUP.into(),
            allow_root_vmm: false,
            default_bridge: None,
            allowed_bridges: Vec::new(),
            virtiofsd: defaults::VIRTIOFSD.into(),
            nix: defaults::NIX.into(),
            substituters: Vec::new(),
            trusted_public_keys: Vec::new(),
            default_stop_timeout: Duration::from_secs(30),
            gcroots_dir: Some(defaults::GCROOTS_DIR.into()),
            allowed_runner_roots: defaults::RUNNER_ROOTS.iter().map(PathBuf::from).collect(),
            allowed_share_roots: Vec::new(),
            fingerprint_period: Duration::from_secs(30),
            stop_without_agent_after: Duration::ZERO,
            exec_ssh_key_file: None,
        }
    }
}

/// The keys of the plugin config, in the order the README documents them.
pub const PLUGIN_KEYS: &[&str] = &[
    "state_dir",
    "vmm_user",
    "vmm_group",
    "allow_root_vmm",
    "default_bridge",
    "allowed_bridges",
    "virtiofsd",
    "nix",
    "substituters",
    "trusted_public_keys",
    "default_stop_timeout",
    "gcroots_dir",
    "allowed_runner_roots",
    "allowed_share_roots",
    "fingerprint_period",
    "stop_without_agent_after",
    "exec_ssh_key_file",
];

pub fn plugin_schema() -> Spec {
    object([
        ("state_dir", attr_or("state_dir", "string", &quote(defaults::STATE_DIR))),
        ("vmm_user", attr_or("vmm_user", "string", &quote(defaults::VMM_USER))),
        ("vmm_group", attr_or("vmm_group", "string", &quote(defaults::VMM_GROUP))),
        ("allow_root_vmm", attr_or("allow_root_vmm", "bool", "false")),
        ("default_bridge", attr_or("default_bridge", "string", "\"\"")),
        ("allowed_bridges", attr_or("allowed_bridges", "list(string)", "[]")),
        ("virtiofsd", attr_or("virtiofsd", "string", &quote(defaults::VIRTIOFSD))),
        ("nix", attr_or("nix", "string", &quote(defaults::NIX))),
        ("substituters", attr_or("substituters", "list(string)", "[]")),
        ("trusted_public_keys", attr_or("trusted_public_keys", "list(string)", "[]")),
        ("default_stop_timeout", attr_or("default_stop_timeout", "string", &quote(defaults::STOP_TIMEOUT))),
        ("gcroots_dir", attr_or("gcroots_dir", "string", &quote(defaults::GCROOTS_DIR))),
        ("allowed_runner_roots", attr_or("allowed_runner_roots", "list(string)", &quote_list(defaults::RUNNER_ROOTS))),
        ("allowed_share_roots", attr_or("allowed_share_roots", "list(string)", "[]")),
        ("fingerprint_period", attr_or("fingerprint_period", "string", &quote(defaults::FINGERPRINT_PERIOD))),
        (
            "stop_without_agent_after",
            attr_or("stop_without_agent_after", "string", &quote(defaults::STOP_WITHOUT_AGENT_AFTER)),
        ),
        ("exec_ssh_key_file", attr_or("exec_ssh_key_file", "string", "\"\"")),
    ])
}

/// Decodes and checks the plugin config Nomad sends in SetConfig. Empty bytes
/// (no config block at all) give the defaults.
pub fn decode_plugin_config(bytes: &[u8]) -> Result<PluginConfig, ConfigError> {
    if bytes.is_empty() {
        return Ok(PluginConfig::default());
    }
    let value = cty::decode(bytes)?;
    plugin_config_from(&Object::root(&value)?)
}

/// Same as [`decode_plugin_config`] but from the JSON an operator (or the
/// NixOS module) writes inside `config {}`; used by `--check-config`.
pub fn plugin_config_from_json(json: &serde_json::Value) -> Result<PluginConfig, ConfigError> {
    let value = json_to_msgpack(json);
    let root = Object::root(&value)?;
    if let Some(unknown) = root.keys().find(|k| !PLUGIN_KEYS.contains(k)) {
        return Err(ConfigError::Decode(root.bad(unknown, "is not a plugin config key")));
    }
    plugin_config_from(&root)
}

fn json_to_msgpack(json: &serde_json::Value) -> rmpv::Value {
    use serde_json::Value as J;
    match json {
        J::Null => rmpv::Value::Nil,
        J::Bool(b) => rmpv::Value::Boolean(*b),
        J::Number(n) => match (n.as_u64(), n.as_i64(), n.as_f64()) {
            (Some(u), _, _) => rmpv::Value::from(u),
            (_, Some(i), _) => rmpv::Value::from(i),
            (_, _, Some(f)) => rmpv::Value::F64(f),
            _ => rmpv::Value::Nil,
        },
        J::String(s) => rmpv::Value::from(s.as_str()),
        J::Array(a) => rmpv::Value::Array(a.iter().map(json_to_msgpack).collect()),
        J::Object(o) => {
            rmpv::Value::Map(o.iter().map(|(k, v)| (rmpv::Value::from(k.as_str()), json_to_msgpack(v))).collect())
        }
    }
}

fn plugin_config_from(o: &Object<'_>) -> Result<PluginConfig, ConfigError> {
    let d = PluginConfig::default();
    let non_empty = |s: Option<String>| s.filter(|s| !s.is_empty());
    let config = PluginConfig {
        state_dir: absolute("state_dir", non_empty(o.string("state_dir")?).map(PathBuf::from))?.unwrap_or(d.state_dir),
        vmm_user: non_empty(o.string("vmm_user")?).unwrap_or(d.vmm_user),
        vmm_group: non_empty(o.string("vmm_group")?).unwrap_or(d.vmm_group),
        allow_root_vmm: o.bool("allow_root_vmm")?.unwrap_or(false),
        default_bridge: non_empty(o.string("default_bridge")?),
        allowed_bridges: o.string_list("allowed_bridges")?.unwrap_or_default(),
        virtiofsd: non_empty(o.string("virtiofsd")?).map(PathBuf::from).unwrap_or(d.virtiofsd),
        nix: non_empty(o.string("nix")?).map(PathBuf::from).unwrap_or(d.nix),
        substituters: o.string_list("substituters")?.unwrap_or_default(),
        trusted_public_keys: o.string_list("trusted_public_keys")?.unwrap_or_default(),
        default_stop_timeout: duration("default_stop_timeout", o.string("default_stop_timeout")?)?
            .unwrap_or(d.default_stop_timeout),
        gcroots_dir: match o.string("gcroots_dir")? {
            None => d.gcroots_dir,
            Some(s) if s.is_empty() => None,
            Some(s) => absolute("gcroots_dir", Some(PathBuf::from(s)))?,
        },
        allowed_runner_roots: match o.string_list("allowed_runner_roots")? {
            None => d.allowed_runner_roots,
            Some(roots) => absolute_all("allowed_runner_roots", roots)?,
        },
        allowed_share_roots: absolute_all(
            "allowed_share_roots",
            o.string_list("allowed_share_roots")?.unwrap_or_default(),
        )?,
        fingerprint_period: duration("fingerprint_period", o.string("fingerprint_period")?)?
            .unwrap_or(d.fingerprint_period),
        stop_without_agent_after: duration("stop_without_agent_after", o.string("stop_without_agent_after")?)?
            .unwrap_or(d.stop_without_agent_after),
        exec_ssh_key_file: absolute("exec_ssh_key_file", non_empty(o.string("exec_ssh_key_file")?).map(PathBuf::from))?,
    };
    config.validate()?;
    Ok(config)
}

impl PluginConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if (self.vmm_user == "root" || self.vmm_user == "0") && !self.allow_root_vmm {
            return Err(invalid("vmm_user", "running VMMs as root is refused unless allow_root_vmm = true"));
        }
        for bridge in self.default_bridge.iter().chain(&self.allowed_bridges) {
            let key = if Some(bridge) == self.default_bridge.as_ref() { "default_bridge" } else { "allowed_bridges" };
            check_ifname(key, bridge)?;
        }
        if self.fingerprint_period < Duration::from_secs(1) {
            return Err(invalid("fingerprint_period", "must be at least 1s"));
        }
        if let Some(bad) = self.substituters.iter().find(|s| !s.contains("://")) {
            return Err(invalid(
                "substituters",
                format!("{bad:?} is not a store URL (like file:///srv/cache or https://cache.example)"),
            ));
        }
        Ok(())
    }

    /// Whether a task may attach its taps to `bridge`.
    pub fn bridge_allowed(&self, bridge: &str) -> bool {
        self.default_bridge.as_deref() == Some(bridge) || self.allowed_bridges.iter().any(|b| b == bridge)
    }
}

/// Interface names: 1–15 bytes, no '/', whitespace or NUL (the kernel's rules).
fn check_ifname(key: &'static str, name: &str) -> Result<(), ConfigError> {
    let ok = !name.is_empty()
        && name.len() <= 15
        && name != "."
        && name != ".."
        && !name.bytes().any(|b| b == b'/' || b == 0 || b.is_ascii_whitespace());
    if ok {
        Ok(())
    } else {
        Err(invalid(key, format!("{name:?} is not a valid interface name (1-15 bytes, no '/' or spaces)")))
    }
}

fn absolute(key: &'static str, path: Option<PathBuf>) -> Result<Option<PathBuf>, ConfigError> {
    match path {
        Some(p) if !p.is_absolute() => Err(invalid(key, format!("{} is not an absolute path", p.display()))),
        other => Ok(other),
    }
}

fn absolute_all(key: &'static str, paths: Vec<String>) -> Result<Vec<PathBuf>, ConfigError> {
    paths.into_iter().map(|p| absolute(key, Some(PathBuf::from(p))).map(|p| p.unwrap_or_default())).collect()
}

fn duration(key: &'static str, text: Option<String>) -> Result<Option<Duration>, ConfigError> {
    match text.filter(|t| !t.is_empty()) {
        None => Ok(None),
        Some(t) => parse_duration(&t).map(Some).ok_or_else(|| {
            invalid(key, format!("{t:?} is not a duration (use Go's form, like \"30s\", \"2m\" or \"1m30s\")"))
        }),
    }
}

/// Go's `time.ParseDuration` subset that matters here: a sequence of
/// `<number><unit>` with units ns, us, ms, s, m, h; numbers may have a fraction.
pub fn parse_duration(text: &str) -> Option<Duration> {
    if text == "0" {
        return Some(Duration::ZERO);
    }
    let mut rest = text;
    let mut total = 0f64;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let num_len = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(rest.len());
        if num_len == 0 {
            return None;
        }
        let number: f64 = rest[..num_len].parse().ok()?;
        rest = &rest[num_len..];
        let unit_len = rest.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        total += number * scale;
        rest = &rest[unit_len..];
    }
    Duration::try_from_secs_f64(total).ok()
}

/// The job's task config.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TaskConfig {
    /// Store path of a microvm.nix runner (`…/bin/microvm-run` inside).
    pub runner: PathBuf,
    /// Bridge for the VM's taps, overriding the plugin's `default_bridge`.
    pub bridge: Option<String>,
}

pub const TASK_KEYS: &[&str] = &["runner", "bridge"];

pub fn task_schema() -> Spec {
    object([("runner", attr("runner", "string", true)), ("bridge", attr("bridge", "string", false))])
}

pub fn decode_task_config(bytes: &[u8]) -> Result<TaskConfig, ConfigError> {
    let value = cty::decode(bytes)?;
    let o = Object::root(&value)?;
    let runner = o
        .string("runner")?
        .filter(|r| !r.is_empty())
        .ok_or_else(|| invalid("runner", "is required: the store path of a microvm.nix runner"))?;
    let runner = PathBuf::from(runner);
    if !runner.is_absolute() {
        return Err(invalid("runner", format!("{} is not an absolute store path", runner.display())));
    }
    let bridge = o.string("bridge")?.filter(|b| !b.is_empty());
    if let Some(b) = &bridge {
        check_ifname("bridge", b)?;
    }
    Ok(TaskConfig { runner, bridge })
}

/// Whether `path` lies under one of `roots` (lexically, after normalising
/// `.`/`..`; callers canonicalise first when symlinks matter).
pub fn under_any(path: &Path, roots: &[PathBuf]) -> bool {
    roots.iter().any(|root| path.starts_with(root))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rmpv::Value;

    fn enc(pairs: &[(&str, Value)]) -> Vec<u8> {
        // go-cty sends every key, sorted; unset ones as nil.
        let mut all: Vec<(Value, Value)> = PLUGIN_KEYS
            .iter()
            .map(|k| {
                let v = pairs.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone()).unwrap_or(Value::Nil);
                (Value::from(*k), v)
            })
            .collect();
        all.sort_by(|a, b| a.0.as_str().cmp(&b.0.as_str()));
        let mut buf = Vec::new();
        rmpv::encode::write_value(&mut buf, &Value::Map(all)).unwrap();
        buf
    }

    #[test]
    fn all_nil_gives_defaults() {
        assert_eq!(decode_plugin_config(&enc(&[])).unwrap(), PluginConfig::default());
        assert_eq!(decode_plugin_config(&[]).unwrap(), PluginConfig::default());
    }

    #[test]
    fn values_are_taken() {
        let c = decode_plugin_config(&enc(&[
            ("state_dir", Value::from("/srv/vms")),
            ("default_bridge", Value::from("br0")),
            ("allowed_bridges", Value::Array(vec![Value::from("br1")])),
            ("default_stop_timeout", Value::from("1m30s")),
            ("substituters", Value::Array(vec![Value::from("file:///srv/cache")])),
            ("gcroots_dir", Value::from("")),
            ("exec_ssh_key_file", Value::from("/etc/nomad-microvm/exec_key")),
        ]))
        .unwrap();
        assert_eq!(c.exec_ssh_key_file, Some(PathBuf::from("/etc/nomad-microvm/exec_key")));
        assert_eq!(c.state_dir, PathBuf::from("/srv/vms"));
        assert_eq!(c.default_bridge.as_deref(), Some("br0"));
        assert!(c.bridge_allowed("br0") && c.bridge_allowed("br1") && !c.bridge_allowed("br2"));
        assert_eq!(c.default_stop_timeout, Duration::from_secs(90));
        assert_eq!(c.gcroots_dir, None);
    }

    #[test]
    fn errors_name_the_key() {
        let cases: Vec<(&str, Value, &str)> = vec![
            ("state_dir", Value::from("relative/dir"), "`state_dir`: relative/dir is not an absolute path"),
            ("state_dir", Value::from(3), "`state_dir`: expected a string, found a number"),
            ("default_stop_timeout", Value::from("soon"), "`default_stop_timeout`: \"soon\" is not a duration"),
            ("vmm_user", Value::from("root"), "`vmm_user`: running VMMs as root is refused"),
            ("default_bridge", Value::from("a bridge"), "`default_bridge`: \"a bridge\" is not a valid interface name"),
            (
                "allowed_runner_roots",
                Value::Array(vec![Value::from("nix")]),
                "`allowed_runner_roots`: nix is not an absolute path",
            ),
            (
                "substituters",
                Value::Array(vec![Value::from("/srv/cache")]),
                "`substituters`: \"/srv/cache\" is not a store URL",
            ),
            ("allow_root_vmm", Value::from("yes"), "`allow_root_vmm`: expected a bool, found a string"),
            ("exec_ssh_key_file", Value::from("id_ed25519"), "`exec_ssh_key_file`: id_ed25519 is not an absolute path"),
        ];
        for (key, value, want) in cases {
            let err = decode_plugin_config(&enc(&[(key, value)])).unwrap_err().to_string();
            assert!(err.starts_with(want), "{key}: got {err:?}, want prefix {want:?}");
        }
    }

    #[test]
    fn root_vmm_needs_the_opt_in() {
        let c =
            decode_plugin_config(&enc(&[("vmm_user", Value::from("root")), ("allow_root_vmm", Value::Boolean(true))]))
                .unwrap();
        assert_eq!(c.vmm_user, "root");
    }

    #[test]
    fn durations_follow_go() {
        assert_eq!(parse_duration("30s"), Some(Duration::from_secs(30)));
        assert_eq!(parse_duration("1m30s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_duration("1.5h"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("0"), Some(Duration::ZERO));
        for bad in ["", "30", "s", "3 s", "1d", "-1s"] {
            assert_eq!(parse_duration(bad), None, "{bad}");
        }
    }

    #[test]
    fn schema_covers_every_key_with_defaults() {
        use microvm_proto::hclspec::spec::Block;
        let Some(Block::Object(o)) = plugin_schema().block else { panic!() };
        let mut keys: Vec<&str> = o.attributes.keys().map(String::as_str).collect();
        keys.sort();
        let mut want = PLUGIN_KEYS.to_vec();
        want.sort();
        assert_eq!(keys, want);
        for (k, spec) in &o.attributes {
            assert!(matches!(spec.block, Some(Block::Default(_))), "{k} has no default");
        }
    }

    #[test]
    fn json_config_is_checked_like_msgpack() {
        let c =
            plugin_config_from_json(&serde_json::json!({"state_dir": "/srv/vms", "allowed_bridges": ["br0"]})).unwrap();
        assert_eq!(c.state_dir, PathBuf::from("/srv/vms"));
        let err = plugin_config_from_json(&serde_json::json!({"state_dri": "/srv"})).unwrap_err();
        assert_eq!(err.to_string(), "`state_dri`: is not a plugin config key");
    }

    fn task(pairs: &[(&str, Value)]) -> Vec<u8> {
        let map: Vec<(Value, Value)> = TASK_KEYS
            .iter()
            .map(|k| {
                (Value::from(*k), pairs.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone()).unwrap_or(Value::Nil))
            })
            .collect();
        let mut buf = Vec::new();
        rmpv::encode::write_value(&mut buf, &Value::Map(map)).unwrap();
        buf
    }

    #[test]
    fn task_config_decodes_and_checks() {
        let t = decode_task_config(&task(&[("runner", Value::from("/nix/store/abc-microvm-qemu-web"))])).unwrap();
        assert_eq!(t.runner, PathBuf::from("/nix/store/abc-microvm-qemu-web"));
        assert_eq!(t.bridge, None);
        let t = decode_task_config(&task(&[("runner", Value::from("/r")), ("bridge", Value::from("br7"))])).unwrap();
        assert_eq!(t.bridge.as_deref(), Some("br7"));
        assert_eq!(
            decode_task_config(&task(&[])).unwrap_err().to_string(),
            "`runner`: is required: the store path of a microvm.nix runner"
        );
        assert_eq!(
            decode_task_config(&task(&[("runner", Value::from("result"))])).unwrap_err().to_string(),
            "`runner`: result is not an absolute store path"
        );
        assert_eq!(
            decode_task_config(&task(&[("runner", Value::from(5))])).unwrap_err().to_string(),
            "`runner`: expected a string, found a number"
        );
    }

    #[test]
    fn under_any_is_component_wise() {
        let roots = vec![PathBuf::from("/nix/store")];
        assert!(under_any(Path::new("/nix/store/abc"), &roots));
        assert!(!under_any(Path::new("/nix/storefoo/abc"), &roots));
        assert!(!under_any(Path::new("/etc"), &roots));
    }
}

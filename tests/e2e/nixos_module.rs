//! The NixOS module (nixos-module.nix) and the flake, checked without
//! nixpkgs: every `.nix` file parses and is formatted; the plugin config and
//! gitfront.toml the module renders (driver/plugin-config.nix and
//! gitfront/config.nix, builtins only) are exactly what the binaries'
//! own parsers accept, key for key and default for default; the whole module,
//! evaluated with a stand-in for nixpkgs' lib, writes Nomad settings a real
//! agent runs with; no option takes a secret inline.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::Duration;

use microvm_e2e::configs::{dotted_keys, driver_config_keys, gitfront_check_config};
use microvm_e2e::{Group, Netns, driver_bin, nomad_bin, open_tempdir, repo_root, require_root, wait_until};

// ---------------------------------------------------------------------------
// Nix, without nixpkgs

fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e} (scripts/install-deps.sh installs it)"))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `nix-instantiate --eval --strict --json` of `expr` in the repo root, where
/// `p` is driver/plugin-config.nix.
fn nix_eval_raw(expr: &str) -> Output {
    let expr = format!("let p = import ./driver/plugin-config.nix; in {expr}");
    run(Command::new("nix-instantiate").current_dir(repo_root()).args(["--eval", "--strict", "--json", "-E", &expr]))
}

fn nix_eval(expr: &str) -> serde_json::Value {
    let out = nix_eval_raw(expr);
    assert!(out.status.success(), "nix-instantiate failed on {expr}:\n{}", text(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{expr}: not JSON ({e}): {}", text(&out.stdout)))
}

/// The error of an evaluation that must fail.
fn nix_eval_err(expr: &str) -> String {
    let out = nix_eval_raw(expr);
    assert!(!out.status.success(), "{expr} evaluated but should have failed: {}", text(&out.stdout));
    text(&out.stderr)
}

/// Every `.nix` file of the repo (tracked, or new and not ignored).
fn nix_files() -> Vec<PathBuf> {
    let out = run(Command::new("git").current_dir(repo_root()).args([
        "ls-files",
        "--cached",
        "--others",
        "--exclude-standard",
        "*.nix",
    ]));
    assert!(out.status.success(), "git ls-files: {}", text(&out.stderr));
    let files: Vec<PathBuf> = text(&out.stdout)
        .lines()
        .map(|l| repo_root().join(l))
        .filter(|p| p.exists())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    for wanted in ["flake.nix", "nixos-module.nix", "driver/plugin-config.nix"] {
        assert!(files.contains(&repo_root().join(wanted)), "{wanted} is missing from {files:?}");
    }
    files
}

/// scripts/install-deps.sh installs nixpkgs-fmt (crates.io) here.
fn nixpkgs_fmt() -> PathBuf {
    if let Some(p) = std::env::var_os("NIXPKGS_FMT") {
        return PathBuf::from(p);
    }
    let cached = std::env::var_os("HOME")
        .map(|h| PathBuf::from(h).join(".cache/nomad-microvm/nixpkgs-fmt/bin/nixpkgs-fmt"))
        .filter(|p| p.exists());
    cached.unwrap_or_else(|| PathBuf::from("nixpkgs-fmt"))
}

#[test]
fn every_nix_file_parses_and_is_formatted() {
    let files = nix_files();
    for file in &files {
        let out = run(Command::new("nix-instantiate").arg("--parse").arg(file).stdout(Stdio::null()));
        assert!(out.status.success(), "{} does not parse:\n{}", file.display(), text(&out.stderr));
    }
    let out = run(Command::new(nixpkgs_fmt()).arg("--check").args(&files));
    assert!(
        out.status.success(),
        "not formatted (run `nixpkgs-fmt {}`):\n{}{}",
        files
            .iter()
            .map(|f| f.strip_prefix(repo_root()).unwrap_or(f).display().to_string())
            .collect::<Vec<_>>()
            .join(" "),
        text(&out.stdout),
        text(&out.stderr)
    );
}

// ---------------------------------------------------------------------------
// The driver's plugin config

/// Every driver option set, each to something other than its default.
const SAMPLE: &str = r#"{
  stateDir = "/srv/vms";
  vmmUser = "vmm";
  vmmGroup = "vmmgroup";
  allowRootVmm = true;
  defaultBridge = "br-vms";
  allowedBridges = [ "br-lab" "br-dmz" ];
  virtiofsd = "/opt/virtiofsd/bin/virtiofsd";
  nix = "/opt/nix/bin/nix";
  substituters = [ "file:///srv/cache" "https://cache.example.org" ];
  trustedPublicKeys = [ "cache.example.org-1:c2FtcGxlIGtleQ==" ];
  defaultStopTimeout = "1m30s";
  gcrootsDir = null;
  allowedRunnerRoots = [ "/nix/store" "/srv/runners" ];
  allowedShareRoots = [ "/srv/shares" ];
  fingerprintPeriod = "45s";
  stopWithoutAgentAfter = "50s";
  execSshKeyFile = "/run/keys/microvm-exec";
}"#;

/// `nomad-driver-microvm check-config` on `json`: Ok(its dump) or Err(its error).
fn check_config(json: &serde_json::Value) -> Result<String, String> {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("config.json");
    std::fs::write(&file, serde_json::to_vec_pretty(json).unwrap()).expect("write config");
    let out = run(Command::new(driver_bin()).arg("check-config").arg(&file));
    if out.status.success() { Ok(text(&out.stdout)) } else { Err(text(&out.stderr)) }
}

#[test]
fn module_renders_exactly_the_driver_config_keys() {
    let driver = driver_config_keys();
    let nix: BTreeSet<String> = serde_json::from_value(nix_eval("p.keys")).unwrap();
    let missing: Vec<_> = driver.difference(&nix).collect();
    let unknown: Vec<_> = nix.difference(&driver).collect();
    assert!(missing.is_empty(), "driver keys with no option in driver/plugin-config.nix: {missing:?}");
    assert!(unknown.is_empty(), "driver/plugin-config.nix renders keys the driver does not know: {unknown:?}");
    // What render writes is exactly that set, for any values.
    let rendered: serde_json::Map<String, serde_json::Value> =
        serde_json::from_value(nix_eval(&format!("p.render {SAMPLE}"))).unwrap();
    assert_eq!(rendered.keys().cloned().collect::<BTreeSet<_>>(), driver);
}

#[test]
fn every_option_set_is_accepted_and_taken_by_the_driver() {
    // The sample really sets everything away from the defaults.
    let same: Vec<String> = serde_json::from_value(nix_eval(&format!(
        "builtins.filter (n: ({SAMPLE}).${{n}} == p.defaults.${{n}}) p.names"
    )))
    .unwrap();
    assert!(same.is_empty(), "SAMPLE leaves these at their defaults: {same:?}");

    let rendered = nix_eval(&format!("p.render {SAMPLE}"));
    let dump = check_config(&rendered).unwrap_or_else(|e| panic!("the driver refuses what the module renders: {e}"));
    // `{:#?}` of the parsed config, without the layout.
    let compact =
        |s: &str| s.split_whitespace().collect::<String>().replace(",)", ")").replace(",]", "]").replace(",}", "}");
    let dumped = compact(&dump);
    for want in [
        r#"state_dir: "/srv/vms""#,
        r#"vmm_user: "vmm""#,
        r#"vmm_group: "vmmgroup""#,
        "allow_root_vmm: true",
        r#"default_bridge: Some("br-vms")"#,
        r#""br-lab""#,
        r#""br-dmz""#,
        r#"virtiofsd: "/opt/virtiofsd/bin/virtiofsd""#,
        r#"nix: "/opt/nix/bin/nix""#,
        r#""file:///srv/cache""#,
        r#""https://cache.example.org""#,
        r#""cache.example.org-1:c2FtcGxlIGtleQ==""#,
        "default_stop_timeout: 90s",
        "gcroots_dir: None",
        r#""/srv/runners""#,
        r#""/srv/shares""#,
        "fingerprint_period: 45s",
        "stop_without_agent_after: 50s",
        r#"exec_ssh_key_file: Some("/run/keys/microvm-exec")"#,
    ] {
        assert!(dumped.contains(&compact(want)), "check-config did not take {want}:\n{dump}");
    }
}

#[test]
fn module_defaults_are_the_driver_defaults() {
    let rendered_defaults = nix_eval("p.render p.defaults");
    let from_nix = check_config(&rendered_defaults).expect("defaults accepted");
    let driver = check_config(&serde_json::json!({})).expect("empty config accepted");
    assert_eq!(from_nix, driver, "driver/plugin-config.nix's defaults differ from driver/src/config.rs's");

    // What a NixOS host gets when it sets no driver option: the driver's
    // defaults, but for the keys where the module deliberately knows better,
    // each listed here with its value and reason. Any other difference, or a
    // listed key that no longer differs, fails.
    let deliberate = [
        (
            "virtiofsd",
            "/nix/store/00000000000000000000000000000000-virtiofsd/bin/virtiofsd",
            "a store path, not a PATH lookup",
        ),
        ("nix", "/nix/store/00000000000000000000000000000000-nix/bin/nix", "config.nix.package"),
        (
            "stop_without_agent_after",
            "45s",
            "0s (never) lets a dead agent's VMs run beside their replacements: shorter than gitfront's \
             stop_on_client_after (1m), longer than an agent restart",
        ),
    ];
    let table: serde_json::Map<String, serde_json::Value> = serde_json::from_value(rendered_defaults).unwrap();
    let host =
        module_eval("{ enable = true; }")["services"]["nomad"]["settings"]["plugin"]["nomad-driver-microvm"]["config"]
            .clone();
    let host: serde_json::Map<String, serde_json::Value> = serde_json::from_value(host).unwrap();
    assert_eq!(host.keys().collect::<BTreeSet<_>>(), table.keys().collect::<BTreeSet<_>>());
    for (key, default) in &table {
        match deliberate.iter().find(|(k, _, _)| k == key) {
            Some((_, value, why)) => {
                assert_eq!(host[key], *value, "the module's default for {key} ({why})");
                assert_ne!(
                    host[key], *default,
                    "{key} is listed as a deliberate difference but is the driver's default"
                );
            }
            None => assert_eq!(host[key], *default, "the module's default for {key} differs from the driver's"),
        }
    }
    check_config(&serde_json::Value::Object(host)).expect("the driver takes the module's defaults");
}

#[test]
fn option_types_refuse_what_the_driver_refuses() {
    let cases = [
        ("stateDir", r#""relative/dir""#),
        ("gcrootsDir", r#""var/gcroots""#),
        ("defaultStopTimeout", r#""soon""#),
        ("defaultStopTimeout", r#""30""#),
        ("fingerprintPeriod", r#""5 s""#),
        ("stopWithoutAgentAfter", r#""a minute""#),
        ("defaultBridge", r#""a bridge""#),
        ("defaultBridge", r#""0123456789abcdef""#),
        ("defaultBridge", r#"".""#),
        ("allowedBridges", r#"[ "br/0" ]"#),
        ("allowedRunnerRoots", r#"[ "nix" ]"#),
        ("allowedShareRoots", r#"[ "srv" ]"#),
        ("substituters", r#"[ "/srv/cache" ]"#),
    ];
    for (name, value) in cases {
        let v =
            nix_eval(&format!("{{ key = p.options.{name}.key; value = {value}; ok = p.valid \"{name}\" ({value}); }}"));
        assert_eq!(v["ok"], false, "the module's type for {name} accepts {value}");
        let key = v["key"].as_str().unwrap();
        let err = check_config(&serde_json::json!({ key: v["value"] }))
            .expect_err(&format!("the driver accepts {key} = {value}, the module refuses it"));
        assert!(err.contains(&format!("`{key}`")), "{key} = {value}: {err}");
        // And render refuses it rather than writing it.
        let err = nix_eval_err(&format!("p.render (p.defaults // {{ {name} = {value}; }})"));
        assert!(err.contains(&format!("invalid values for: {name}")), "{err}");
    }
    // Good values of the same shapes pass both.
    for (name, value) in [("defaultStopTimeout", r#""1.5h""#), ("defaultBridge", r#"".br""#), ("gcrootsDir", "null")] {
        assert_eq!(nix_eval(&format!("p.valid \"{name}\" ({value})")), true, "{name} = {value}");
    }
}

#[test]
fn render_refuses_missing_and_unknown_options() {
    let err = nix_eval_err("p.render (removeAttrs p.defaults [ \"stateDir\" ])");
    assert!(err.contains("missing driver options: stateDir"), "{err}");
    let err = nix_eval_err("p.render (p.defaults // { stateDri = \"/srv\"; })");
    assert!(err.contains("not driver options: stateDri"), "{err}");
    // A submodule's `_module` is not an option.
    nix_eval("p.render (p.defaults // { _module = { }; })");
}

// ---------------------------------------------------------------------------
// The whole module, evaluated with a stand-in for nixpkgs' lib (nixpkgs is
// not reachable here; the flake's VM check evaluates it for real)

/// `{ module, settings, host }: <the module's config, resolved>`: option
/// values are the given settings or the defaults, checked against their
/// types; mkIf/mkMerge/mkDefault/mkOverride are resolved and definitions
/// merged. Packages are fake store paths. What the module reads from outside
/// its own options is what nixpkgs' modules would give it, with `host` (the
/// rest of a machine's config, as plain values) on top.
const STAND_IN: &str = r#"# A stand-in for nixpkgs' lib and module system, just enough to evaluate
# nixos-module.nix: option values are a user's definitions or the defaults
# (type-checked), mkIf/mkMerge/mkDefault/mkOverride are resolved,
# definitions merged.
{ module, settings, host ? { } }:
let
  inherit (builtins) isAttrs isList isString isInt isBool attrNames mapAttrs filter foldl' concatMap elem all any match;
  types = rec {
    mk = name: check: { _type = "type"; inherit name check; };
    bool = mk "bool" isBool;
    str = mk "str" isString;
    package = mk "package" (x: isAttrs x && x ? outPath);
    strMatching = p: mk "strMatching" (x: isString x && match p x != null);
    listOf = t: mk "listOf" (x: isList x && all t.check x);
    nonEmptyListOf = t: mk "nonEmptyListOf" (x: isList x && x != [ ] && all t.check x);
    nullOr = t: mk "nullOr" (x: x == null || t.check x);
    enum = vs: mk "enum" (x: elem x vs);
    addCheck = t: c: mk "addCheck" (x: t.check x && c x);
    ints = {
      positive = mk "positive" (x: isInt x && x > 0);
      between = lo: hi: mk "between" (x: isInt x && x >= lo && x <= hi);
    };
    submodule = m: (mk "submodule" isAttrs) // { options = m.options; };
    attrsOf = t: (mk "attrsOf" (x: isAttrs x && all t.check (builtins.attrValues x))) // { elem = t; };
  };
  lib = {
    inherit types;
    mkOption = o: o // { _type = "option"; };
    mkEnableOption = d: { _type = "option"; type = types.bool; default = false; description = d; };
    mkIf = cond: content: { _type = "if"; inherit cond content; };
    mkMerge = contents: { _type = "merge"; inherit contents; };
    mkDefault = content: { _type = "override"; inherit content; };
    mkOverride = priority: content: { _type = "override"; inherit priority content; };
    literalExpression = text: { _type = "literalExpression"; inherit text; };
    optional = c: x: if c then [ x ] else [ ];
    optionals = c: xs: if c then xs else [ ];
    optionalAttrs = c: a: if c then a else { };
    hasPrefix = p: s: builtins.substring 0 (builtins.stringLength p) s == p;
    hasInfix = i: s: builtins.length (builtins.split (builtins.concatStringsSep "" (map (c: "[${c}]") (builtins.genList (n: builtins.substring n 1 i) (builtins.stringLength i)))) s) > 1;
    concatStringsSep = builtins.concatStringsSep;
    concatLists = builtins.concatLists;
    mapAttrs = builtins.mapAttrs;
    mapAttrsToList = f: a: map (n: f n a.${n}) (attrNames a);
    max = a: b: if a > b then a else b;
    makeBinPath = ps: builtins.concatStringsSep ":" (map (p: "${p}/bin") ps);
    getExe' = p: n: "${p}/bin/${n}";
  };
  pkg = name: { outPath = "/nix/store/00000000000000000000000000000000-${name}"; inherit name; };
  pkgs = {
    virtiofsd = pkg "virtiofsd";
    git = pkg "git";
    gnutar = pkg "gnutar";
    gzip = pkg "gzip";
    coreutils = pkg "coreutils";
    bashInteractive = pkg "bash";
    openssh = pkg "openssh";
    nomad-driver-microvm = pkg "nomad-driver-microvm";
    gitfront = pkg "gitfront";
    formats.toml = { }: { generate = name: value: { toml = value; }; };
  };

  isOption = o: isAttrs o && (o._type or null) == "option";
  # Values of an option tree: given (type-checked) or default.
  values = path: opts: given:
    let
      unknown = filter (n: !(opts ? ${n})) (attrNames given);
    in
    if unknown != [ ] then throw "not options: ${builtins.concatStringsSep "." path}.${toString unknown}"
    else
      mapAttrs
        (n: o:
          let where = builtins.concatStringsSep "." (path ++ [ n ]); in
          if isOption o then
            let
              v0 = if given ? ${n} then given.${n} else if o ? default then o.default else throw "${where}: no value and no default";
              v = if (o.type.name or "") == "attrsOf" && o.type.elem ? options then mapAttrs (_: e: values (path ++ [ n "<name>" ]) o.type.elem.options e) v0 else v0;
            in
            if o.type.check v then v else throw "${where}: the value does not match its type (${o.type.name})"
          else values (path ++ [ n ]) o (given.${n} or { }))
        opts;

  # Definitions as plain data.
  resolve = v:
    if isAttrs v && v ? _type then
      if v._type == "if" then (if v.cond then resolve v.content else null)
      else if v._type == "merge" then foldl' merge { } (filter (x: x != null) (map resolve v.contents))
      else if v._type == "override" then resolve v.content
      else v
    else if isAttrs v && !(v ? outPath) then
      let r = mapAttrs (_: resolve) v; in builtins.removeAttrs r (filter (n: r.${n} == null) (attrNames r))
    else v;
  merge = a: b: a // mapAttrs
    (n: bv:
      if !(a ? ${n}) then bv
      else if isAttrs a.${n} && isAttrs bv then merge a.${n} bv
      else if isList a.${n} && isList bv then a.${n} ++ bv
      else if a.${n} == bv then bv
      else throw "conflicting definitions of ${n}")
    b;

  args = { inherit lib pkgs config; };
  m = import module args;
  cfgValues = values [ "services" "nomad-microvm" ] m.options.services.nomad-microvm settings;
  # The defaults of the nixpkgs options the module reads.
  nixos = {
    nix.package = pkg "nix";
    nix.settings = { sandbox = true; trusted-users = [ "root" ]; };
    networking.useNetworkd = false;
    networking.interfaces = { };
    # nixpkgs' services.nomad (nixos/modules/services/networking/nomad.nix).
    systemd.services.nomad.serviceConfig = { KillMode = "process"; KillSignal = "SIGINT"; LimitNOFILE = 65536; };
  };
  update = a: b: a // mapAttrs (n: bv: if isAttrs bv && isAttrs (a.${n} or null) then update a.${n} bv else bv) b;
  config = update (update nixos host) { services.nomad-microvm = cfgValues; };
in
resolve m.config"#;

/// The module's resolved config for `settings` (services.nomad-microvm), on
/// a host whose other config is `host` (plain values over nixpkgs' defaults).
fn module_eval_host_raw(settings: &str, host: &str) -> Output {
    let file = repo_root().join("nixos-module.nix");
    let expr = format!("({STAND_IN}) {{ module = {}; settings = {settings}; host = {host}; }}", file.display());
    run(Command::new("nix-instantiate").current_dir(repo_root()).args(["--eval", "--strict", "--json", "-E", &expr]))
}

fn module_eval_raw(settings: &str) -> Output {
    module_eval_host_raw(settings, "{ }")
}

fn module_eval_host(settings: &str, host: &str) -> serde_json::Value {
    let out = module_eval_host_raw(settings, host);
    assert!(
        out.status.success(),
        "nixos-module.nix does not evaluate with {settings} on {host}:\n{}",
        text(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON")
}

fn module_eval(settings: &str) -> serde_json::Value {
    module_eval_host(settings, "{ }")
}

/// The module's warnings for this config.
fn warnings(config: &serde_json::Value) -> Vec<String> {
    config["warnings"]
        .as_array()
        .map(|w| w.iter().map(|m| m.as_str().unwrap().to_string()).collect())
        .unwrap_or_default()
}

/// The messages of the module's failed assertions for this config.
fn failed_assertions(config: &serde_json::Value) -> Vec<String> {
    config["assertions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["assertion"] == false)
        .map(|a| a["message"].as_str().unwrap().to_string())
        .collect()
}

/// A cluster node with everything on.
const NODE: &str = r#"{
  enable = true;
  servers = [ "10.0.0.1" "10.0.0.2" "10.0.0.3" ];
  openFirewall = true;
  denyCloudFingerprinters = true;
  nodeMeta.rack = "r1";
  bridge = { enable = true; interfaces = [ "eno1" ]; addresses = [ "10.0.0.1/24" ]; };
  cache = { path = "/mnt/cache"; publicKeys = [ "cluster-1:c2FtcGxlIGtleQ==" ]; signingKeyFile = "/run/keys/cache.sec"; };
  gitfront = {
    enable = true;
    users.alice.sshKeys = [ "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl alice@laptop" ];
    settings.nomad.tokenFile = "/run/keys/nomad-token";
  };
}"#;

#[test]
fn module_writes_configs_the_binaries_accept() {
    let config = module_eval(NODE);
    for a in config["assertions"].as_array().unwrap() {
        assert_eq!(a["assertion"], true, "{}", a["message"]);
    }
    assert!(config["boot"]["kernelModules"].as_array().unwrap().contains(&serde_json::json!("vhost_net")));
    let nomad = &config["services"]["nomad"];
    assert_eq!(nomad["dropPrivileges"], false, "the driver needs a root agent");
    let settings = &nomad["settings"];
    assert_eq!(settings["server"]["bootstrap_expect"], 3);
    assert_eq!(
        settings["client"]["server_join"]["retry_join"],
        serde_json::json!(["10.0.0.1", "10.0.0.2", "10.0.0.3"])
    );
    assert_eq!(settings["client"]["options"]["fingerprint.denylist"], "env_aws,env_gce,env_azure,env_digitalocean");

    // The plugin block: the driver takes it, with the bridge and the cache.
    let plugin = &settings["plugin"]["nomad-driver-microvm"]["config"];
    let dump = check_config(plugin).unwrap_or_else(|e| panic!("the driver refuses the module's plugin block: {e}"));
    assert!(dump.contains("\"vmbr0\""), "{dump}");
    assert_eq!(plugin["substituters"], serde_json::json!(["file:///mnt/cache"]), "nodes fetch from the cache");
    assert_eq!(plugin["trusted_public_keys"], serde_json::json!(["cluster-1:c2FtcGxlIGtleQ=="]));

    // /etc/gitfront.toml: gitfront takes it; it signs with the key file.
    let toml_value = &config["environment"]["etc"]["gitfront.toml"]["source"]["toml"];
    assert_eq!(toml_value["binary_cache"], "file:///mnt/cache?secret-key=/run/keys/cache.sec");
    assert_eq!(toml_value["nomad"]["token_file"], "/run/keys/nomad-token");
    let effective = gitfront_check_config(&to_toml(toml_value))
        .unwrap_or_else(|e| panic!("gitfront refuses the module's gitfront.toml: {e}"));
    assert_eq!(effective["binary_cache"].as_str(), toml_value["binary_cache"].as_str());

    // alice's key logs in as alice, through gitfront only.
    let git = &config["users"]["users"]["git"];
    let lines = git["openssh"]["authorizedKeys"]["keys"].as_array().unwrap();
    assert_eq!(lines.len(), 1);
    let line = lines[0].as_str().unwrap();
    assert!(
        line.starts_with(
            "command=\"'/nix/store/00000000000000000000000000000000-gitfront/bin/gitfront' serve \
             --config '/etc/gitfront.toml' --user alice\",restrict ssh-ed25519 "
        ),
        "{line}"
    );
    assert_eq!(config["services"]["openssh"]["enable"], true);
    assert!(
        config["systemd"]["tmpfiles"]["rules"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r == "d /mnt/cache 0755 git root - -")
    );

    // The bridge, with its uplink, in a file networkd takes before NixOS's
    // own "40-eno1" (networking.interfaces.eno1); no dhcpcd on either.
    let networks = &config["systemd"]["network"]["networks"];
    assert_eq!(networks["30-vmbr0-ports"]["networkConfig"]["Bridge"], "vmbr0");
    assert!("30-vmbr0-ports" < "40-eno1");
    assert_eq!(networks["40-vmbr0"]["address"], serde_json::json!(["10.0.0.1/24"]));
    assert_eq!(config["networking"]["dhcpcd"]["denyInterfaces"], serde_json::json!(["vmbr0", "eno1"]));

    // A well-set cluster node gets no warning.
    assert_eq!(warnings(&config), Vec::<String>::new());
}

#[test]
fn the_agent_unit_lets_vms_outlive_the_agent() {
    let config = module_eval(NODE);
    let unit = &config["systemd"]["services"]["nomad"]["serviceConfig"];
    assert_eq!(unit["KillMode"], "process", "a restart of the agent must not kill the VMs");
    assert_eq!(unit["LimitMEMLOCK"], "infinity");
    assert_eq!(unit["LimitNOFILE"], "65536:1048576", "soft as nixpkgs, hard as microvm.nix's VMM");
    // The devices the VMM opens, for the kvm group (and all, as systemd has them).
    let rules = config["services"]["udev"]["extraRules"].as_str().unwrap();
    for dev in ["kvm", "vhost-net", "vhost-vsock"] {
        let line =
            rules.lines().find(|l| l.contains(&format!("KERNEL==\"{dev}\""))).unwrap_or_else(|| panic!("{rules}"));
        assert!(line.contains("GROUP=\"kvm\"") && line.contains("MODE=\"0666\""), "{line}");
        assert!(line.contains(&format!("static_node={dev}")), "{line}");
    }
    assert!(rules.contains("KERNEL==\"tun\", MODE=\"0666\", OPTIONS+=\"static_node=net/tun\""), "{rules}");

    // The VMs go down gracefully at host shutdown: after the agent (the unit
    // is ordered before it), never by a switch, with a command line the
    // driver binary takes.
    // ssh on the agent's PATH, for `nomad alloc exec` into guests.
    let extra = config["services"]["nomad"]["extraPackages"].as_array().unwrap();
    assert!(extra.iter().any(|p| p.as_str().is_some_and(|p| p.ends_with("-openssh"))), "{extra:?}");
    let shutdown = &config["systemd"]["services"]["nomad-microvm-shutdown"];
    assert_eq!(shutdown["before"], serde_json::json!(["nomad.service"]), "{shutdown}");
    assert_eq!(shutdown["restartIfChanged"], false);
    assert_eq!(shutdown["stopIfChanged"], false);
    assert_eq!(shutdown["serviceConfig"]["TimeoutStopSec"], "60", "30s per VM, then TERM and KILL");
    let exec_stop = shutdown["serviceConfig"]["ExecStop"].as_str().unwrap();
    let argv: Vec<&str> = exec_stop.split_whitespace().collect();
    assert!(argv[0].ends_with("/bin/nomad-driver-microvm"), "{exec_stop}");
    assert_eq!(&argv[1..], ["stop-all", "/var/lib/nomad-microvm", "30s"]);
    let empty = tempfile::tempdir().unwrap();
    let out = Command::new(driver_bin()).arg(argv[1]).arg(empty.path()).args(&argv[3..]).output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).starts_with("stopped 0 VM(s)"), "{}", text(&out.stdout));

    // Whatever forces another KillMode is refused, naming why.
    for mode in ["control-group", "mixed", "none"] {
        let host = format!("{{ systemd.services.nomad.serviceConfig.KillMode = \"{mode}\"; }}");
        let failed = failed_assertions(&module_eval_host(NODE, &host));
        assert!(failed.iter().any(|m| m.contains("KillMode must be \"process\"")), "{mode}: {failed:?}");
    }
    // Servers run no VMs: none of this there.
    let server = module_eval("{ enable = true; role = \"server\"; }");
    assert!(server["systemd"]["services"]["nomad"].is_null(), "{}", server["systemd"]);
    assert!(
        failed_assertions(&module_eval_host(
            "{ enable = true; role = \"server\"; }",
            "{ systemd.services.nomad.serviceConfig.KillMode = \"mixed\"; }"
        ))
        .is_empty()
    );
}

#[test]
fn stop_without_agent_after_is_checked_against_gitfronts_jobs() {
    let warned = |settings: &str| -> Vec<String> { warnings(&module_eval(settings)) };
    let never = "driver.stopWithoutAgentAfter is 0";
    let not_shorter = "is not shorter than gitfront.settings.job.stopOnClientAfter";
    // The defaults (45s, 1m) are fine, with or without gitfront.
    assert!(warned("{ enable = true; }").is_empty());
    assert!(warned("{ enable = true; gitfront.enable = true; }").is_empty());
    // 0 (in any spelling) is never on a node that runs VMs.
    for zero in ["0", "0s", "0m0s"] {
        let w = warned(&format!("{{ enable = true; driver.stopWithoutAgentAfter = \"{zero}\"; }}"));
        assert!(w.len() == 1 && w[0].contains(never), "{zero}: {w:?}");
    }
    assert!(warned("{ enable = true; role = \"server\"; driver.stopWithoutAgentAfter = \"0s\"; }").is_empty());
    // Against gitfront's stop_on_client_after, compared as durations.
    for (stop, on_client, warn) in [
        ("1m", "1m", true),
        ("60s", "1m", true),
        ("1m30s", "1m", true),
        ("1.5m", "2m", false),
        ("119s", "2m", false),
        ("2m0.5s", "2m", true),
        ("45s", "30s", true),
        ("29s", "30s", false),
        ("500ms", "1s", false),
        ("1000ms", "1s", true),
        ("1h", "59m", true),
    ] {
        let w = warned(&format!(
            "{{ enable = true; driver.stopWithoutAgentAfter = \"{stop}\"; \
             gitfront = {{ enable = true; settings.job.stopOnClientAfter = \"{on_client}\"; }}; }}"
        ));
        assert_eq!(w.iter().any(|m| m.contains(not_shorter)), warn, "{stop} vs {on_client}: {w:?}");
    }
    // Without gitfront here this node does not know the jobs' value.
    assert!(warned("{ enable = true; driver.stopWithoutAgentAfter = \"5m\"; }").is_empty());
}

#[test]
fn gitfront_builds_stay_in_the_sandbox() {
    let gitfront = "{ enable = true; gitfront.enable = true; }";
    let failed = failed_assertions(&module_eval_host(gitfront, "{ nix.settings.sandbox = false; }"));
    assert!(failed.iter().any(|m| m.contains("nix.settings.sandbox is false")), "{failed:?}");
    // Only gitfront's node builds what tenants push.
    assert!(failed_assertions(&module_eval_host("{ enable = true; }", "{ nix.settings.sandbox = false; }")).is_empty());
    let w = warnings(&module_eval_host(gitfront, "{ nix.settings.sandbox = \"relaxed\"; }"));
    assert!(w.iter().any(|m| m.contains("__noChroot")), "{w:?}");
    for trusted in ["\"git\"", "\"@git\"", "\"*\""] {
        let host = format!("{{ nix.settings.trusted-users = [ \"root\" {trusted} ]; }}");
        let w = warnings(&module_eval_host(gitfront, &host));
        assert!(w.iter().any(|m| m.contains("is in nix.settings.trusted-users")), "{trusted}: {w:?}");
    }
    assert!(
        warnings(&module_eval_host(gitfront, "{ nix.settings.trusted-users = [ \"root\" \"@wheel\" ]; }")).is_empty()
    );
}

#[test]
fn bridge_uplinks_are_left_to_the_bridge() {
    let node = "{ enable = true; bridge = { enable = true; interfaces = [ \"eno1\" \"eno2\" ]; dhcp = true; }; }";
    let config = module_eval(node);
    assert_eq!(config["networking"]["dhcpcd"]["denyInterfaces"], serde_json::json!(["vmbr0", "eno1", "eno2"]));
    assert_eq!(config["systemd"]["network"]["networks"]["30-vmbr0-ports"]["matchConfig"]["Name"], "eno1 eno2");
    assert_eq!(config["systemd"]["network"]["networks"]["40-vmbr0"]["networkConfig"]["DHCP"], "yes");
    // An uplink the host also configures (e.g. hardware-configuration.nix's
    // networking.interfaces.eno1.useDHCP) is named in a warning.
    let iface =
        |dhcp: &str, v4: &str| format!("{{ useDHCP = {dhcp}; ipv4.addresses = [ {v4} ]; ipv6.addresses = [ ]; }}");
    let host = format!(
        "{{ networking.interfaces = {{ eno1 = {}; eno2 = {}; eth9 = {}; }}; }}",
        iface("true", ""),
        iface("null", ""),
        iface("null", "{ address = \"10.0.0.9\"; prefixLength = 24; }")
    );
    let w = warnings(&module_eval_host(node, &host));
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(w[0].contains("eno1 is a port of vmbr0"), "{w:?}");
    let host = format!(
        "{{ networking.interfaces.eno2 = {}; }}",
        iface("false", "{ address = \"10.0.0.2\"; prefixLength = 24; }")
    );
    let w = warnings(&module_eval_host(node, &host));
    assert!(w.len() == 1 && w[0].contains("eno2 is a port of vmbr0"), "{w:?}");
    // No bridge, no dhcpcd exceptions.
    assert!(module_eval("{ enable = true; }")["networking"]["dhcpcd"].is_null());
}

#[test]
fn secrets_in_run_keys_are_readable_by_the_gitfront_user() {
    let git = |settings: &str| module_eval(settings)["users"]["users"]["git"]["extraGroups"].clone();
    assert_eq!(git("{ enable = true; gitfront.enable = true; }"), serde_json::json!([]));
    assert_eq!(
        git(
            "{ enable = true; gitfront.enable = true; cache = { path = \"/srv/c\"; signingKeyFile = \"/run/keys/c.sec\"; }; }"
        ),
        serde_json::json!(["keys"])
    );
    assert_eq!(
        git("{ enable = true; gitfront = { enable = true; settings.nomad.tokenFile = \"/run/keys/token\"; }; }"),
        serde_json::json!(["keys"])
    );
    assert_eq!(
        git(
            "{ enable = true; gitfront = { enable = true; settings.nomad.tokenFile = \"/var/lib/gitfront/token\"; }; }"
        ),
        serde_json::json!([])
    );
}

#[test]
fn module_refuses_bad_settings() {
    let cases = [
        ("{ enable = true; role = \"client\"; }", "a client-only node needs `servers`"),
        ("{ enable = true; gitfront.users.Alice.sshKeys = [ ]; }", "Alice is not a gitfront user name"),
        ("{ enable = true; cache.signingKeyFile = \"/nix/store/abc-key\"; }", "must not be in the Nix store"),
        (
            "{ enable = true; driver.execSshKeyFile = \"/nix/store/abc-key\"; }",
            "execSshKeyFile must not be in the Nix store",
        ),
    ];
    for (settings, want) in cases {
        let failed = failed_assertions(&module_eval(settings));
        assert!(failed.iter().any(|m| m.contains(want)), "{settings}: {failed:?}");
    }
    // Types: values the binaries would refuse never reach them.
    for (settings, option) in [
        ("{ enable = true; driver.defaultStopTimeout = \"soon\"; }", "driver.defaultStopTimeout"),
        ("{ enable = true; bridge = { enable = true; name = \"a bridge\"; }; }", "bridge.name"),
        ("{ enable = true; cache.url = \"/srv/cache\"; }", "cache.url"),
        (
            "{ enable = true; gitfront = { enable = true; settings.nomad.address = \"https://n:4646\"; }; }",
            "gitfront.settings.nomad.address",
        ),
        (
            "{ enable = true; gitfront = { enable = true; users.alice.sshKeys = [ \"no-pty ssh-ed25519 AAAA\" ]; }; }",
            "gitfront.users",
        ),
        ("{ enable = true; drivr.stateDir = \"/srv\"; }", "drivr"),
    ] {
        let out = module_eval_raw(settings);
        assert!(!out.status.success(), "{settings} evaluated");
        let err = text(&out.stderr);
        assert!(err.contains(option), "{settings}: {err}");
    }
}

// ---------------------------------------------------------------------------
// A real Nomad agent reads the JSON NixOS writes (/etc/nomad.json)

#[test]
fn nomad_agent_loads_the_settings_the_module_writes() {
    if !require_root("nomad_agent_loads_the_settings_the_module_writes") {
        return;
    }
    let dir = open_tempdir();
    let state = dir.path().join("state");
    // A one-node cluster (server and client) with a bridge; what this host
    // lacks (the fake store paths) only degrades the driver.
    let node = format!(
        "{{ enable = true; bridge = {{ enable = true; name = \"br-vms\"; }}; \
         driver = {{ stateDir = \"{}\"; defaultStopTimeout = \"1m30s\"; allowedBridges = [ \"br-lab\" \"br-dmz\" ]; }}; }}",
        state.display()
    );
    let settings = module_eval(&node)["services"]["nomad"]["settings"].clone();
    let plugin_dir = dir.path().join("plugins");
    std::fs::create_dir_all(&plugin_dir).unwrap();
    std::os::unix::fs::symlink(driver_bin(), plugin_dir.join("nomad-driver-microvm")).unwrap();
    // What NixOS's own nomad module adds (data_dir), and this test's network.
    let host = serde_json::json!({
        "data_dir": dir.path().join("data"),
        "bind_addr": "127.0.0.1",
        "advertise": { "http": "127.0.0.1", "rpc": "127.0.0.1", "serf": "127.0.0.1" },
        "client": {
            "network_interface": "lo",
            "options": { "fingerprint.denylist": "env_aws,env_gce,env_azure,env_digitalocean" }
        }
    });
    std::fs::write(dir.path().join("nomad.json"), serde_json::to_vec_pretty(&settings).unwrap()).unwrap();
    std::fs::write(dir.path().join("host.json"), serde_json::to_vec_pretty(&host).unwrap()).unwrap();

    let netns = Arc::new(Netns::new("nixos"));
    let log = std::fs::File::create(dir.path().join("agent.log")).unwrap();
    let mut cmd = netns.command(nomad_bin());
    cmd.arg("agent")
        .arg(format!("-config={}", dir.path().join("nomad.json").display()))
        .arg(format!("-config={}", dir.path().join("host.json").display()))
        .arg(format!("-plugin-dir={}", plugin_dir.display()))
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    microvm_e2e::agent_tmpdir(&mut cmd, dir.path());
    let _agent = Group::spawn("nomad agent", &mut cmd);
    let agent_log = || std::fs::read_to_string(dir.path().join("agent.log")).unwrap_or_default();

    let nomad = |args: &[&str]| -> Output {
        run(netns.command(nomad_bin()).args(args).env("NOMAD_ADDR", "http://127.0.0.1:4646").env_remove("NOMAD_TOKEN"))
    };
    let node =
        wait_until("the driver to be fingerprinted", Duration::from_secs(120), Duration::from_millis(500), || {
            let out = nomad(&["node", "status", "-self", "-json"]);
            if !out.status.success() {
                return Err(text(&out.stderr));
            }
            let node: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())?;
            if node["Drivers"]["microvm"]["Detected"] == true { Ok(node) } else { Err(node["Drivers"].to_string()) }
        });
    let drv = &node["Drivers"]["microvm"];
    assert_eq!(drv["Healthy"], true, "{drv}\n{}", agent_log());
    // The config reached the driver: its default bridge is an attribute.
    assert_eq!(node["Attributes"]["driver.microvm.default_bridge"], "br-vms", "{}", node["Attributes"]);
    assert!(state.is_dir(), "state_dir {} was not created", state.display());

    // The agent's view of the plugin block: every key, as rendered.
    let out = nomad(&["operator", "api", "/v1/agent/self"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let me: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let plugins = me["config"]["Plugins"].as_array().cloned().unwrap_or_default();
    let ours = plugins.iter().find(|p| p["Name"] == "nomad-driver-microvm").unwrap_or_else(|| panic!("{plugins:?}"));
    let config = &ours["Config"];
    let keys: BTreeSet<String> = config.as_object().map(|o| o.keys().cloned().collect()).unwrap_or_default();
    assert_eq!(keys, driver_config_keys(), "the agent's plugin config: {config}");
    assert_eq!(config["default_stop_timeout"], "1m30s", "{config}");
    assert_eq!(config["allowed_bridges"], serde_json::json!(["br-lab", "br-dmz"]), "{config}");
}

// ---------------------------------------------------------------------------
// gitfront's TOML config

/// Every gitfront option set, each to something other than its default, in
/// the canonical forms `gitfront check-config` prints back.
const FRONT_SAMPLE: &str = r#"{
  reposRoot = "/srv/git";
  stateDir = "/srv/gitfront";
  binaryCache = "file:///srv/cache?secret-key=/run/keys/cache.sec";
  path = "/opt/git/bin:/opt/nix/bin";
  nomad = {
    address = "http://10.0.0.1:4646";
    tokenFile = "/run/keys/nomad-token";
    datacenters = [ "dc1" "dc2" ];
    namespace = "t-{user}-{repo}";
    requestTimeout = "5s";
    deployTimeout = "2m";
  };
  build = {
    allowedInputSchemes = [ "github" "git+ssh" ];
    confinement = "none";
    command = [ "nix" "build" "-L" "--out-link" "{out_link}" "{installable}" ];
    evalCommand = [ "nix" "eval" "--json" "{flake}#{attr}" "--apply" "{apply}" "--show-trace" ];
    lockCommand = [ "nix" "flake" "metadata" "--json" "--store" "{store}" "{flake}" ];
    copyCommand = [ "nix" "copy" "-v" "--to" "{cache}" "{path}" ];
    timeout = "10m";
    logTailLines = 5;
  };
  job = {
    cpuPerVcpu = 500;
    memoryOverhead = 32;
    killTimeout = "20s";
    stopOnClientAfter = "45s";
  };
  limits = {
    maxPushBytes = 1000;
    maxVcpu = 2;
    maxMem = 1024;
  };
}"#;

/// `nix-instantiate --eval` with `g` = gitfront/config.nix.
fn front_eval(expr: &str) -> serde_json::Value {
    nix_eval(&format!("let g = import ./gitfront/config.nix; in {expr}"))
}

fn front_eval_err(expr: &str) -> String {
    nix_eval_err(&format!("let g = import ./gitfront/config.nix; in {expr}"))
}

/// The TOML the module writes for these rendered values (pkgs.formats.toml
/// does the same conversion from the JSON-shaped attrset).
fn to_toml(rendered: &serde_json::Value) -> String {
    let value: toml::Value = serde_json::from_value(rendered.clone()).expect("rendered config as TOML");
    toml::to_string(&value).expect("TOML text")
}

#[test]
fn gitfront_options_render_exactly_what_gitfront_accepts() {
    let same: Vec<serde_json::Value> = serde_json::from_value(front_eval(&format!(
        "builtins.filter (path: g.optionAt path != null && (builtins.foldl' (v: n: v.${{n}}) ({FRONT_SAMPLE}) path) \
         == (builtins.foldl' (v: n: v.${{n}}) g.defaults path)) g.names"
    )))
    .unwrap();
    assert!(same.is_empty(), "FRONT_SAMPLE leaves these at their defaults: {same:?}");

    let rendered = front_eval(&format!("g.render {FRONT_SAMPLE}"));
    let written: toml::Value = toml::from_str(&to_toml(&rendered)).unwrap();
    let effective = gitfront_check_config(&to_toml(&rendered))
        .unwrap_or_else(|e| panic!("gitfront refuses what the module writes: {e}"));
    let module_keys: BTreeSet<String> = serde_json::from_value(front_eval("g.keys")).unwrap();
    let gitfront_keys = dotted_keys(&effective);
    let missing: Vec<_> = gitfront_keys.difference(&module_keys).collect();
    let unknown: Vec<_> = module_keys.difference(&gitfront_keys).collect();
    assert!(missing.is_empty(), "gitfront keys with no option in gitfront/config.nix: {missing:?}");
    assert!(unknown.is_empty(), "gitfront/config.nix writes keys gitfront does not know: {unknown:?}");
    // Every value was taken as written.
    assert_eq!(effective, written, "gitfront's effective config differs from what the module wrote");
}

#[test]
fn gitfront_module_defaults_are_gitfront_defaults() {
    let rendered = front_eval("g.render g.defaults");
    let from_nix = gitfront_check_config(&to_toml(&rendered)).expect("defaults accepted");
    let gitfront = gitfront_check_config("").expect("empty file accepted");
    assert_eq!(from_nix, gitfront, "gitfront/config.nix's defaults differ from gitfront/src/config.rs's");
}

#[test]
fn gitfront_option_types_refuse_what_gitfront_refuses() {
    let cases = [
        (r#"[ "reposRoot" ]"#, r#""repos""#),
        (r#"[ "binaryCache" ]"#, r#""/srv/cache""#),
        (r#"[ "path" ]"#, r#""bin:/usr/bin""#),
        (r#"[ "nomad" "address" ]"#, r#""https://n:4646""#),
        (r#"[ "nomad" "address" ]"#, r#""127.0.0.1:4646""#),
        (r#"[ "nomad" "tokenFile" ]"#, r#""token""#),
        (r#"[ "nomad" "datacenters" ]"#, "[ ]"),
        (r#"[ "nomad" "namespace" ]"#, r#""{user}""#),
        (r#"[ "nomad" "deployTimeout" ]"#, r#""soon""#),
        (r#"[ "build" "timeout" ]"#, r#""30""#),
        (r#"[ "build" "command" ]"#, "[ ]"),
        (r#"[ "build" "command" ]"#, r#"[ "nix" "build" "{installable}" ]"#),
        (r#"[ "build" "copyCommand" ]"#, r#"[ "nix" "copy" "{path}" ]"#),
        (r#"[ "build" "copyCommand" ]"#, r#"[ "nix" "copy" "--to" "{cache}" "{path}" "{out_link}" ]"#),
        (r#"[ "build" "evalCommand" ]"#, r#"[ "nix" "eval" "{flake}" "--apply" "{apply}" ]"#),
        (r#"[ "build" "lockCommand" ]"#, r#"[ "nix" "flake" "metadata" "{flake}" ]"#),
        (r#"[ "build" "allowedInputSchemes" ]"#, r#"[ "github" "path" ]"#),
        (r#"[ "build" "allowedInputSchemes" ]"#, r#"[ "git+file" ]"#),
        (r#"[ "build" "allowedInputSchemes" ]"#, "[ ]"),
        (r#"[ "build" "confinement" ]"#, r#""chroot""#),
        (r#"[ "job" "cpuPerVcpu" ]"#, "0"),
        (r#"[ "limits" "maxVcpu" ]"#, "0"),
        (r#"[ "limits" "maxPushBytes" ]"#, "0"),
    ];
    for (path, value) in cases {
        let v = front_eval(&format!(
            "let path = {path}; set = p: v: vals: if builtins.length p == 1 then vals // {{ ${{builtins.head p}} = v; }} \
             else vals // {{ ${{builtins.head p}} = set (builtins.tail p) v vals.${{builtins.head p}}; }}; \
             values = set path ({value}) g.defaults; \
             in {{ ok = g.valid path ({value}); toml = builtins.tryEval (builtins.deepSeq (g.render values) true); }}"
        ));
        assert_eq!(v["ok"], false, "the module's type for {path} accepts {value}");
        assert_eq!(v["toml"]["success"], false, "render writes {path} = {value}");
        // gitfront refuses the same value, naming the key.
        let key: String = serde_json::from_value(front_eval(&format!(
            "let path = {path}; in builtins.concatStringsSep \".\" ((builtins.genList (i: builtins.elemAt path i) \
             (builtins.length path - 1)) ++ [ (g.optionAt path).key ])"
        )))
        .unwrap();
        let json_value = front_eval(value);
        let mut doc = serde_json::json!({});
        let (section, leaf) = key.rsplit_once('.').map(|(s, l)| (Some(s), l)).unwrap_or((None, key.as_str()));
        match section {
            Some(s) => doc[s] = serde_json::json!({ leaf: json_value }),
            None => doc[leaf] = json_value,
        }
        let err = gitfront_check_config(&to_toml(&doc))
            .expect_err(&format!("gitfront accepts {key} = {value}, the module refuses it"));
        assert!(err.contains(leaf), "{key} = {value}: {err}");
    }
}

#[test]
fn gitfront_render_refuses_missing_and_unknown_options() {
    let err = front_eval_err("g.render (g.defaults // { nomad = removeAttrs g.defaults.nomad [ \"address\" ]; })");
    assert!(err.contains("missing gitfront options in nomad: address"), "{err}");
    let err = front_eval_err("g.render (g.defaults // { repoRoot = \"/srv\"; })");
    assert!(err.contains("not gitfront options: repoRoot"), "{err}");
}

// ---------------------------------------------------------------------------
// Secrets: only paths of files, never values

/// Names that suggest a secret value. Names with "ssh" are exempt: tenants'
/// `sshKeys` are public keys, and the driver's `execSshKeyFile` is a path,
/// refused in the store by an assertion of its own (`module_refuses_bad_settings`).
fn secretish(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    ["secret", "token", "password", "passwd", "credential", "private", "signing"].iter().any(|w| n.contains(w))
        || (n.contains("key") && !n.contains("public") && !n.contains("ssh"))
}

/// `(option name, its declaration)` for every `mkOption` in nixos-module.nix.
fn module_option_decls() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(repo_root().join("nixos-module.nix")).expect("read nixos-module.nix");
    let lines: Vec<&str> = text.lines().collect();
    let mut decls = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let Some((lhs, _)) = line.trim().split_once(" = mkOption") else { continue };
        let name = lhs.rsplit('.').next().unwrap_or(lhs).to_string();
        // The declaration: up to the line closing it at the same indent.
        let indent = line.len() - line.trim_start().len();
        let end = lines[i + 1..]
            .iter()
            .position(|l| l.len() - l.trim_start().len() == indent && l.trim_start().starts_with('}'))
            .map_or(lines.len(), |p| i + 1 + p);
        decls.push((name, lines[i..=end.min(lines.len() - 1)].join("\n")));
    }
    assert!(decls.len() > 20, "found only {} options in nixos-module.nix", decls.len());
    decls
}

#[test]
fn secrets_are_taken_as_file_paths_only() {
    // Options the module declares itself.
    for (name, decl) in module_option_decls() {
        if secretish(&name) {
            assert!(name.ends_with("File"), "option {name} looks like a secret: take a file path (`{name}File`)");
            assert!(decl.contains("type = secretFile"), "{name} must use the secretFile type:\n{decl}");
        }
    }
    // Options generated from the two tables.
    let driver: Vec<String> = serde_json::from_value(nix_eval("p.names")).unwrap();
    let front: Vec<Vec<String>> = serde_json::from_value(front_eval("g.names")).unwrap();
    for name in driver {
        assert!(!secretish(&name), "driver option {name} looks like a secret: the driver takes none");
    }
    for path in front {
        let name = path.last().unwrap();
        if secretish(name) {
            assert!(name.ends_with("File"), "gitfront option {name} looks like a secret: take a file path");
            let kind =
                front_eval(&format!("(g.optionAt {}).kind", serde_json::to_string(&path).unwrap().replace(',', " ")));
            assert!(kind == "nullPath" || kind == "path", "gitfront option {name} is a {kind}, not a path");
        }
    }
    // TOML keys gitfront reads: a secret comes as `<name>_file`.
    let keys: Vec<String> = serde_json::from_value(front_eval("g.keys")).unwrap();
    for key in keys {
        let leaf = key.rsplit('.').next().unwrap();
        if secretish(leaf) {
            assert!(leaf.ends_with("_file"), "gitfront.toml key {key} looks like a secret value");
        }
    }
    // And the module itself states the rule for each such option.
    let module = std::fs::read_to_string(repo_root().join("nixos-module.nix")).unwrap();
    assert!(module.contains("never copied to the store"), "the secret options' descriptions say how they are read");
}

#[test]
fn tenant_keys_get_the_line_gitfront_itself_writes() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("gitfront.toml");
    std::fs::write(&config, "").unwrap();
    let exe = "/nix/store/00000000000000000000000000000000-gitfront-0.1.0/bin/gitfront";
    let keys = [
        ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl alice@laptop", true),
        ("ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTY= snakeoil", true),
        ("ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQ==", true),
        ("no-pty ssh-ed25519 AAAAC3NzaC1lZDI1NTE5", false),
        ("ssh-ed25519 not;base64", false),
        ("ssh-ed25519 AAAA a\"b", false),
        ("ssh-dss AAAAB3NzaC1kc3M=", false),
    ];
    for (key, good) in keys {
        let quoted = serde_json::to_string(key).unwrap();
        let v = front_eval(&format!(
            "{{ valid = g.validKey {quoted}; line = g.authorizedKey {{ gitfront = \"{exe}\"; \
             configFile = \"{}\"; user = \"alice\"; key = {quoted}; }}; }}",
            config.display()
        ));
        assert_eq!(v["valid"], good, "the module's check of {key}");
        let key_file = dir.path().join("key.pub");
        std::fs::write(&key_file, format!("{key}\n")).unwrap();
        let out = run(Command::new(microvm_e2e::bins::gitfront_bin())
            .args(["authorized-key", "--user", "alice", "--gitfront", exe, "--config"])
            .arg(&config)
            .arg("--key-file")
            .arg(&key_file));
        assert_eq!(out.status.success(), good, "gitfront authorized-key on {key}: {}", text(&out.stderr));
        if good {
            assert_eq!(text(&out.stdout).trim_end(), v["line"].as_str().unwrap(), "the forced command for {key}");
        }
    }
}

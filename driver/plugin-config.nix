# The driver's plugin config, `plugin "nomad-driver-microvm" { config { … } }`,
# as the NixOS module sees it: one option per key of driver/src/config.rs.
#
# builtins only (no nixpkgs, no lib): nixos-module.nix imports it to declare
# `services.nomad-microvm.driver.*` and to render the block, and
# tests/e2e/nixos_module.rs evaluates it with `nix-instantiate --eval` and
# feeds the result to `nomad-driver-microvm check-config`, so a key added,
# renamed or removed on either side fails that test.
let
  # Shapes of values, each with the regex the module's option type enforces
  # (`lib.types.strMatching`) and that `valid` below checks; they restate the
  # driver's own checks (absolute paths, Go durations, interface names,
  # store URLs).
  patterns = {
    path = "/.*";
    duration = "0|([0-9]+(\\.[0-9]*)?(ns|us|µs|ms|s|m|h))+";
    # 1-15 bytes, no '/' or whitespace, not "." or ".."
    ifname = "[^/[:space:].][^/[:space:]]{0,14}|\\.[^/[:space:].]|\\.[^/[:space:]]{2,14}";
    storeUrl = "[a-z][a-z0-9+.-]*://.*";
  };

  # Option name (under services.nomad-microvm.driver) -> the driver's key,
  # the value's shape, the driver's own default and what it means. `kind`:
  #   str, bool         a string / a bool
  #   path              an absolute path
  #   nullPath          an absolute path or null (rendered "", which the driver reads as "off")
  #   nullIfname        an interface name or null (rendered "": none)
  #   duration          a Go duration ("30s", "1m30s")
  #   pathList, ifnameList, storeUrlList, strList   lists of those
  options = {
    stateDir = {
      key = "state_dir";
      kind = "path";
      default = "/var/lib/nomad-microvm";
      description = "VM working dirs (`vms/`), per-task supervisor state (`tasks/`) and name claims (`claims/`). Keep it short: sockets live below it (107-byte limit).";
    };
    vmmUser = {
      key = "vmm_user";
      kind = "str";
      default = "microvm";
      description = "User `bin/microvm-run` and `bin/microvm-shutdown` run as (name or uid).";
    };
    vmmGroup = {
      key = "vmm_group";
      kind = "str";
      default = "kvm";
      description = "Group of the VMM; also the `--socket-group` of virtiofsd.";
    };
    allowRootVmm = {
      key = "allow_root_vmm";
      kind = "bool";
      default = false;
      description = "Without it, a `vmmUser` of root is refused.";
    };
    defaultBridge = {
      key = "default_bridge";
      kind = "nullIfname";
      default = null;
      description = "Bridge the VMs' taps join when the task names none; null: taps stay unattached.";
    };
    allowedBridges = {
      key = "allowed_bridges";
      kind = "ifnameList";
      default = [ ];
      description = "Further bridges a task may name with `bridge` (the default bridge is always allowed).";
    };
    virtiofsd = {
      key = "virtiofsd";
      kind = "str";
      default = "virtiofsd";
      description = "The virtiofsd the driver runs (as root, one per share): a path, or a name looked up on the agent's PATH.";
    };
    nix = {
      key = "nix";
      kind = "str";
      default = "nix";
      description = "nix binary used to fetch runners that are not in the local store (`nix copy --from`).";
    };
    substituters = {
      key = "substituters";
      kind = "storeUrlList";
      default = [ ];
      description = "Binary caches to fetch missing runners from, in order.";
    };
    trustedPublicKeys = {
      key = "trusted_public_keys";
      kind = "strList";
      default = [ ];
      description = "Keys fetched runners must be signed with; empty accepts unsigned paths (trust then comes from who can write the cache).";
    };
    defaultStopTimeout = {
      key = "default_stop_timeout";
      kind = "duration";
      default = "30s";
      description = "How long stops the driver starts itself (a virtiofsd died, SIGTERM via `nomad alloc signal`) wait for the guest.";
    };
    gcrootsDir = {
      key = "gcroots_dir";
      kind = "nullPath";
      default = "/nix/var/nix/gcroots/nomad-microvm";
      description = "Indirect GC roots for booted runners; null disables them.";
    };
    allowedRunnerRoots = {
      key = "allowed_runner_roots";
      kind = "pathList";
      default = [ "/nix/store" ];
      description = "Runners must live below one of these.";
    };
    allowedShareRoots = {
      key = "allowed_share_roots";
      kind = "pathList";
      default = [ ];
      description = "virtiofs share sources may live below these, besides the VM's own working dir; sources in /nix/store are always shared read-only.";
    };
    fingerprintPeriod = {
      key = "fingerprint_period";
      kind = "duration";
      default = "30s";
      description = "How often the driver re-checks the host.";
    };
    stopWithoutAgentAfter = {
      key = "stop_without_agent_after";
      kind = "duration";
      default = "0s";
      description = "Shut a VM down when no Nomad agent has been connected to the plugin for this long (0s: never). Keep it at most the jobs' disconnect.stop_on_client_after, so a node whose agent died stops its VMs before the servers place them elsewhere.";
    };
    execSshKeyFile = {
      key = "exec_ssh_key_file";
      kind = "nullPath";
      default = null;
      description = "Private key `nomad alloc exec` and script checks log into guests with (as root, over vsock); its public half goes into the guests' root authorized keys. null: the agent's own ssh keys and config. Keep it out of the Nix store.";
    };
  };

  names = builtins.attrNames options;

  # The regex a value of this kind (or each element, for lists) must match;
  # null: no pattern (bools, free strings).
  patternOf = kind:
    {
      path = patterns.path;
      nullPath = patterns.path;
      pathList = patterns.path;
      duration = patterns.duration;
      nullIfname = patterns.ifname;
      ifnameList = patterns.ifname;
      storeUrlList = patterns.storeUrl;
    }.${kind} or null;

  isList = kind: builtins.elem kind [ "pathList" "ifnameList" "storeUrlList" "strList" ];

  matches = kind: v: patternOf kind == null || builtins.match (patternOf kind) v != null;

  # Whether `value` is acceptable for option `name` (what the module's type
  # says, checked with builtins only).
  valid = name: value:
    let kind = options.${name}.kind; in
    if kind == "bool" then builtins.isBool value
    else if isList kind then builtins.isList value && builtins.all (v: builtins.isString v && matches kind v) value
    else if value == null then builtins.elem kind [ "nullPath" "nullIfname" ]
    else builtins.isString value && matches kind value;

  # Option values (exactly the option names; a submodule's `_module` is
  # ignored) -> the `config {}` attrset with every key the driver knows.
  render = values:
    let
      given = builtins.filter (n: n != "_module") (builtins.attrNames values);
      unknown = builtins.filter (n: !(options ? ${n})) given;
      missing = builtins.filter (n: !(values ? ${n})) names;
      bad = builtins.filter (n: !(valid n values.${n})) names;
    in
    if unknown != [ ] then throw "plugin-config.nix: not driver options: ${toString unknown}"
    else if missing != [ ] then throw "plugin-config.nix: missing driver options: ${toString missing}"
    else if bad != [ ] then throw "plugin-config.nix: invalid values for: ${toString bad}"
    else
      builtins.listToAttrs (map
        (n: {
          name = options.${n}.key;
          value = if values.${n} == null then "" else values.${n};
        })
        names);

  defaults = builtins.mapAttrs (_: o: o.default) options;

  # The part of the Nomad agent config (services.nomad.settings, written as
  # JSON) that loads the plugin: the label is the binary's file name in the
  # plugin dir, and since Nomad 1.10 a plugin without this block is skipped.
  agentSettings = values: {
    plugin.nomad-driver-microvm.config = render values;
  };
in
{
  inherit options names patterns patternOf isList valid render defaults agentSettings;
  # The keys `render` writes, for comparing with `nomad-driver-microvm config-keys`.
  keys = map (n: options.${n}.key) names;
}

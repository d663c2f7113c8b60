# ## NixOS
#
# `nixos-module.nix` (the flake's `nixosModules.default`) makes a NixOS host a
# node of a microVM cluster: the Nomad agent (run as root: the driver creates
# taps) with `nomad-driver-microvm` in its plugin dir and the
# `plugin "nomad-driver-microvm"` block written from typed options, the kernel
# modules, the VMM user, a bridge for the VMs (systemd-networkd), the binary
# cache and, on the nodes you choose, gitfront behind sshd.
#
# Nomad is BUSL-licensed, which nixpkgs counts as unfree: allow it
# (`nixpkgs.config.allowUnfreePredicate = pkg: lib.getName pkg == "nomad";`).
#
# ### One server that is its own cluster
#
# ```nix
# { lib, ... }: {
#   imports = [ nomad-microvm.nixosModules.default ];   # the flake input
#   nixpkgs.config.allowUnfreePredicate = pkg: lib.getName pkg == "nomad";
#   boot.kernelModules = [ "kvm-intel" ];               # or kvm-amd
#   services.nomad-microvm = {
#     enable = true;                                    # role "both", no other servers
#     bridge = { enable = true; addresses = [ "192.168.100.1/24" ]; };
#     gitfront = {
#       enable = true;
#       users.alice.sshKeys = [ "ssh-ed25519 AAAA… alice@laptop" ];
#     };
#   };
# }
# ```
#
# alice then deploys `nixosConfigurations.web` of her flake with
# `git push git@server:fleet HEAD:web`; its VM's taps join `vmbr0`.
#
# ### Three nodes
#
# Every node is server and client; the binary cache is a directory all three
# mount (NFS, CephFS, …); n1 also runs gitfront and signs what it pushes.
#
# ```nix
# let
#   node = name: address: { lib, ... }: {
#     imports = [ nomad-microvm.nixosModules.default ./hardware/${name}.nix ];
#     nixpkgs.config.allowUnfreePredicate = pkg: lib.getName pkg == "nomad";
#     networking.hostName = name;
#     services.nomad-microvm = {
#       enable = true;
#       servers = [ "10.0.0.1" "10.0.0.2" "10.0.0.3" ];  # bootstrapExpect = 3
#       openFirewall = true;
#       bridge = {
#         enable = true;
#         interfaces = [ "eno1" ];                       # VMs share the LAN
#         addresses = [ "${address}/24" ];
#       };
#       cache = {
#         path = "/mnt/shared/nix-cache";
#         publicKeys = [ "cluster-cache-1:…" ];          # nodes accept only signed runners
#         signingKeyFile = "/run/keys/cluster-cache.sec"; # used where gitfront runs
#       };
#       gitfront = lib.mkIf (name == "n1") {
#         enable = true;
#         users.alice.sshKeys = [ "ssh-ed25519 AAAA… alice@laptop" ];
#         settings.nomad.tokenFile = "/run/keys/gitfront-nomad-token";  # with Nomad ACLs
#       };
#     };
#     systemd.network.networks."40-vmbr0".gateway = [ "10.0.0.254" ];
#     # spread VMs over the nodes instead of packing them (first cluster start)
#     services.nomad.settings.server.default_scheduler_config.scheduler_algorithm = "spread";
#   };
# in {
#   nixosConfigurations = {
#     n1 = nixpkgs.lib.nixosSystem { system = "x86_64-linux"; modules = [ (node "n1" "10.0.0.1") ]; };
#     n2 = nixpkgs.lib.nixosSystem { system = "x86_64-linux"; modules = [ (node "n2" "10.0.0.2") ]; };
#     n3 = nixpkgs.lib.nixosSystem { system = "x86_64-linux"; modules = [ (node "n3" "10.0.0.3") ]; };
#   };
# }
# ```
#
# The signing key, made once on any machine with Nix: the secret half goes to
# n1 only, the public half into `cache.publicKeys` of every node.
#
# ```sh
# nix --extra-experimental-features nix-command key generate-secret --key-name cluster-cache-1 > cluster-cache.sec
# nix --extra-experimental-features nix-command key convert-secret-to-public < cluster-cache.sec  # cluster-cache-1:…
# # on n1 (/run/keys is root:keys 0750; the module puts the gitfront user in `keys`):
# install -m 0440 -o root -g keys cluster-cache.sec /run/keys/cluster-cache.sec
# ```
#
# `/run/keys` is a ramfs, empty after a reboot: put the file there with your
# deployment's secret handling (NixOps keys, agenix or sops-nix with that
# path), or keep it on disk, e.g. `/var/lib/gitfront/cluster-cache.sec` owned
# by `git` with mode 0400.
#
# A VM whose node lost its Nomad agent while the machine keeps running shuts
# down after `driver.stopWithoutAgentAfter` (here the default, 45s), before the
# servers start its replacement elsewhere, which they do only after gitfront's
# `job.stopOnClientAfter` (1m) and more (see "A cluster: VMs move, never twice").
# Keep the first shorter than the second on every node; the module warns
# where it is `0s` or, on a gitfront node, not shorter. An agent restart
# (`nixos-rebuild switch`, `systemctl restart nomad`) takes seconds and leaves
# the VMs running: the agent's unit keeps `KillMode=process`.
#
# Secrets are never options' values: options that need one take the path of
# a file read at run time (`cache.signingKeyFile`, `gitfront.settings.nomad.tokenFile`,
# `driver.execSshKeyFile`), refuse Nix path literals (which would copy the
# file into the store) and store paths; gitfront's must be readable by the
# gitfront user (under `/run/keys` the module adds it to the `keys` group). Nomad's own secrets
# (gossip key, ACL and TLS settings) go through `services.nomad.credentials`
# or `services.nomad.extraSettingsPaths`.
#
# ### What else the module sets, and checks
#
# - On nodes that run VMs: `KillMode=process` on `nomad.service` (pinned: the
#   VMs' supervisors live in its cgroup, so any other mode would kill them
#   with the agent; an assertion refuses another value), hard limits
#   `LimitNOFILE=65536:1048576` and `LimitMEMLOCK=infinity` (the driver raises
#   the VMM's and virtiofsd's limits to microvm.nix's values; these let it
#   without CAP_SYS_RESOURCE), and udev rules giving `/dev/kvm`,
#   `/dev/vhost-net` and `/dev/vhost-vsock` to the `kvm` group, world-usable
#   like `/dev/net/tun`, as systemd's own rules do on NixOS.
# - On nodes that run VMs, `nomad-microvm-shutdown.service`: at host shutdown
#   (after the agent has stopped) its `ExecStop`, `nomad-driver-microvm stop-all`,
#   shuts every VM down gracefully (`driver.defaultStopTimeout` each, at once),
#   recording why; after the boot the agent recovers the tasks and restarts
#   them by their restart policy. A switch never stops it.
# - With `bridge.enable`: the bridge and its uplinks are kept from dhcpcd
#   (`networking.dhcpcd.denyInterfaces`, for NixOS's scripted networking), the
#   uplinks' networkd file sorts before NixOS's own `40-<interface>`, and
#   an uplink that `networking.interfaces` gives addresses or DHCP is named in
#   a warning (those belong on the bridge: `bridge.addresses`, `bridge.dhcp`).
# - With `gitfront.enable`: builds of pushed flakes must run in the Nix
#   sandbox: an assertion refuses `nix.settings.sandbox = false`; `"relaxed"`
#   and a gitfront user in `nix.settings.trusted-users` get warnings.
#
# ### Options (`services.nomad-microvm.*`)
#
# | option | default | meaning |
# | --- | --- | --- |
# | `enable` | `false` | the Nomad agent with the driver on this host |
# | `package` | this flake's `nomad-driver-microvm` | the plugin; its `bin/` holds only the plugin |
# | `role` | `"both"` | `"server"`, `"client"` (runs VMs) or `"both"` |
# | `servers` | `[ ]` | addresses of the Nomad servers (`server_join.retry_join`); empty: a one-node cluster |
# | `bootstrapExpect` | `max 1 (length servers)` | `server.bootstrap_expect` |
# | `datacenter` | `"dc1"` | the node's datacenter |
# | `nodeMeta` | `{ }` | `client.meta`, for job constraints |
# | `denyCloudFingerprinters` | `false` | skip Nomad's AWS/GCE/Azure/DigitalOcean probes of 169.254.169.254 |
# | `disableUpdateCheck` | `true` | Nomad's `disable_update_check` |
# | `openFirewall` | `false` | open 4646 (all nodes), 4647 and 4648 (servers) |
# | `kernelModules` | `[ "kvm" "tun" "tap" "vhost_net" ]` | loaded at boot; add your CPU's `kvm-intel`/`kvm-amd` |
# | `createVmmUser` | `true` | create `driver.vmmUser` in `driver.vmmGroup` |
# | `driver.stateDir` | `/var/lib/nomad-microvm` | plugin key `state_dir` |
# | `driver.vmmUser` / `driver.vmmGroup` | `microvm` / `kvm` | `vmm_user` / `vmm_group` |
# | `driver.allowRootVmm` | `false` | `allow_root_vmm` |
# | `driver.defaultBridge` | `bridge.name` if `bridge.enable`, else `null` | `default_bridge` |
# | `driver.allowedBridges` | `[ ]` | `allowed_bridges` |
# | `driver.virtiofsd` | `${pkgs.virtiofsd}/bin/virtiofsd` | `virtiofsd` |
# | `driver.nix` | `${config.nix.package}/bin/nix` | `nix` |
# | `driver.substituters` | `[ cache.url ]` if set | `substituters` |
# | `driver.trustedPublicKeys` | `cache.publicKeys` | `trusted_public_keys` |
# | `driver.defaultStopTimeout` | `"30s"` | `default_stop_timeout` |
# | `driver.gcrootsDir` | `/nix/var/nix/gcroots/nomad-microvm` (`null`: none) | `gcroots_dir` |
# | `driver.allowedRunnerRoots` | `[ "/nix/store" ]` | `allowed_runner_roots` |
# | `driver.allowedShareRoots` | `[ ]` | `allowed_share_roots` |
# | `driver.fingerprintPeriod` | `"30s"` | `fingerprint_period` |
# | `driver.stopWithoutAgentAfter` | `"45s"` (the driver's own default: `0s`, never) | `stop_without_agent_after`; keep it below the jobs' `stop_on_client_after` (gitfront's: `gitfront.settings.job.stopOnClientAfter`, 1m) |
# | `driver.execSshKeyFile` | `null` | `exec_ssh_key_file`; a path outside the store (`/run/keys/…`, agenix, sops-nix) |
# | `bridge.enable` | `false` | a bridge for the VMs' taps (systemd-networkd), the driver's default bridge |
# | `bridge.name` | `"vmbr0"` | its name |
# | `bridge.interfaces` | `[ ]` | uplinks enslaved to it (their addresses move to the bridge) |
# | `bridge.addresses` | `[ ]` | the host's addresses on it |
# | `bridge.dhcp` | `false` | DHCP client on the bridge |
# | `cache.path` | `null` | local dir of a `file://` binary cache (created and owned by the gitfront user where gitfront runs; other nodes only read it) |
# | `cache.url` | `file://<path>` | the cache gitfront pushes to and nodes fetch missing runners from |
# | `cache.publicKeys` | `[ ]` | keys runners must be signed with; empty accepts unsigned |
# | `cache.signingKeyFile` | `null` | secret key file gitfront signs pushes with (`secret-key=` on its cache URL) |
# | `gitfront.enable` | `false` | gitfront behind sshd on this node |
# | `gitfront.package` | this flake's `gitfront` | |
# | `gitfront.user` | `"git"` | the ssh user tenants push to (`git@host:repo`) |
# | `gitfront.users.<name>.sshKeys` | `[ ]` | tenants and their keys; each key's forced command is `gitfront serve --user <name>` |
# | `gitfront.settings.*` | gitfront's defaults | every key of `/etc/gitfront.toml`: `reposRoot`, `stateDir`, `binaryCache` (default: `cache.url`), `path` (default: git, tar, gzip, coreutils, nix), `nomad.{address, tokenFile, datacenters, namespace, requestTimeout, deployTimeout}`, `build.{allowedInputSchemes, command, evalCommand, lockCommand, copyCommand, timeout, logTailLines}`, `job.{cpuPerVcpu, memoryOverhead, killTimeout, stopOnClientAfter}`, `limits.{maxPushBytes, maxVcpu, maxMem}` |
#
# `driver/plugin-config.nix` and `gitfront/config.nix` hold these option
# tables (names, types, defaults) with builtins only; `tests/e2e/nixos_module.rs`
# renders them and runs `nomad-driver-microvm check-config`,
# `gitfront check-config` and a real Nomad agent on the result, so a key
# added to a binary but not to the module fails the tests. Where the module's
# default differs from the binary's (`driver.virtiofsd`, `driver.nix`,
# `driver.stopWithoutAgentAfter`), that test lists the difference.
#
# ### The flake
#
# `packages.<system>.{nomad-driver-microvm, gitfront, default}`,
# `overlays.default`, `nixosModules.default` (the module with this flake's
# packages; `nixosModules.nomad-microvm` is the module alone), `devShells.default`,
# `formatter` (nixpkgs-fmt) and `checks`: both packages, the format check and
# `vm`, a NixOS VM test that boots a host with the module, pushes a flake
# (github inputs, locked to this flake's own nixpkgs and microvm.nix, which the
# test VM finds in its store) through gitfront over ssh and waits for the
# microVM's Nomad allocation, its console line in `nomad alloc logs` and a ping
# over the bridge. The VM test needs nested KVM (microvm.nix's qemu runs with
# `-enable-kvm` inside the test VM; the test stops early, with the driver's
# KVM message, where there is none) and network access for nixpkgs and
# microvm.nix; no `flake.lock` is committed (it could not be made offline):
# `nix flake lock` writes one.

{ config, lib, pkgs, ... }:
let
  cfg = config.services.nomad-microvm;
  inherit (lib) mkOption mkEnableOption mkIf mkMerge mkDefault types literalExpression;

  plugin = import ./driver/plugin-config.nix;
  front = import ./gitfront/config.nix;
  toml = pkgs.formats.toml { };

  isServer = cfg.role != "client";
  isClient = cfg.role != "server";

  # A file path given as a string: never a Nix path literal, which would copy
  # the (secret) file into the world-readable store.
  secretFile = types.nullOr (types.strMatching "/.*");
  inStore = p: p != null && lib.hasPrefix builtins.storeDir p;

  # services.nomad-microvm.driver.<name>: one option per plugin config key,
  # typed from driver/plugin-config.nix's table: exactly what its `render`
  # accepts (tests/e2e/nixos_module.rs checks the driver refuses what this
  # refuses).
  driverOptionType = name: o:
    let
      pattern = plugin.patternOf o.kind;
      scalar = if pattern == null then types.str else types.strMatching pattern;
      base =
        if o.kind == "bool" then types.bool
        else if plugin.isList o.kind then types.listOf scalar
        else if lib.hasPrefix "null" o.kind then types.nullOr scalar
        else scalar;
    in
    types.addCheck base (plugin.valid name);

  # Where a NixOS host knows better than the driver's built-in default.
  hostDefaults = {
    virtiofsd = {
      default = "${pkgs.virtiofsd}/bin/virtiofsd";
      defaultText = literalExpression ''"''${pkgs.virtiofsd}/bin/virtiofsd"'';
    };
    nix = {
      default = "${config.nix.package}/bin/nix";
      defaultText = literalExpression ''"''${config.nix.package}/bin/nix"'';
    };
    defaultBridge = {
      default = if cfg.bridge.enable then cfg.bridge.name else null;
      defaultText = literalExpression "if bridge.enable then bridge.name else null";
    };
    substituters = {
      default = lib.optional (cfg.cache.url != null) cfg.cache.url;
      defaultText = literalExpression "lib.optional (cache.url != null) cache.url";
    };
    trustedPublicKeys = {
      default = cfg.cache.publicKeys;
      defaultText = literalExpression "cache.publicKeys";
    };
    # The driver's own default is 0s (never), right for a lone `nomad agent
    # -dev`; on a cluster a node whose agent stays dead while the machine
    # runs would keep its VMs beside their replacements. 45s: shorter than
    # gitfront's `job.stopOnClientAfter` (1m), and far longer than the agent
    # is away during a restart (`nixos-rebuild switch` restarts it in
    # seconds; the plugin renews the lease every 2s while an agent is
    # connected).
    stopWithoutAgentAfter = {
      default = "45s";
      description = "Plugin config key `stop_without_agent_after`: ${plugin.options.stopWithoutAgentAfter.description} The module's default (45s; the driver's own is 0s) is shorter than gitfront's `job.stopOnClientAfter` (1m) and much longer than an agent restart; the module warns where it is 0 or, on a gitfront node, not shorter than `gitfront.settings.job.stopOnClientAfter`.";
    };
  };

  driverOptions = lib.mapAttrs
    (name: o: mkOption ({
      type = driverOptionType name o;
      inherit (o) default;
      description = "Plugin config key `${o.key}`: ${o.description}";
    } // (hostDefaults.${name} or { })))
    plugin.options;

  # services.nomad-microvm.gitfront.settings.*: one option per key of
  # gitfront.toml, typed from gitfront/config.nix's table.
  frontOptionType = o:
    let
      pattern = front.patternOf o.kind;
      str = if pattern == null then types.str else types.strMatching pattern;
      base =
        if o.kind == "uint" || o.kind == "positive" then types.ints.between (front.minOf o) (front.maxOf o)
        else if o.kind == "argv" || o.kind == "nonEmptyList" then types.nonEmptyListOf str
        else if o.kind == "nullPath" then secretFile
        else str;
    in
    types.addCheck base (front.validLeaf o);

  frontHostDefaults = {
    binaryCache = {
      default =
        if cfg.cache.url == null then front.options.binaryCache.default
        else if cfg.cache.signingKeyFile == null then cfg.cache.url
        else "${cfg.cache.url}${if lib.hasInfix "?" cfg.cache.url then "&" else "?"}secret-key=${cfg.cache.signingKeyFile}";
      defaultText = literalExpression "cache.url, with `secret-key=` cache.signingKeyFile when set";
    };
    path = {
      default = lib.makeBinPath [ pkgs.git pkgs.gnutar pkgs.gzip pkgs.coreutils config.nix.package ];
      defaultText = literalExpression "lib.makeBinPath [ pkgs.git pkgs.gnutar pkgs.gzip pkgs.coreutils config.nix.package ]";
    };
  };

  frontOptions = path: opts: lib.mapAttrs
    (name: o:
      if front.isLeaf o then
        mkOption
          ({
            type = frontOptionType o;
            inherit (o) default;
            description = "gitfront.toml `${lib.concatStringsSep "." (path ++ [ o.key ])}`: ${o.description}";
          } // lib.optionalAttrs (path == [ ]) (frontHostDefaults.${name} or { }))
      else frontOptions (path ++ [ name ]) o)
    opts;

  # The authorized_keys line that lets `key` act as tenant `name`, and only
  # through gitfront.
  authorizedKey = name: key: front.authorizedKey {
    gitfront = lib.getExe' cfg.gitfront.package "gitfront";
    configFile = "/etc/gitfront.toml";
    user = name;
    inherit key;
  };

  vmmUserIsName = builtins.match "[0-9]+" cfg.driver.vmmUser == null && cfg.driver.vmmUser != "root";
  vmmGroupIsName = builtins.match "[0-9]+" cfg.driver.vmmGroup == null;

  cloudFingerprinters = [ "env_aws" "env_gce" "env_azure" "env_digitalocean" ];

  # Seconds in a duration: Go's syntax ("1m30s", "1.5h", "250ms", "0"), of
  # which gitfront's is a subset; the option types have checked the shape.
  durationSeconds = d:
    let
      unit = { ns = 1.0e-9; us = 1.0e-6; "µs" = 1.0e-6; ms = 1.0e-3; s = 1.0; m = 60.0; h = 3600.0; };
      int = s: builtins.fromJSON (builtins.head (builtins.match "0*([0-9]+)" s));
      frac = s: if s == null || s == "" then 0.0 else builtins.fromJSON "0.${s}";
      parts = builtins.filter builtins.isList (builtins.split "([0-9]+)([.]([0-9]*))?(ns|us|µs|ms|s|m|h)" d);
    in
    builtins.foldl' (acc: p: acc + (int (builtins.elemAt p 0) + frac (builtins.elemAt p 2)) * unit.${builtins.elemAt p 3}) 0.0 parts;

  stopWithoutAgent = durationSeconds cfg.driver.stopWithoutAgentAfter;
  stopOnClient = durationSeconds cfg.gitfront.settings.job.stopOnClientAfter;

  # The options that name secret files (option path -> value): none may be
  # in the store. gitfront reads its own; the agent (root) reads the driver's.
  gitfrontSecretFiles = {
    "cache.signingKeyFile" = cfg.cache.signingKeyFile;
    "gitfront.settings.nomad.tokenFile" = cfg.gitfront.settings.nomad.tokenFile;
  };
  secretFiles = gitfrontSecretFiles // { "driver.execSshKeyFile" = cfg.driver.execSshKeyFile; };

  # NixOS mounts /run/keys root:keys 0750: secret files there are readable
  # by the gitfront user only through the `keys` group.
  secretsInRunKeys = builtins.any (p: p != null && lib.hasPrefix "/run/keys/" p)
    (builtins.attrValues gitfrontSecretFiles);

  # Uplinks the host also configures itself: their addresses or DHCP leases
  # would land on a bridge port, where they do not work.
  configuredUplinks = builtins.filter
    (i:
      let c = config.networking.interfaces.${i} or null; in
      c != null && (c.ipv4.addresses != [ ] || c.ipv6.addresses != [ ] || c.useDHCP == true))
    cfg.bridge.interfaces;

  trustedUsers = config.nix.settings.trusted-users or [ ];
  nixSandbox = config.nix.settings.sandbox or true;
in
{
  options.services.nomad-microvm = {
    enable = mkEnableOption "a Nomad agent that runs microvm.nix runners with nomad-driver-microvm";

    package = mkOption {
      type = types.package;
      default = pkgs.nomad-driver-microvm;
      defaultText = literalExpression "pkgs.nomad-driver-microvm";
      description = "The driver plugin package; its `bin/` must hold only `nomad-driver-microvm` (Nomad starts every executable in its plugin dir).";
    };

    role = mkOption {
      type = types.enum [ "server" "client" "both" ];
      default = "both";
      description = "Whether this host is a Nomad server, a client that runs VMs, or both.";
    };

    servers = mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [ "10.0.0.1" "10.0.0.2" "10.0.0.3" ];
      description = "Addresses (`host` or `host:port`) of the Nomad servers; servers and clients join them (`server_join.retry_join`). Empty: a single node that is its own server.";
    };

    bootstrapExpect = mkOption {
      type = types.ints.positive;
      default = lib.max 1 (builtins.length cfg.servers);
      defaultText = literalExpression "max 1 (length servers)";
      description = "How many servers the cluster waits for before electing a leader (`server.bootstrap_expect`).";
    };

    datacenter = mkOption {
      type = types.str;
      default = "dc1";
      description = "Nomad datacenter of this node; jobs name it.";
    };

    nodeMeta = mkOption {
      type = types.attrsOf types.str;
      default = { };
      example = { rack = "r1"; };
      description = "Client metadata (`client.meta`), for job constraints.";
    };

    denyCloudFingerprinters = mkOption {
      type = types.bool;
      default = false;
      description = "Disable Nomad's cloud fingerprinters (${lib.concatStringsSep ", " cloudFingerprinters}), which probe 169.254.169.254 and delay the first registration where no metadata service answers.";
    };

    disableUpdateCheck = mkOption {
      type = types.bool;
      default = true;
      description = "Nomad's `disable_update_check`.";
    };

    openFirewall = mkOption {
      type = types.bool;
      default = false;
      description = "Open Nomad's ports: HTTP 4646 on every node; RPC 4647 and Serf 4648 (TCP and UDP) on servers.";
    };

    kernelModules = mkOption {
      type = types.listOf types.str;
      default = [ "kvm" "tun" "tap" "vhost_net" ];
      description = "Kernel modules loaded at boot: taps, macvtaps and vhost-net. Load your CPU's `kvm-intel` or `kvm-amd` too (nixos-generate-config puts it in hardware-configuration.nix).";
    };

    createVmmUser = mkOption {
      type = types.bool;
      default = true;
      description = "Create `driver.vmmUser` as a system user in `driver.vmmGroup` (microvm.nix's `microvm:kvm`). Off: declare them yourself.";
    };

    driver = driverOptions;

    bridge = {
      enable = mkOption {
        type = types.bool;
        default = false;
        description = "Create a bridge for the VMs' taps with systemd-networkd; it becomes the driver's default bridge.";
      };
      name = mkOption {
        type = types.strMatching plugin.patterns.ifname;
        default = "vmbr0";
        description = "Name of the bridge.";
      };
      interfaces = mkOption {
        type = types.listOf types.str;
        default = [ ];
        example = [ "eth0" ];
        description = "Host interfaces enslaved to the bridge (uplinks), so VMs share their network. Their addresses belong on the bridge then: set `addresses` or `dhcp`.";
      };
      addresses = mkOption {
        type = types.listOf types.str;
        default = [ ];
        example = [ "192.0.2.1/24" ];
        description = "Addresses of the host on the bridge (CIDR).";
      };
      dhcp = mkOption {
        type = types.bool;
        default = false;
        description = "Run networkd's DHCP client on the bridge (for an uplinked bridge on a DHCP network).";
      };
    };

    cache = {
      path = mkOption {
        type = types.nullOr (types.strMatching "/.*");
        default = null;
        example = "/srv/nix-cache";
        description = "Local directory of a `file://` binary cache (on a filesystem every node mounts, or on the one node that both builds and runs); created if missing, writable by the gitfront user. Sets `url`.";
      };
      url = mkOption {
        type = types.nullOr (types.strMatching plugin.patterns.storeUrl);
        default = if cfg.cache.path != null then "file://${cfg.cache.path}" else null;
        defaultText = literalExpression ''if path != null then "file://''${path}" else null'';
        example = "https://cache.example.org";
        description = "The binary cache: gitfront pushes runners to it, nodes fetch missing runners from it (the driver's default `substituters`).";
      };
      publicKeys = mkOption {
        type = types.listOf types.str;
        default = [ ];
        example = [ "cache.example.org-1:AbCd…=" ];
        description = "Public keys runners from the cache must be signed with (the driver's default `trustedPublicKeys`). Empty accepts unsigned paths: trust then comes from who can write the cache.";
      };
      signingKeyFile = mkOption {
        type = secretFile;
        default = null;
        example = "/run/keys/nix-cache.sec";
        description = "Secret key (`nix key generate-secret`) gitfront signs what it pushes with (added to its `binaryCache` URL as `secret-key=`). A path read at run time, readable by the gitfront user; never copied to the store.";
      };
    };

    gitfront = {
      enable = mkOption {
        type = types.bool;
        default = false;
        description = "Accept `git push` of flakes over ssh on this node: each pushed branch names a host of the flake, whose runner is built, copied to the binary cache and run as a Nomad job.";
      };
      package = mkOption {
        type = types.package;
        default = pkgs.gitfront;
        defaultText = literalExpression "pkgs.gitfront";
        description = "The gitfront package.";
      };
      user = mkOption {
        type = types.str;
        default = "git";
        description = "System user whose ssh logins run gitfront: tenants push to `<user>@<host>:<repo>`. It owns the repos, gitfront's state and a local binary cache.";
      };
      users = mkOption {
        type = types.attrsOf (types.submodule {
          options.sshKeys = mkOption {
            type = types.listOf (types.addCheck types.str front.validKey);
            default = [ ];
            description = "Public ssh keys of this tenant; each may only run gitfront as this tenant.";
          };
        });
        default = { };
        example = literalExpression ''{ alice.sshKeys = [ "ssh-ed25519 AAAA… alice@laptop" ]; }'';
        description = "Tenants, by name (lower-case letters, digits and '-', starting with a letter, at most 32 bytes). Each has own repos and Nomad namespaces (`settings.nomad.namespace`).";
      };
      settings = frontOptions [ ] front.options;
    };
  };

  config = mkIf cfg.enable (mkMerge [
    {
      assertions = [
        {
          assertion = cfg.role != "client" || cfg.servers != [ ];
          message = "services.nomad-microvm: a client-only node needs `servers` to join.";
        }
      ] ++ lib.mapAttrsToList
        (option: path: {
          assertion = !(inStore path);
          message = "services.nomad-microvm.${option} must not be in the Nix store (it is world-readable there).";
        })
        secretFiles
      ++ map
        (name: {
          assertion = builtins.match "[a-z][a-z0-9-]{0,31}" name != null;
          message = "services.nomad-microvm.gitfront.users: ${name} is not a gitfront user name (lower-case letters, digits and '-', starting with a letter, at most 32 bytes).";
        })
        (builtins.attrNames cfg.gitfront.users);

      services.nomad = {
        enable = true;
        # The driver creates taps and starts virtiofsd: the agent runs as root.
        dropPrivileges = false;
        enableDocker = mkDefault false;
        settings = {
          datacenter = cfg.datacenter;
          disable_update_check = cfg.disableUpdateCheck;
          server = mkIf isServer ({
            enabled = true;
            bootstrap_expect = cfg.bootstrapExpect;
          } // lib.optionalAttrs (cfg.servers != [ ]) {
            server_join.retry_join = cfg.servers;
          });
        };
      };

      networking.firewall = mkIf cfg.openFirewall {
        allowedTCPPorts = [ 4646 ] ++ lib.optionals isServer [ 4647 4648 ];
        allowedUDPPorts = lib.optionals isServer [ 4648 ];
      };
    }

    (mkIf isClient {
      services.nomad = {
        extraSettingsPlugins = [ cfg.package ];
        # `nomad alloc exec <alloc> <command>` (and script checks) run ssh
        # into the guest over vsock from the plugin, which has the agent's PATH.
        extraPackages = [ pkgs.openssh ];
        settings = plugin.agentSettings cfg.driver // {
          client = {
            enabled = true;
            meta = cfg.nodeMeta;
          } // lib.optionalAttrs (cfg.servers != [ ]) {
            server_join.retry_join = cfg.servers;
          } // lib.optionalAttrs cfg.denyCloudFingerprinters {
            options."fingerprint.denylist" = lib.concatStringsSep "," cloudFingerprinters;
          };
        };
      };

      warnings =
        lib.optional (stopWithoutAgent == 0)
          "services.nomad-microvm.driver.stopWithoutAgentAfter is ${cfg.driver.stopWithoutAgentAfter} (never): if this node's Nomad agent stays dead while the machine runs on, its VMs keep running beside the replacements the servers place on other nodes. Set it below the jobs' disconnect.stop_on_client_after (gitfront's: gitfront.settings.job.stopOnClientAfter, default 1m)."
        ++ lib.optional (cfg.gitfront.enable && stopWithoutAgent != 0 && stopWithoutAgent >= stopOnClient)
          "services.nomad-microvm.driver.stopWithoutAgentAfter (${cfg.driver.stopWithoutAgentAfter}) is not shorter than gitfront.settings.job.stopOnClientAfter (${cfg.gitfront.settings.job.stopOnClientAfter}): a node whose Nomad agent died may still run a VM when the servers start its replacement elsewhere. Make it shorter (on every node that runs gitfront's jobs).";

      assertions = [{
        assertion = (config.systemd.services.nomad.serviceConfig.KillMode or "control-group") == "process";
        message = "services.nomad-microvm: systemd.services.nomad.serviceConfig.KillMode must be \"process\": the VMs' supervisors live in nomad.service's cgroup, and any other mode kills every VM whenever the agent stops or restarts (`systemctl restart nomad`, `nixos-rebuild switch`).";
      }];

      # At host shutdown the VMs must go down gracefully: they outlive the
      # agent on purpose (above), so nothing else would stop them before
      # systemd's final SIGTERM/SIGKILL sweep. Ordered before nomad.service,
      # this unit stops after it: the agent is gone by then and does not
      # restart what stops; after the boot it recovers the tasks, reads the
      # recorded exits and restarts them by their restart policy. Never
      # stopped by a switch (that would stop every VM).
      systemd.services.nomad-microvm-shutdown = {
        description = "Graceful shutdown of this node's microVMs when the host shuts down";
        wantedBy = [ "multi-user.target" ];
        before = [ "nomad.service" ];
        restartIfChanged = false;
        stopIfChanged = false;
        serviceConfig = {
          Type = "oneshot";
          RemainAfterExit = true;
          ExecStart = "${pkgs.coreutils}/bin/true";
          ExecStop = "${cfg.package}/bin/nomad-driver-microvm stop-all ${cfg.driver.stateDir} ${cfg.driver.defaultStopTimeout}";
          # Every VM gets the stop timeout at once, then TERM and KILL.
          TimeoutStopSec = toString (builtins.ceil (durationSeconds cfg.driver.defaultStopTimeout) + 30);
        };
      };

      systemd.services.nomad.serviceConfig = {
        # VMs outlive their agent: the plugin starts each VM's supervisor in
        # its own session, but systemd still counts it in nomad.service's
        # cgroup. KillMode=process (nixpkgs' value, pinned here) signals only
        # the agent on stop and restart, so `systemctl restart nomad` and
        # `nixos-rebuild switch` leave the VMs running and the restarted
        # agent recovers them; `control-group` or `mixed` would kill them all.
        KillMode = lib.mkOverride 90 "process";
        # The driver raises RLIMIT_NOFILE to 1048576 and RLIMIT_MEMLOCK to
        # infinity for the VMM and virtiofsd (microvm.nix's unit limits)
        # itself. Above the hard limits it inherits from this unit that takes
        # CAP_SYS_RESOURCE, which a root agent has; these hard limits make it
        # work without it (a container, a unit with a capability bounding
        # set). The agent's soft NOFILE stays nixpkgs' 65536. (microvm.nix's
        # PAM memlock limits for its user count only in PAM sessions, not
        # for processes the agent starts.)
        LimitNOFILE = lib.mkOverride 90 "65536:1048576";
        LimitMEMLOCK = "infinity";
      };

      # The devices the VMM (driver.vmmUser, whose only group is
      # driver.vmmGroup) opens: systemd's own rules (50-udev-default.rules)
      # as NixOS builds them, restated so they do not hang on systemd's
      # build options or version (older ones left /dev/vhost-vsock root-only).
      # World-usable like there: the VMM gets no supplementary groups, and
      # Nix builds with the `kvm` system feature (nixbld users) use /dev/kvm.
      services.udev.extraRules = ''
        SUBSYSTEM=="misc", KERNEL=="kvm", GROUP="kvm", MODE="0666", OPTIONS+="static_node=kvm"
        SUBSYSTEM=="misc", KERNEL=="vhost-net", GROUP="kvm", MODE="0666", OPTIONS+="static_node=vhost-net"
        SUBSYSTEM=="misc", KERNEL=="vhost-vsock", GROUP="kvm", MODE="0666", OPTIONS+="static_node=vhost-vsock"
        SUBSYSTEM=="misc", KERNEL=="tun", MODE="0666", OPTIONS+="static_node=net/tun"
      '';

      boot.kernelModules = cfg.kernelModules;

      users.users = mkIf (cfg.createVmmUser && vmmUserIsName) {
        ${cfg.driver.vmmUser} = {
          isSystemUser = true;
          group = cfg.driver.vmmGroup;
          description = "microVM hypervisors (nomad-driver-microvm)";
        };
      };
      users.groups = mkIf (cfg.createVmmUser && vmmGroupIsName) {
        ${cfg.driver.vmmGroup} = { };
      };

      systemd.tmpfiles.rules = [ "d ${cfg.driver.stateDir} 0755 root root - -" ];
    })

    (mkIf cfg.bridge.enable {
      systemd.network = {
        enable = true;
        netdevs."40-${cfg.bridge.name}".netdevConfig = {
          Name = cfg.bridge.name;
          Kind = "bridge";
        };
        networks."40-${cfg.bridge.name}" = {
          matchConfig.Name = cfg.bridge.name;
          address = cfg.bridge.addresses;
          networkConfig = {
            DHCP = if cfg.bridge.dhcp then "yes" else "no";
            # Addresses come up before the first VM's tap joins.
            ConfigureWithoutCarrier = true;
          };
          # A bridge without uplinks has no carrier until a VM runs: it must
          # not hold back network-online.target (Nomad starts after it).
          linkConfig.RequiredForOnline = if cfg.bridge.interfaces == [ ] then "no" else "routable";
        };
        # Before NixOS's own "40-<interface>" (networking.interfaces.* with
        # networkd): networkd takes the first file that matches, and an
        # uplink must be a port, whatever else configures it.
        networks."30-${cfg.bridge.name}-ports" = mkIf (cfg.bridge.interfaces != [ ]) {
          matchConfig.Name = lib.concatStringsSep " " cfg.bridge.interfaces;
          networkConfig.Bridge = cfg.bridge.name;
          linkConfig.RequiredForOnline = "enslaved";
        };
      };
      # Where networkd manages nothing but a bridge without uplinks, its
      # wait-online would wait for a link that never comes online.
      systemd.network.wait-online.enable = mkIf (!config.networking.useNetworkd && cfg.bridge.interfaces == [ ]) (mkDefault false);

      # With NixOS's scripted networking (networking.useDHCP, the default)
      # dhcpcd runs on every interface it finds: on an uplink it would take
      # a lease on a bridge port, and on the bridge compete with networkd
      # (dhcpcd skips bridges and taps by itself only while it has no
      # per-interface config). The VMs' taps are never the host's.
      networking.dhcpcd.denyInterfaces = [ cfg.bridge.name ] ++ cfg.bridge.interfaces;

      warnings = map
        (i: "services.nomad-microvm.bridge.interfaces: ${i} is a port of ${cfg.bridge.name}, but networking.interfaces.${i} gives it addresses or DHCP, which a bridge port cannot use (and which are not applied to it). Put the host's addresses on the bridge: bridge.addresses or bridge.dhcp.")
        configuredUplinks;
    })

    (mkIf cfg.gitfront.enable {
      # Pushed flakes are anyone's code: their derivations must build in the
      # Nix sandbox (no network, nothing of the host but the build inputs).
      assertions = [{
        assertion = nixSandbox != false;
        message = "services.nomad-microvm.gitfront: nix.settings.sandbox is false, so the derivations of pushed flakes would build outside the Nix sandbox, with the network and the host's files. Keep the sandbox on (NixOS's default).";
      }];
      warnings =
        lib.optional (nixSandbox == "relaxed")
          "services.nomad-microvm.gitfront: nix.settings.sandbox is \"relaxed\": a pushed flake's derivation with `__noChroot = true` builds outside the sandbox. Set it to true."
        ++ lib.optional (builtins.any (u: builtins.elem u trustedUsers) [ cfg.gitfront.user "@${cfg.gitfront.user}" "*" ])
          "services.nomad-microvm.gitfront: the gitfront user ${cfg.gitfront.user} is in nix.settings.trusted-users: trusted users may turn the sandbox off for their builds and are as good as root on this node. Remove it.";

      # What gitfront reads; no secret in it, only paths of secret files.
      environment.etc."gitfront.toml".source = toml.generate "gitfront.toml" (front.render cfg.gitfront.settings);
      environment.systemPackages = [ cfg.gitfront.package ];

      users.users.${cfg.gitfront.user} = {
        isSystemUser = true;
        group = cfg.gitfront.user;
        home = cfg.gitfront.settings.stateDir;
        # sshd runs the forced command through the login shell.
        shell = pkgs.bashInteractive;
        openssh.authorizedKeys.keys = lib.concatLists (lib.mapAttrsToList
          (name: tenant: map (authorizedKey name) tenant.sshKeys)
          cfg.gitfront.users);
        extraGroups = lib.optional secretsInRunKeys "keys";
      };
      users.groups.${cfg.gitfront.user} = { };

      systemd.tmpfiles.rules = [
        "d ${cfg.gitfront.settings.stateDir} 0750 ${cfg.gitfront.user} ${cfg.gitfront.user} - -"
        "d ${cfg.gitfront.settings.reposRoot} 0750 ${cfg.gitfront.user} ${cfg.gitfront.user} - -"
      ];

      services.openssh.enable = true;
    })

    # Only the node that writes the cache (gitfront) creates and owns it:
    # tmpfiles `d` also resets the owner of an existing directory, so a rule
    # on every node would take a shared cache away from gitfront at each boot.
    (mkIf (cfg.cache.path != null && cfg.gitfront.enable) {
      systemd.tmpfiles.rules = [
        "d ${cfg.cache.path} 0755 ${cfg.gitfront.user} root - -"
      ];
    })
  ]);
}

# gitfront's TOML config (gitfront/src/config.rs) as the NixOS module sees
# it: one option per key, under services.nomad-microvm.gitfront.settings.
#
# builtins only (no nixpkgs, no lib): nixos-module.nix imports it to declare
# the options and to render the TOML (through pkgs.formats.toml), and
# tests/e2e/nixos_module.rs evaluates it with `nix-instantiate --eval`,
# writes the result as TOML and runs `gitfront check-config` on it, so a key
# added, renamed or removed on either side fails that test.
let
  # Value shapes with the regex the module's option type enforces and
  # `valid` checks; they restate gitfront's own checks.
  patterns = {
    path = "/.*";
    storeUrl = "[a-z][a-z0-9+.-]*://.*";
    # A PATH of absolute directories.
    searchPath = "/[^:]*(:/[^:]*)*";
    # Plain HTTP only: gitfront has no TLS.
    httpUrl = "http://[^/].*";
    # gitfront's durations: whole numbers of ms, s, m or h ("30s", "1m30s").
    duration = "([0-9]+(ms|s|m|h))+";
    # A Nomad namespace template using both placeholders.
    namespace = "[A-Za-z0-9-]*([{]user[}][A-Za-z0-9-]*[{]repo[}]|[{]repo[}][A-Za-z0-9-]*[{]user[}])[A-Za-z0-9-]*";
    nonEmpty = ".+";
    # build.confinement (gitfront/src/confine.rs).
    confinement = "landlock|none";
  };

  # nix flags of the default build, eval and lock commands (gitfront's
  # EVAL_FLAGS): what keeps a pushed flake from reading local files.
  evalFlags = [
    "--no-use-registries"
    "--option"
    "accept-flake-config"
    "false"
    "--option"
    "restrict-eval"
    "true"
    "--option"
    "allowed-uris"
    "{allowed_uris}"
  ];

  # A leaf has `key` (its TOML name); any other attrset is a [section] whose
  # TOML name is its option name. `kind`:
  #   path, nullPath (null: key left out), storeUrl, searchPath, httpUrl,
  #   duration, namespace,
  #   confinement                  strings of those shapes
  #   nonEmptyList                 a non-empty list of non-empty strings
  #                                (each matching `pattern`, when given)
  #   argv                         a non-empty list of strings: an argv
  #                                template using each of `required` and
  #                                no placeholder outside `allowed`
  #                                (`{flake}#{attr}` stands for `{installable}`)
  #   uint, positive               integers >= 0 / >= 1 (u32 unless `max` says)
  options = {
    reposRoot = {
      key = "repos_root";
      kind = "path";
      default = "/var/lib/gitfront/repos";
      description = "Bare repos live at `<reposRoot>/<user>/<repo>.git`.";
    };
    stateDir = {
      key = "state_dir";
      kind = "path";
      default = "/var/lib/gitfront";
      description = "Scratch space (checkouts, hook dirs) and the GC roots of deployed runners.";
    };
    binaryCache = {
      key = "binary_cache";
      kind = "storeUrl";
      default = "file:///var/lib/gitfront/cache";
      description = "Nix store URL runners are copied to (`nix copy --to`); nodes fetch them from there.";
    };
    path = {
      key = "path";
      kind = "searchPath";
      default = "/run/current-system/sw/bin:/usr/local/bin:/usr/bin:/bin";
      description = "`PATH` for git, tar and nix: the only variable gitfront passes on.";
    };
    nomad = {
      address = {
        key = "address";
        kind = "httpUrl";
        default = "http://127.0.0.1:4646";
        description = "The Nomad HTTP API (like `NOMAD_ADDR`; plain HTTP).";
      };
      tokenFile = {
        key = "token_file";
        kind = "nullPath";
        default = null;
        description = "File holding the Nomad ACL token gitfront submits jobs with (like `NOMAD_TOKEN`); read at run time, readable by the gitfront user. null: no token.";
      };
      datacenters = {
        key = "datacenters";
        kind = "nonEmptyList";
        default = [ "*" ];
        description = "Datacenters the jobs may run in (`\"*\"`: all).";
      };
      namespace = {
        key = "namespace";
        kind = "namespace";
        default = "{user}-{repo}";
        description = "Nomad namespace per user and repo; `{user}` and `{repo}` are replaced.";
      };
      requestTimeout = {
        key = "request_timeout";
        kind = "duration";
        default = "10s";
        description = "Limit for each HTTP request to Nomad.";
      };
      deployTimeout = {
        key = "deploy_timeout";
        kind = "duration";
        default = "5m";
        description = "How long a push follows a deployment before it stops waiting.";
      };
    };
    build = {
      allowedInputSchemes = {
        key = "allowed_input_schemes";
        kind = "nonEmptyList";
        # Network schemes only (gitfront/src/flakelock.rs): path, git+file
        # and the other local ones are never allowed.
        pattern = "github|gitlab|sourcehut|git[+](https|http|ssh|git)|hg[+](https|http|ssh)|(tarball|file)[+](https|http)";
        default = [ "github" "gitlab" "sourcehut" "git+https" "tarball+https" "file+https" ];
        description = "Flake input schemes a pushed flake's inputs may use (checked in its flake.lock and in the lock nix computes); network schemes only.";
      };
      confinement = {
        key = "confinement";
        kind = "confinement";
        default = "landlock";
        description = "`landlock`: nix may open files only under the system dirs, the Nix store and the push's scratch dir while it evaluates and builds a pushed flake (needs Linux >= 5.13 with Landlock); `none`: no such confinement.";
      };
      command = {
        allowed = [ "{installable}" "{out_link}" "{flake}" "{attr}" "{allowed_uris}" ];
        required = [ "{installable}" "{out_link}" ];
        key = "command";
        kind = "argv";
        default = [ "nix" "--extra-experimental-features" "nix-command flakes" "build" ] ++ evalFlags ++ [ "--no-update-lock-file" "--out-link" "{out_link}" "{installable}" ];
        description = "argv that builds a runner; placeholders `{installable}` and `{out_link}` (required), `{flake}`, `{attr}`, `{allowed_uris}`.";
      };
      evalCommand = {
        allowed = [ "{installable}" "{apply}" "{flake}" "{attr}" "{allowed_uris}" ];
        required = [ "{installable}" "{apply}" ];
        key = "eval_command";
        kind = "argv";
        default = [ "nix" "--extra-experimental-features" "nix-command flakes" "eval" ] ++ evalFlags ++ [ "--no-update-lock-file" "--json" "{installable}" "--apply" "{apply}" ];
        description = "argv that evaluates a host's settings; placeholders `{installable}` and `{apply}` (required), `{flake}`, `{attr}`, `{allowed_uris}`.";
      };
      lockCommand = {
        allowed = [ "{flake}" "{store}" "{allowed_uris}" ];
        required = [ "{flake}" "{store}" ];
        key = "lock_command";
        kind = "argv";
        default = [ "nix" "--extra-experimental-features" "nix-command flakes" "flake" "metadata" ] ++ evalFlags ++ [ "--no-write-lock-file" "--json" "--store" "{store}" "{flake}" ];
        description = "argv that prints the flake's metadata (its lock as nix would use it) using a throwaway store; placeholders `{flake}` and `{store}` (required), `{allowed_uris}`.";
      };
      copyCommand = {
        allowed = [ "{cache}" "{path}" ];
        required = [ "{cache}" "{path}" ];
        key = "copy_command";
        kind = "argv";
        default = [ "nix" "--extra-experimental-features" "nix-command flakes" "copy" "--to" "{cache}" "{path}" ];
        description = "argv that copies a runner to the binary cache; placeholders `{cache}` and `{path}` (required).";
      };
      timeout = {
        key = "timeout";
        kind = "duration";
        default = "30m";
        description = "Limit for evaluating and building one pushed branch.";
      };
      logTailLines = {
        key = "log_tail_lines";
        kind = "uint";
        default = 30;
        description = "Lines of build output shown when a build fails.";
      };
    };
    job = {
      cpuPerVcpu = {
        key = "cpu_per_vcpu";
        kind = "positive";
        default = 1000;
        description = "Nomad CPU (MHz) reserved per guest vCPU.";
      };
      memoryOverhead = {
        key = "memory_overhead";
        kind = "uint";
        default = 64;
        description = "MiB reserved on top of the guest's memory (the VMM's own).";
      };
      killTimeout = {
        key = "kill_timeout";
        kind = "duration";
        default = "30s";
        description = "Time the guest gets to shut down gracefully.";
      };
      stopOnClientAfter = {
        key = "stop_on_client_after";
        kind = "duration";
        default = "1m";
        description = "A client cut off from the servers stops its VMs after this long.";
      };
    };
    limits = {
      maxPushBytes = {
        key = "max_push_bytes";
        kind = "positive";
        max = 9223372036854775807;
        default = 104857600;
        description = "Largest pack a push may send (bytes).";
      };
      maxVcpu = {
        key = "max_vcpu";
        kind = "positive";
        default = 8;
        description = "Most vCPUs a pushed VM may have.";
      };
      maxMem = {
        key = "max_mem";
        kind = "positive";
        default = 16384;
        description = "Most memory (MiB) a pushed VM may have.";
      };
    };
  };

  isLeaf = o: o ? key;

  # A placeholder as a regex: `{name}` -> `[{]name[}]`.
  escape = builtins.replaceStrings [ "{" "}" ] [ "[{]" "[}]" ];

  patternOf = kind:
    {
      path = patterns.path;
      nullPath = patterns.path;
      storeUrl = patterns.storeUrl;
      searchPath = patterns.searchPath;
      httpUrl = patterns.httpUrl;
      duration = patterns.duration;
      namespace = patterns.namespace;
      nonEmptyList = patterns.nonEmpty;
      confinement = patterns.confinement;
    }.${kind} or null;

  u32max = 4294967295;
  maxOf = o: o.max or u32max;
  minOf = o: if o.kind == "positive" then 1 else 0;

  matches = kind: v: builtins.isString v && (patternOf kind == null || builtins.match (patternOf kind) v != null);
  # The same, with the option's own `pattern` for list elements.
  matchesOption = o: v: matches o.kind v && (!(o ? pattern) || builtins.match o.pattern v != null);

  # An argv template's placeholders, as gitfront checks them.
  argvOk = o: argv:
    let
      joined = builtins.concatStringsSep " " argv;
      has = ph: builtins.match ".*${escape ph}.*" joined != null;
      present = ph: has ph || (ph == "{installable}" && has "{flake}" && has "{attr}");
      used = map builtins.head (builtins.filter builtins.isList (builtins.split "([{][^}]*[}])" joined));
    in
    builtins.all present o.required && builtins.all (ph: builtins.elem ph o.allowed) used;

  # Whether `value` is acceptable for the leaf option `o` (what the module's
  # type says, checked with builtins only).
  validLeaf = o: value:
    if o.kind == "uint" || o.kind == "positive" then builtins.isInt value && value >= minOf o && value <= maxOf o
    else if o.kind == "argv" || o.kind == "nonEmptyList" then
      builtins.isList value && value != [ ] && builtins.all (matchesOption o) value
      && (o.kind != "argv" || argvOk o value)
    else if value == null then o.kind == "nullPath"
    else matches o.kind value;

  # Walks options and values together; `f path option value` for each leaf.
  # Refuses values that are not options and options without a value.
  walk = f: prefix: opts: values:
    let
      given = builtins.filter (n: n != "_module") (builtins.attrNames values);
      unknown = builtins.filter (n: !(opts ? ${n})) given;
      missing = builtins.filter (n: !(values ? ${n})) (builtins.attrNames opts);
      where = if prefix == [ ] then "" else " in ${builtins.concatStringsSep "." prefix}";
    in
    if unknown != [ ] then throw "gitfront/config.nix: not gitfront options${where}: ${toString unknown}"
    else if missing != [ ] then throw "gitfront/config.nix: missing gitfront options${where}: ${toString missing}"
    else
      builtins.mapAttrs
        (n: o:
          if isLeaf o then f (prefix ++ [ n ]) o values.${n}
          else walk f (prefix ++ [ n ]) o values.${n})
        opts;

  leaves = prefix: opts: builtins.concatLists (map
    (n:
      let o = opts.${n}; in
      if isLeaf o then [ (prefix ++ [ n ]) ] else leaves (prefix ++ [ n ]) o)
    (builtins.attrNames opts));

  # Option paths ([ "nomad" "tokenFile" ] …) of every leaf.
  names = leaves [ ] options;

  optionAt = path: builtins.foldl' (o: n: o.${n}) options path;

  # Option values (nested like the options) -> the TOML document as an
  # attrset (sections are nested attrsets; null leaves are left out).
  render = values:
    let
      checked = walk
        (path: o: v:
          if validLeaf o v then { inherit o v; }
          else throw "gitfront/config.nix: invalid value for ${builtins.concatStringsSep "." path}")
        [ ]
        options
        values;
      toToml = opts: vals: builtins.listToAttrs (builtins.concatMap
        (n:
          let o = opts.${n}; c = vals.${n}; in
          if isLeaf o then (if c.v == null then [ ] else [{ name = o.key; value = c.v; }])
          else [{ name = n; value = toToml o c; }])
        (builtins.attrNames opts));
    in
    toToml options checked;

  # Public key types gitfront accepts in authorized_keys (gitfront/src/keys.rs).
  keyTypes = [
    "ssh-ed25519"
    "ssh-rsa"
    "ecdsa-sha2-nistp256"
    "ecdsa-sha2-nistp384"
    "ecdsa-sha2-nistp521"
    "sk-ssh-ed25519@openssh.com"
    "sk-ecdsa-sha2-nistp256@openssh.com"
  ];

  # One public key line (`<type> <base64> [comment]`), without options.
  validKey = key:
    let m = builtins.match "([^ ]+) +([A-Za-z0-9+/=]+)( +([^\"[:cntrl:]]*))?" key;
    in m != null && builtins.elem (builtins.head m) keyTypes;

  # The authorized_keys line that lets `key` act as `user`, and only through
  # gitfront, exactly as `gitfront authorized-key` writes it.
  authorizedKey = { gitfront, configFile, user, key }:
    let
      quote = s: "'${builtins.replaceStrings [ "'" ] [ "'\\''" ] s}'";
      m = builtins.match "([^ ]+) +([^ ]+)( +(.*[^ ]))? *" key;
      comment = builtins.elemAt m 3;
    in
    ''command="${quote gitfront} serve --config ${quote configFile} --user ${user}",restrict ''
    + "${builtins.elemAt m 0} ${builtins.elemAt m 1}${if comment == null then "" else " ${comment}"}";

  defaults =
    let d = opts: builtins.mapAttrs (_: o: if isLeaf o then o.default else d o) opts;
    in d options;
in
{
  inherit options patterns patternOf isLeaf names optionAt validLeaf render defaults u32max maxOf minOf;
  inherit keyTypes validKey authorizedKey;
  valid = path: validLeaf (optionAt path);
  # The TOML keys (dotted, section first) for comparing with gitfront's.
  keys = map (path: builtins.concatStringsSep "." ((builtins.genList (i: builtins.elemAt path i) (builtins.length path - 1)) ++ [ (optionAt path).key ])) names;
}

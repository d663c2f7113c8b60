{
  description = "nomad-microvm: NixOS microVMs on a Nomad cluster, deployed with git push";

  inputs = {
    nixpkgs.url = "github:NixOS/nixpkgs/nixos-25.11";
    # Only the VM test's guest uses microvm.nix, and only its guest module (a
    # plain path): no flake evaluation of it, so none of its own inputs.
    microvm = {
      url = "github:microvm-nix/microvm.nix";
      flake = false;
    };
  };

  outputs = { self, nixpkgs, microvm }:
    let
      inherit (nixpkgs) lib;
      systems = [ "x86_64-linux" "aarch64-linux" ];

      pkgsFor = system: import nixpkgs {
        inherit system;
        overlays = [ self.overlays.default ];
        # Nomad since 1.7 is under the BUSL, which nixpkgs counts as unfree.
        config.allowUnfreePredicate = pkg: lib.getName pkg == "nomad";
      };
      forAllSystems = f: lib.genAttrs systems (system: f (pkgsFor system));

      version = (lib.importTOML ./Cargo.toml).workspace.package.version;

      # One package per binary: Nomad starts every executable in its plugin
      # dir, so the driver's bin/ must hold the driver alone.
      crate = pkgs: name: description: pkgs.rustPlatform.buildRustPackage {
        pname = name;
        inherit version;
        src = lib.fileset.toSource {
          root = ./.;
          # The whole workspace (cargo reads every member's manifest).
          fileset = lib.fileset.unions [ ./Cargo.toml ./Cargo.lock ./build.rs ./proto ./driver ./gitfront ./tests ];
        };
        cargoLock.lockFile = ./Cargo.lock;
        cargoBuildFlags = [ "--package" name ];
        # build.rs compiles proto/ with protoc.
        nativeBuildInputs = [ pkgs.protobuf ];
        env.PROTOC = "${pkgs.protobuf}/bin/protoc";
        # The tests need root, network namespaces, a Nomad agent and qemu:
        # scripts/test.sh runs them.
        doCheck = false;
        meta = {
          inherit description;
          license = lib.licenses.mpl20;
          mainProgram = name;
          platforms = lib.platforms.linux;
        };
      };

      # The VM test: a NixOS host with the module (server, client, gitfront,
      # bridge, local binary cache) gets a flake pushed through gitfront over
      # ssh and runs its microVM as a Nomad job. Needs nested KVM: the
      # microVM's qemu runs inside the test VM with microvm.nix's
      # `-enable-kvm -cpu host` (no TCG fallback), so the machine running the
      # check must allow nested virtualisation (kvm_intel/kvm_amd nested=1).
      # To build it needs nixpkgs and microvm.nix from the network.
      vmTest = pkgs:
        let
          system = pkgs.stdenv.hostPlatform.system;
          keys = import "${nixpkgs}/nixos/tests/ssh-keys.nix" pkgs;

          # The tenant's guest, word for word what the pushed repo holds.
          guestModule = ''
            { lib, ... }:
            {
              networking.hostName = "testvm";
              system.stateVersion = lib.trivial.release;
              microvm = {
                hypervisor = "qemu";
                mem = 512;
                vcpu = 1;
                interfaces = [{ type = "tap"; id = "vm-testvm"; mac = "02:00:00:00:00:02"; }];
                shares = [{ proto = "virtiofs"; tag = "ro-store"; source = "/nix/store"; mountPoint = "/nix/.ro-store"; }];
              };
              # Its address on the host's bridge, from networkd (explicit:
              # not left to microvm.nix's optimize defaults).
              networking.useNetworkd = true;
              networking.useDHCP = false;
              systemd.network.enable = true;
              systemd.network.networks."10-lan" = {
                matchConfig.MACAddress = "02:00:00:00:00:02";
                address = [ "192.0.2.2/24" ];
              };
              # The console is the VMM's stdout, which the driver hands to
              # Nomad: `nomad alloc logs` shows this line.
              systemd.services.say-hello = {
                wantedBy = [ "multi-user.target" ];
                serviceConfig.Type = "oneshot";
                script = "echo nomad-microvm-guest-is-up > /dev/console";
              };
            }
          '';
          # The pushed flake: github inputs like a tenant's (gitfront takes
          # network schemes), the guest evaluated the same way as below, so
          # its runner is the one already in the test VM's store.
          guestFlake = ''
            {
              inputs.nixpkgs = { url = "github:NixOS/nixpkgs/nixos-25.11"; flake = false; };
              inputs.microvm = { url = "github:microvm-nix/microvm.nix"; flake = false; };
              outputs = { self, nixpkgs, microvm }: {
                nixosConfigurations.testvm = import "''${nixpkgs}/nixos/lib/eval-config.nix" {
                  system = null;
                  modules = [ "''${microvm}/nixos-modules/microvm" ./testvm.nix { nixpkgs.hostPlatform = "${system}"; } ];
                };
              };
            }
          '';
          # Its flake.lock, committed with it: the inputs locked to the very
          # sources this flake has. A locked input whose tree is in the store
          # (same narHash, same path) is taken from there, so the test VM,
          # which has no network, never fetches them.
          lockNode = src: original: {
            flake = false;
            locked = {
              inherit (original) type owner repo;
              rev = src.rev or (throw "checks.vm: the ${original.repo} input has no rev: use a github input");
              inherit (src) narHash lastModified;
            };
            inherit original;
          };
          guestLock = builtins.toJSON {
            nodes = {
              nixpkgs = lockNode nixpkgs { type = "github"; owner = "NixOS"; repo = "nixpkgs"; ref = "nixos-25.11"; };
              microvm = lockNode microvm { type = "github"; owner = "microvm-nix"; repo = "microvm.nix"; };
              root.inputs = { nixpkgs = "nixpkgs"; microvm = "microvm"; };
            };
            root = "root";
            version = 7;
          };
          guest = import "${nixpkgs}/nixos/lib/eval-config.nix" {
            system = null;
            modules = [
              "${microvm}/nixos-modules/microvm"
              (import (builtins.toFile "testvm.nix" guestModule))
              { nixpkgs.hostPlatform = system; }
            ];
          };
          repo = pkgs.runCommand "testvm-repo" { } ''
            mkdir $out
            cp ${builtins.toFile "flake.nix" guestFlake} $out/flake.nix
            cp ${builtins.toFile "flake.lock" guestLock} $out/flake.lock
            cp ${builtins.toFile "testvm.nix" guestModule} $out/testvm.nix
          '';
        in
        pkgs.testers.runNixOSTest {
          name = "nomad-microvm";
          nodes.host = { lib, pkgs, ... }: {
            imports = [ self.nixosModules.default ];
            virtualisation = {
              memorySize = 4096;
              cores = 2;
              diskSize = 8192;
              # The guest's runner, and the sources its locked inputs name.
              additionalPaths = [ guest.config.microvm.declaredRunner "${nixpkgs}" "${microvm}" repo ];
            };
            nix.settings = {
              experimental-features = [ "nix-command" "flakes" ];
              substituters = lib.mkForce [ ];
            };
            environment.systemPackages = [ pkgs.git pkgs.jq ];
            services.nomad-microvm = {
              enable = true;
              role = "both";
              # No metadata service answers in the test VM.
              denyCloudFingerprinters = true;
              bridge = {
                enable = true;
                addresses = [ "192.0.2.1/24" ];
              };
              cache.path = "/var/lib/nomad-microvm-cache";
              gitfront = {
                enable = true;
                users.alice.sshKeys = [ keys.snakeOilPublicKey ];
              };
            };
          };
          testScript = ''
            import json

            host.start()
            host.wait_for_unit("nomad.service")
            host.wait_until_succeeds(
                "nomad node status -self -json | jq -e '.Drivers.microvm.Healthy'", timeout=300
            )

            # The guest's qemu needs KVM here (nested): say so now rather than
            # after a push whose VM cannot start. udev loads kvm_intel or
            # kvm_amd where the CPU offers it; the driver's self-test tells
            # whether a guest really runs.
            host.execute("modprobe kvm_intel || modprobe kvm_amd")
            kvm = "nomad node status -self -json | jq -e '.Attributes.\"driver.microvm.kvm\" == \"true\"'"
            try:
                host.wait_until_succeeds(kvm, timeout=120)
            except Exception:
                health = host.succeed("nomad node status -self -json | jq -r .Drivers.microvm.HealthDescription")
                raise Exception(
                    "no usable KVM inside the test VM (run the check where nested virtualisation is on): "
                    + health
                )

            # alice pushes her flake (with its lock); the branch names the host.
            host.succeed(
                "install -D -m 600 ${keys.snakeOilPrivateKey} /root/.ssh/id_ecdsa",
                "cp -r ${repo} /root/fleet && chmod -R u+w /root/fleet",
                "cd /root/fleet && git init -q -b main && git add -A"
                + " && git -c user.name=alice -c user.email=alice@example.org commit -qm testvm",
            )
            host.wait_for_open_port(22)
            push = host.succeed(
                "cd /root/fleet && GIT_SSH_COMMAND='ssh -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null'"
                + " git push git@localhost:fleet HEAD:refs/heads/testvm 2>&1"
            )
            print(push)

            # Its VM runs as a Nomad job, in whatever namespace gitfront chose.
            allocs = "nomad operator api '/v1/allocations?namespace=*'"
            host.wait_until_succeeds(
                allocs + " | jq -e 'map(select(.ClientStatus == \"running\")) | length > 0'", timeout=900
            )
            alloc = next(a for a in json.loads(host.succeed(allocs)) if a["ClientStatus"] == "running")
            host.wait_until_succeeds(
                f"nomad alloc logs -namespace {alloc['Namespace']} {alloc['ID']} | grep nomad-microvm-guest-is-up",
                timeout=600,
            )
            host.wait_until_succeeds("ping -c 1 -W 2 192.0.2.2", timeout=300)
          '';
        };
    in
    {
      overlays.default = final: _prev: {
        nomad-driver-microvm = crate final "nomad-driver-microvm" "Nomad task driver that runs microvm.nix runners";
        gitfront = crate final "gitfront" "ssh forced command: git push of a flake becomes microVMs on Nomad";
      };

      packages = forAllSystems (pkgs: {
        inherit (pkgs) nomad-driver-microvm gitfront;
        default = pkgs.symlinkJoin {
          name = "nomad-microvm-${version}";
          paths = [ pkgs.nomad-driver-microvm pkgs.gitfront ];
        };
      });

      nixosModules = {
        # One import: the module, with this flake's packages as defaults.
        default = { lib, pkgs, ... }:
          let packages = self.packages.${pkgs.stdenv.hostPlatform.system}; in
          {
            imports = [ ./nixos-module.nix ];
            services.nomad-microvm = {
              package = lib.mkDefault packages.nomad-driver-microvm;
              gitfront.package = lib.mkDefault packages.gitfront;
            };
          };
        # The module alone: packages from `overlays.default` or the options.
        nomad-microvm = ./nixos-module.nix;
      };

      devShells = forAllSystems (pkgs: {
        default = pkgs.mkShell {
          inputsFrom = [ pkgs.nomad-driver-microvm ];
          packages = with pkgs; [ cargo rustc rustfmt clippy nixpkgs-fmt nomad qemu virtiofsd git openssh ];
          PROTOC = "${pkgs.protobuf}/bin/protoc";
        };
      });

      formatter = forAllSystems (pkgs: pkgs.nixpkgs-fmt);

      checks = forAllSystems (pkgs: {
        inherit (pkgs) nomad-driver-microvm gitfront;
        nixpkgs-fmt = pkgs.runCommand "nixpkgs-fmt-check"
          {
            nativeBuildInputs = [ pkgs.nixpkgs-fmt ];
            src = lib.fileset.toSource {
              root = ./.;
              fileset = lib.fileset.fileFilter (file: file.hasExt "nix") ./.;
            };
          } ''
          find "$src" -name '*.nix' -exec nixpkgs-fmt --check {} +
          touch $out
        '';
        vm = vmTest pkgs;
      });
    };
}

#!/usr/bin/env bash
# Installs what the demo and the tests need on a fresh Debian 12 machine, as
# root. Idempotent and quick when everything is already there.
#
#  - Debian packages: protoc (build.rs), qemu + Debian's kernel + busybox
#    (test guests), nix (runners in a real store, binary caches), iproute2,
#    sshd/git/socat/tmux (gitfront and console tests), libcap-ng/libseccomp
#    (to build virtiofsd)
#  - the VMM user and group microvm.nix uses: microvm:kvm
#  - the Rust virtiofsd (cargo install, cached in ~/.cache/nomad-microvm)
#  - the real Nomad agent, built from Go modules (tests/nomad-peer, cached)
#  - nixpkgs-fmt (cargo install, cached) for the .nix files' format check
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

packages=(
	protobuf-compiler qemu-system-x86 qemu-utils linux-image-amd64 busybox-static
	nix-bin iproute2 kmod cpio e2fsprogs socat tmux git openssh-server openssh-client
	libcap-ng-dev libseccomp-dev procps curl gcc python3
)
missing=()
for p in "${packages[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
	echo "installing: ${missing[*]}" >&2
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

getent group kvm >/dev/null || groupadd --system kvm
id -u microvm >/dev/null 2>&1 || useradd --system --gid kvm --no-create-home --shell /usr/sbin/nologin microvm

tests/runner/install-virtiofsd.sh >/dev/null
tests/nomad-peer/build.sh >/dev/null

# nixpkgs-fmt (crates.io) checks the .nix files' format (tests/e2e/nixos_module.rs).
nixfmt=$HOME/.cache/nomad-microvm/nixpkgs-fmt
if [[ ! -x $nixfmt/bin/nixpkgs-fmt ]]; then
	CARGO_TARGET_DIR=$nixfmt/build cargo install --locked nixpkgs-fmt --version 1.3.0 --root "$nixfmt" >&2
	rm -rf "$nixfmt/build"
fi

#!/usr/bin/env bash
# install-virtiofsd.sh — make sure the Rust virtiofsd (the one NixOS / microvm.nix use,
# crates.io package `virtiofsd`) is installed, and print its absolute path as the only
# line on stdout. Build output goes to stderr.
#
# Usage: tests/runner/install-virtiofsd.sh
#   VIRTIOFSD_ROOT   install root (default $HOME/.cache/nomad-microvm/virtiofsd);
#                    the binary is $VIRTIOFSD_ROOT/bin/virtiofsd
#   VIRTIOFSD_VERSION  optional crate version to pin (default: newest on crates.io)
#
# Needs: cargo, and Debian's libcap-ng-dev + libseccomp-dev (installed with apt-get if
# missing and we are root). Only builds when the binary is missing.
set -euo pipefail

root=${VIRTIOFSD_ROOT:-$HOME/.cache/nomad-microvm/virtiofsd}
bin=$root/bin/virtiofsd

if [[ ! -x $bin ]]; then
  missing=()
  for p in libcap-ng-dev libseccomp-dev pkg-config; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  if ((${#missing[@]})); then
    if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
      echo "install-virtiofsd: apt-get install ${missing[*]}" >&2
      DEBIAN_FRONTEND=noninteractive apt-get install -y "${missing[@]}" >&2
    else
      echo "install-virtiofsd: missing Debian packages: ${missing[*]}" >&2
      exit 1
    fi
  fi
  command -v cargo >/dev/null || { echo "install-virtiofsd: cargo not found" >&2; exit 1; }
  mkdir -p "$root"
  ver=()
  [[ -n ${VIRTIOFSD_VERSION:-} ]] && ver=(--version "$VIRTIOFSD_VERSION")
  # Separate target dir so we never touch the project's target/.
  CARGO_TARGET_DIR=${CARGO_TARGET_DIR_VIRTIOFSD:-$root/build} \
    cargo install virtiofsd --locked "${ver[@]}" --root "$root" >&2
  rm -rf "${CARGO_TARGET_DIR_VIRTIOFSD:-$root/build}"
fi

[[ -x $bin ]] || { echo "install-virtiofsd: $bin missing after install" >&2; exit 1; }
echo "$bin"

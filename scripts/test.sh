#!/usr/bin/env bash
# The test command (README, .ci/run): installs what is missing, builds, and
# runs every test — unit tests and the end-to-end suite against the real
# Nomad agent, real qemu guests and network namespaces (needs root).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if ((EUID != 0)); then
	echo "scripts/test.sh: run it as root (it installs packages, and the tests make network namespaces, taps and VMs)" >&2
	exit 1
fi

scripts/install-deps.sh
export NOMAD_BIN VIRTIOFSD
NOMAD_BIN=$(tests/nomad-peer/build.sh)
VIRTIOFSD=$(tests/runner/install-virtiofsd.sh)

cargo fmt --all --check
cargo build --workspace --bins
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
# Unit, integration and end-to-end tests (no doc tests: there are none).
cargo test --workspace --no-fail-fast --lib --bins --tests -- --test-threads=2 2>&1 | tee "$log" || status=$?
# One closing line for the whole run, summed over every test binary.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
exit "$status"

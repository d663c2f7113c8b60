#!/usr/bin/env bash
# The test command (README, .ci/run): installs what is missing, builds, and
# runs every test — unit tests and the end-to-end suite against the real
# Nomad agent, real qemu guests and network namespaces (needs root).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

scripts/install-deps.sh
export NOMAD_BIN VIRTIOFSD
NOMAD_BIN=$(tests/nomad-peer/build.sh)
VIRTIOFSD=$(tests/runner/install-virtiofsd.sh)

cargo fmt --all --check
cargo build --workspace --bins
cargo test --workspace -- --test-threads=2

#!/usr/bin/env bash
# Long fuzz runs of every input parser (the test suite runs a short one).
#   scripts/fuzz.sh [CASES]     default 20000 cases per property
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PROPTEST_CASES=${1:-20000}
cargo test --release -p nomad-driver-microvm --test fuzz
if [[ -f gitfront/tests/fuzz.rs ]]; then
	cargo test --release -p gitfront --test fuzz
fi

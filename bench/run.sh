#!/usr/bin/env bash
# bench/run.sh — the benchmark of issue 6: the microvm driver against a
# Skyflake-style raw_exec job, under the real Nomad agent. As root:
#
#   bench/run.sh [--reps N] [--sizes 1,10,50] [--out FILE]
#
# (BENCH_KEEP_LOG=FILE keeps a copy of the agent's log.)
# Installs what it needs (scripts/install-deps.sh), builds the workspace in
# release mode (what is measured), then runs bench/bench.py inside a network
# namespace of its own (bridge br0, 192.0.2.1/24) with a persistent Nomad
# agent. bench.py prints one table and writes it, with the machine, date and
# commit, to bench/results.md (or --out). Defaults: 20 starts per side for
# parts a and c, N = 1, 10, 50 for parts b and d. About 5 minutes on 2 cores.
#
# Everything the run starts lives in that namespace and is killed by pid when
# it ends, failed or not (trap): the agent's process group, then every process
# left in the namespace (VMMs, supervisors, executors, virtiofsd); then the
# namespace (and with it the taps and the bridge), the GC roots dir and the
# work dir go.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
repo=$(pwd)

if [[ $(id -u) != 0 ]]; then
	echo "bench/run.sh: must run as root (Nomad client, taps, virtiofsd)" >&2
	exit 2
fi

scripts/install-deps.sh
cargo build --workspace --bins --release

ns=mvb-$$
work=$(mktemp -d /tmp/mvb.XXXXXX)
chmod 0755 "$work" # the VMM user must reach the raw_exec work dirs below it
gcroots=/nix/var/nix/gcroots/nomad-microvm-bench-$$

cleanup() {
	local rc=$? pids i
	trap - EXIT INT TERM
	set +e
	if [[ -d $work/agent ]]; then
		tests/nomad-peer/agent.sh stop "$work/agent" >/dev/null 2>&1
	fi
	if [[ -e /run/netns/$ns ]]; then
		# Supervisors, executors, virtiofsd and VMMs outlive the agent by
		# design: kill every process still in the namespace, by pid.
		for i in $(seq 50); do
			pids=$(ip netns pids "$ns" 2>/dev/null)
			[[ -z $pids ]] && break
			# shellcheck disable=SC2086
			kill -KILL $pids 2>/dev/null
			sleep 0.2
		done
		ip netns del "$ns"
	fi
	rm -rf "$gcroots"
	if [[ -n ${BENCH_KEEP_LOG:-} && -f $work/agent/agent.log ]]; then
		cp "$work/agent/agent.log" "$BENCH_KEEP_LOG"
	fi
	if [[ -d $work/agent ]]; then
		tests/nomad-peer/agent.sh clean "$work/agent" >/dev/null 2>&1
	fi
	rm -rf "$work"
	exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

ip netns add "$ns"
ip -n "$ns" link set lo up
ip -n "$ns" link add br0 type bridge
ip -n "$ns" addr add 192.0.2.1/24 dev br0
ip -n "$ns" link set br0 up

ip netns exec "$ns" python3 "$repo/bench/bench.py" \
	--repo "$repo" --work "$work" --netns "$ns" --gcroots "$gcroots" "$@"

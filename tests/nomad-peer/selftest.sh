#!/usr/bin/env bash
# Self-test of build.sh + agent.sh, in a network namespace of its own with an
# empty plugin dir: a -dev agent runs a raw_exec batch job (/bin/true) and
# shows its logs; then a persistent agent is started, stopped and started
# again on the same state. Cleans up its agents and netns whatever happens.
# Needs root. Prints "N passed, 0 failed" at the end.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
agent=$here/agent.sh
ns=peer-test-$$
tmp=$(mktemp -d /tmp/nomad-peer-selftest.XXXXXX)
passed=0

cleanup() {
	local d
	for d in "$tmp"/*/; do
		"$agent" clean "$d" || true
	done
	ip netns del "$ns" 2>/dev/null || true
	rm -rf "$tmp" || true
}
trap cleanup EXIT
trap 'echo "FAIL: line $LINENO: $BASH_COMMAND" >&2' ERR

# check DESC CMD...: CMD must succeed.
check() {
	local desc=$1
	shift
	if "$@"; then
		echo "ok: $desc"
		passed=$((passed + 1))
	else
		echo "FAIL: $desc" >&2
		echo "$passed passed, 1 failed"
		exit 1
	fi
}

# stopped DIR: no pid file and no process mentioning DIR is left.
stopped() {
	[[ ! -e $1/agent.pid ]] && ! pgrep -f "$1/" >/dev/null
}

logs_are() {
	[[ $("$agent" nomad "$1" -- alloc logs "$2" t) == "$3" ]]
}

job_known() {
	"$agent" nomad "$1" -- job status -short "$2" >/dev/null
}

node_id() {
	"$agent" nomad "$1" -- node status -self -t '{{.ID}}'
}

# wait_alloc DIR JOB STATUS: wait (30 s) until JOB's allocations all have STATUS.
wait_alloc() {
	local i got
	for i in $(seq 60); do
		got=$("$agent" nomad "$1" -- job allocs -t '{{range .}}{{.ClientStatus}} {{end}}' "$2")
		[[ -n $got && -z ${got//$3 /} ]] && return 0
		sleep 0.5
	done
	echo "job $2: allocations are '$got', not $3" >&2
	return 1
}

bin=$("$here/build.sh")
check "nomad version is 1.11.3" grep -qx 'Nomad v1.11.3' <("$bin" version)

ip netns add "$ns"
ip -n "$ns" link set lo up
mkdir "$tmp/plugins"
cat >"$tmp/true.nomad.hcl" <<'EOF2'
job "true" {
  type = "batch"
  group "g" {
    task "t" {
      driver = "raw_exec"
      config {
        command = "/bin/sh"
        args    = ["-c", "echo hello from raw_exec; exec /bin/true"]
      }
      resources {
        cpu    = 50
        memory = 32
      }
    }
  }
}
EOF2

# -dev agent
check "dev agent starts" "$agent" start "$tmp/dev" --plugin-dir "$tmp/plugins" --netns "$ns" --dev
"$agent" nomad "$tmp/dev" -- node status -self -verbose >"$tmp/node.txt"
check "raw_exec detected and healthy" grep -Eq '^raw_exec +true +true' "$tmp/node.txt"
check "cloud env fingerprinters skipped" grep -q \
	'skipped due to allow/denylist: skipped_fingerprinters=\[.*env_aws' "$tmp/dev/agent.log"
"$agent" nomad "$tmp/dev" -- job run "$tmp/true.nomad.hcl" >/dev/null
check "raw_exec batch job completes" wait_alloc "$tmp/dev" true complete
alloc=$("$agent" nomad "$tmp/dev" -- job allocs -t '{{range .}}{{.ID}}{{end}}' true)
check "task log collected by logmon" logs_are "$tmp/dev" "$alloc" "hello from raw_exec"
"$agent" stop "$tmp/dev"
check "dev agent stopped" stopped "$tmp/dev"

# persistent agent: start, stop, start again on the same data dir
check "persistent agent starts" "$agent" start "$tmp/srv" --plugin-dir "$tmp/plugins" --netns "$ns"
"$agent" nomad "$tmp/srv" -- job run "$tmp/true.nomad.hcl" >/dev/null
check "raw_exec batch job completes" wait_alloc "$tmp/srv" true complete
node=$(node_id "$tmp/srv")
"$agent" stop "$tmp/srv"
check "persistent agent stopped" stopped "$tmp/srv"
check "persistent agent starts again" "$agent" start "$tmp/srv" --plugin-dir "$tmp/plugins" --netns "$ns"
check "same node id after restart" [ "$(node_id "$tmp/srv")" = "$node" ]
check "job kept across restart" job_known "$tmp/srv" true
"$agent" stop "$tmp/srv"
check "persistent agent stopped again" stopped "$tmp/srv"

echo "$passed passed, 0 failed"

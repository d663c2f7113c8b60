#!/usr/bin/env bash
# Start, stop and talk to a real Nomad agent (the binary build.sh prints).
#
#   agent.sh start DIR --plugin-dir PDIR [--netns NS [--nsenter]] [--dev]
#                      [--config EXTRA.hcl]... [--no-default-plugin]
#       Writes DIR/agent.hcl, starts the agent in its own process group
#       (inside netns NS if given), logs to DIR/agent.log, pid in
#       DIR/agent.pid, and waits up to $NOMAD_PEER_START_TIMEOUT (60) s for
#       `nomad node status -self` to answer with status "ready" (drivers
#       fingerprinted, jobs can be placed). Prints nothing on success; on
#       failure prints the tail of the log and exits 1.
#       Without --dev: a persistent server+client (-server -client
#       -bootstrap-expect=1, state in DIR/data) that can be stopped and
#       started again on the same DIR. With --dev: `nomad agent -dev` (server
#       state in memory; client state still in DIR/data).
#       Each --config file is passed as a further -config after agent.hcl;
#       Nomad merges them, so a `plugin "nomad-driver-microvm"` block there
#       replaces the default one's config. --no-default-plugin leaves the
#       default block out altogether (e.g. to test a missing plugin block).
#       The netns is entered with `ip netns exec NS`, which also gives the
#       agent a private mount namespace with a fresh /sys: /sys/class/net
#       shows the netns, but no cgroup fs is mounted (Nomad finds none: the
#       exec driver is unhealthy), and mounts the agent and its plugins make
#       are private to that agent's process tree, so an agent started again
#       does not see its predecessor's. --nsenter (or NOMAD_PEER_NSENTER=1)
#       enters only the network namespace (`nsenter --net`): real cgroups and
#       mounts shared with the host, but /sys/class/net shows the host's.
#   agent.sh stop DIR     SIGTERM the agent's process group, SIGKILL after 15 s.
#                         A -dev agent destroys its allocations on the way
#                         out; a persistent one leaves running tasks (their
#                         executors are in process groups of their own) to be
#                         picked up by the next start: stop jobs first if
#                         they must go.
#   agent.sh kill DIR     SIGKILL the agent process only (crash tests: its
#                         plugins and tasks are left running)
#   agent.sh clean DIR    stop the agent if it runs, unmount whatever is still
#                         mounted under DIR (with --nsenter, or without a
#                         netns, the alloc secrets/private tmpfs of allocations
#                         not yet garbage-collected stay mounted on the host
#                         after the agent stops), then delete DIR
#   agent.sh nomad DIR -- ARGS...
#                         run the nomad CLI in the agent's netns with
#                         NOMAD_ADDR set
#
# The agent listens on 127.0.0.1:4646-4648 only, so run agents that must
# coexist in separate network namespaces. Needs root (it is a Nomad client).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export NOMAD_ADDR=http://127.0.0.1:4646
# No "View this in the Web UI" hints: this build has no UI.
export NOMAD_CLI_SHOW_HINTS=${NOMAD_CLI_SHOW_HINTS:-0}

die() {
	echo "agent.sh: $*" >&2
	exit 2
}

usage() {
	sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//' >&2
	exit 2
}

nomad_bin() {
	"$here/build.sh"
}

# hcl_str VALUE: VALUE as an HCL string literal.
hcl_str() {
	local s=${1//\\/\\\\}
	s=${s//\"/\\\"}
	printf '"%s"' "$s"
}

# ns_cmd NS MODE: the command prefix that enters netns NS ("" for none).
ns_cmd() {
	local ns=$1 mode=$2
	if [[ -z $ns ]]; then
		return 0
	elif [[ $mode == nsenter ]]; then
		printf '%s\0' nsenter "--net=/run/netns/$ns"
	else
		printf '%s\0' ip netns exec "$ns"
	fi
}

# in_ns DIR CMD...: run CMD in the netns recorded for the agent in DIR.
in_ns() {
	local dir=$1 ns="" mode=""
	shift
	[[ -f $dir/agent.netns ]] && read -r ns mode <"$dir/agent.netns"
	local -a pre=()
	mapfile -d '' pre < <(ns_cmd "$ns" "$mode")
	"${pre[@]}" "$@"
}

# alive PID: the process exists and is not a zombie.
alive() {
	local state
	state=$(ps -o stat= -p "$1" 2>/dev/null) || return 1
	[[ $state != Z* ]]
}

# group_alive PGID: some process of that group is alive (not a zombie).
group_alive() {
	ps -e -o pgid=,stat= | awk -v g="$1" '$1 == g && $2 !~ /^Z/ { found = 1 } END { exit !found }'
}

read_pid() {
	local dir=$1 pid
	[[ -f $dir/agent.pid ]] || return 1
	pid=$(<"$dir/agent.pid")
	[[ $pid =~ ^[0-9]+$ ]] || return 1
	echo "$pid"
}

cmd_start() {
	local dir="" pdir="" ns="" dev=0 default_plugin=1 mode=ip
	[[ ${NOMAD_PEER_NSENTER:-0} == 1 ]] && mode=nsenter
	local -a extra=()
	[[ $# -ge 1 ]] || usage
	dir=$1
	shift
	while [[ $# -gt 0 ]]; do
		case $1 in
		--plugin-dir) pdir=${2:?--plugin-dir needs a value}; shift 2 ;;
		--netns) ns=${2:?--netns needs a value}; shift 2 ;;
		--nsenter) mode=nsenter; shift ;;
		--dev) dev=1; shift ;;
		--config) extra+=("$(realpath -e "${2:?--config needs a value}")"); shift 2 ;;
		--no-default-plugin) default_plugin=0; shift ;;
		*) die "start: unknown argument: $1" ;;
		esac
	done
	[[ -n $pdir ]] || die "start: --plugin-dir is required"
	[[ -d $pdir ]] || die "start: plugin dir $pdir does not exist"
	if [[ -n $ns && ! -e /run/netns/$ns ]]; then
		die "start: network namespace $ns does not exist"
	fi
	mkdir -p "$dir"
	dir=$(realpath -e "$dir")
	pdir=$(realpath -e "$pdir")

	local pid
	if pid=$(read_pid "$dir") && alive "$pid"; then
		die "start: an agent is already running from $dir (pid $pid)"
	fi
	rm -f "$dir/agent.pid"

	local bin
	bin=$(nomad_bin)

	mkdir -p "$dir/data"
	{
		echo "# Written by tests/nomad-peer/agent.sh; rewritten on every start."
		echo "data_dir             = $(hcl_str "$dir/data")"
		echo "plugin_dir           = $(hcl_str "$pdir")"
		echo 'log_level            = "DEBUG"'
		echo 'disable_update_check = true'
		echo 'bind_addr            = "127.0.0.1"'
		echo
		echo 'advertise {'
		echo '  http = "127.0.0.1"'
		echo '  rpc  = "127.0.0.1"'
		echo '  serf = "127.0.0.1"'
		echo '}'
		echo
		echo 'client {'
		echo '  network_interface = "lo"'
		echo '  options {'
		echo '    # These probe 169.254.169.254: never let them run.'
		echo '    "fingerprint.denylist" = "env_aws,env_gce,env_azure,env_digitalocean"'
		echo '  }'
		echo '}'
		echo
		echo '# Benchmarks compare against raw_exec.'
		echo 'plugin "raw_exec" {'
		echo '  config {'
		echo '    enabled = true'
		echo '  }'
		echo '}'
		if ((default_plugin)); then
			echo
			echo 'plugin "nomad-driver-microvm" {'
			echo '  config {}'
			echo '}'
		fi
	} >"$dir/agent.hcl"
	if [[ -n $ns ]]; then
		printf '%s %s\n' "$ns" "$mode" >"$dir/agent.netns"
	else
		rm -f "$dir/agent.netns"
	fi

	local -a args=(agent -config "$dir/agent.hcl")
	local f
	for f in "${extra[@]}"; do
		args+=(-config "$f")
	done
	if ((dev)); then
		args+=(-dev)
	else
		args+=(-server -client -bootstrap-expect=1)
	fi

	local -a cmd=()
	mapfile -d '' cmd < <(ns_cmd "$ns" "$mode")
	cmd+=("$bin" "${args[@]}")
	{
		echo "==> $(date -u +%FT%TZ) agent.sh start: ${cmd[*]}"
	} >>"$dir/agent.log"
	# setsid: own session and process group (we are a background job of a
	# non-interactive shell, so not a group leader: setsid execs in place and
	# $! is the agent's pid; `ip netns exec` and nsenter exec too).
	# Its own temp dir: go-plugin's sockets and a -dev agent's data go there
	# and leave with DIR, even when the agent dies before cleaning up.
	mkdir -p "$dir/tmp"
	TMPDIR=$dir/tmp setsid "${cmd[@]}" </dev/null >>"$dir/agent.log" 2>&1 &
	pid=$!
	echo "$pid" >"$dir/agent.pid"

	local timeout=${NOMAD_PEER_START_TIMEOUT:-60}
	local deadline=$((SECONDS + timeout))
	while ((SECONDS < deadline)); do
		if ! alive "$pid"; then
			echo "agent.sh: agent (pid $pid) exited during start; tail of $dir/agent.log:" >&2
			tail -n 40 "$dir/agent.log" >&2
			rm -f "$dir/agent.pid"
			exit 1
		fi
		# Answering is not enough: the client registers as "initializing"
		# and the scheduler places nothing on it until it turns "ready".
		if [[ $(in_ns "$dir" "$bin" node status -self -t '{{.Status}}' 2>/dev/null) == ready ]]; then
			return 0
		fi
		sleep 0.5
	done
	echo "agent.sh: agent (pid $pid) not ready after ${timeout} s; tail of $dir/agent.log:" >&2
	tail -n 40 "$dir/agent.log" >&2
	exit 1
}

cmd_stop() {
	[[ $# -eq 1 ]] || usage
	local dir=$1 pid
	if ! pid=$(read_pid "$dir"); then
		echo "agent.sh: stop: no agent.pid in $dir" >&2
		return 0
	fi
	if group_alive "$pid"; then
		kill -TERM -- "-$pid" 2>/dev/null || true
		local deadline=$((SECONDS + 15))
		while group_alive "$pid" && ((SECONDS < deadline)); do
			sleep 0.2
		done
		if group_alive "$pid"; then
			echo "agent.sh: stop: process group $pid still alive after 15 s, SIGKILL" >&2
			kill -KILL -- "-$pid" 2>/dev/null || true
		fi
	fi
	rm -f "$dir/agent.pid"
}

cmd_kill() {
	[[ $# -eq 1 ]] || usage
	local dir=$1 pid
	pid=$(read_pid "$dir") || die "kill: no agent.pid in $dir"
	kill -KILL "$pid" 2>/dev/null || true
	local i
	for i in $(seq 50); do
		alive "$pid" || break
		sleep 0.1
	done
	rm -f "$dir/agent.pid"
}

cmd_clean() {
	[[ $# -eq 1 ]] || usage
	[[ -d $1 ]] || return 0
	local dir m
	dir=$(realpath -e "$1")
	[[ $dir != / ]] || die "clean: refusing to clean /"
	if read_pid "$dir" >/dev/null; then
		cmd_stop "$dir"
	fi
	# Deepest first. Mount points with spaces are escaped (\040) in
	# mountinfo; Nomad's are not.
	while read -r m; do
		umount "$m" 2>/dev/null || umount -l "$m"
	done < <(awk -v d="$dir/" 'index($5, d) == 1 { print $5 }' /proc/self/mountinfo | sort -r)
	rm -rf -- "$dir"
}

cmd_nomad() {
	[[ $# -ge 1 ]] || usage
	local dir=$1
	shift
	[[ ${1:-} == -- ]] && shift
	local bin
	bin=$(nomad_bin)
	in_ns "$dir" "$bin" "$@"
}

[[ $# -ge 1 ]] || usage
sub=$1
shift
case $sub in
start) cmd_start "$@" ;;
stop) cmd_stop "$@" ;;
kill) cmd_kill "$@" ;;
clean) cmd_clean "$@" ;;
nomad) cmd_nomad "$@" ;;
-h | --help | help) usage ;;
*) die "unknown command: $sub (start|stop|kill|clean|nomad)" ;;
esac

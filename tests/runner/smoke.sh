#!/usr/bin/env bash
# smoke.sh — end-to-end proof of tests/runner WITHOUT the driver (needs root).
#
# Usage: tests/runner/smoke.sh [--store] [--keep] [--vcpu N]
#   --store  build the runner with make-runner.sh --store (a /nix/store path)
#   --vcpu N vCPUs (default 1; N>1 also exercises multi_queue taps, queues=N, mq=on)
#   --keep   keep the temp dir (runner, work dir, logs) for inspection
#   SMOKE_TIMEOUT  seconds to wait for the guest's "ready" line (default 180)
#
# What it does, like the microvm.nix host module would, but by hand:
#   * makes a runner (hostname smoke, share "data", tap "rtsmk<pid>", 192.0.2.2/24, ping 192.0.2.1)
#   * netns rt-smoke-<pid> with bridge br0 = 192.0.2.1/24; runs the runner's bin/tap-up
#     inside it and enslaves the tap to br0 (all traffic stays in this netns, 192.0.2.0/24)
#   * starts each [program:virtiofsd-TAG] command= from the INI named in bin/virtiofsd-run
#     (as root, inside the netns, cwd = the VM's working dir) and waits for the sockets
#   * runs bin/microvm-run as user microvm, group kvm (created with useradd --system if
#     missing), in the netns, cwd = a fresh working dir (owner microvm:kvm, 0775),
#     stdin = a fifo (used to type one command into the guest's console shell),
#     stdout+stderr → a log; waits for "microvm-test-guest: ready"
#   * checks: share marker file, "ping 192.0.2.1 ok", console shell answers
#   * bin/microvm-shutdown (as microvm) with stdin a pipe that is closed after qemu exits;
#     checks "graceful shutdown" in the log and qemu's exit status 0
#   * boot 2 (virtiofsd restarted first, since it exits with its VMM): boot count 2, then
#     creates reboot-request in the share; checks "rebooting on request" and exit status 0
#   * cleanup on any exit (trap): kill our process groups, tap-down, delete the netns
# Prints "N passed, N failed" at the end; exit status 0 iff all passed.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
store= keep= vcpu=1
while (($#)); do
  case $1 in
    --store) store=--store ;;
    --keep) keep=1 ;;
    --vcpu) vcpu=$2; shift ;;
    *) echo "usage: $0 [--store] [--keep] [--vcpu N]" >&2; exit 2 ;;
  esac
  shift
done
[[ $(id -u) == 0 ]] || { echo "smoke.sh: must run as root" >&2; exit 2; }
timeout_s=${SMOKE_TIMEOUT:-180}

ns=rt-smoke-$$
tap=rtsmk$$
tap=${tap:0:15}
name=smoke
tmp=$(mktemp -d /tmp/rt-smoke.XXXXXX)
work=$tmp/work      # the VM's working directory (short: AF_UNIX paths ≤ 107 bytes)
share=$tmp/share
pgids=()
passed=0 failed=0

log() { echo "smoke: $*" >&2; }
ok() { passed=$((passed + 1)); echo "ok - $*"; }
bad() { failed=$((failed + 1)); echo "not ok - $*"; }
check() { local d=$1; shift; if "$@"; then ok "$d"; else bad "$d"; fi; }

cleanup() {
  set +e
  local p
  for p in "${pgids[@]}"; do kill -TERM -- "-$p" 2>/dev/null; done
  sleep 0.5
  for p in "${pgids[@]}"; do kill -KILL -- "-$p" 2>/dev/null; done
  if [[ -n ${runner:-} && -x $runner/bin/tap-down ]] && ip netns list | grep -qw "$ns"; then
    ip netns exec "$ns" "$runner/bin/tap-down" 2>/dev/null
  fi
  ip netns del "$ns" 2>/dev/null
  if [[ -n $keep ]]; then log "kept $tmp"; else
    [[ -L $tmp/microvm-qemu-$name ]] && rm -f "$tmp/microvm-qemu-$name"
    rm -rf "$tmp"
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---- VMM user, as microvm.nix's host module: user microvm, primary group kvm
getent group kvm >/dev/null || groupadd --system kvm
if ! id microvm >/dev/null 2>&1; then
  log "creating system user microvm (group kvm)"
  useradd --system --gid kvm --no-create-home --home-dir /var/lib/microvms --shell /usr/sbin/nologin microvm
fi

# ---- runner
mkdir -p "$work" "$share"
chown microvm:kvm "$work"; chmod 0775 "$work"; chmod 0755 "$tmp"
guest_args=()
if [[ -z $store ]]; then
  # the default guest cache is under $HOME (/root is 0700): give the microvm user copies
  { read -r kernel; read -r initrd; } < <("$here/guest.sh")
  mkdir -p "$tmp/guest"; cp "$kernel" "$initrd" "$tmp/guest/"; chmod -R a+rX "$tmp/guest"
  guest_args=(--kernel "$tmp/guest/$(basename "$kernel")" --initrd "$tmp/guest/$(basename "$initrd")")
fi
runner=$("$here/make-runner.sh" "$tmp" --hostname "$name" --share "data:$share" \
  --tap "$tap" --guest-ip 192.0.2.2/24 --ping 192.0.2.1 --vcpu "$vcpu" $store "${guest_args[@]}")
log "runner $runner"
for f in bin/microvm-run bin/microvm-shutdown bin/tap-up bin/tap-down bin/virtiofsd-run \
         share/microvm/hypervisor share/microvm/tap-flags share/microvm/tap-interfaces \
         share/microvm/virtiofs/data/socket share/microvm/virtiofs/data/source; do
  [[ -e $runner/$f ]] || bad "runner has $f"
done

# ---- network namespace with bridge + the runner's tap
ip netns add "$ns"
ip -n "$ns" link set lo up
ip -n "$ns" link add br0 type bridge
ip -n "$ns" addr add 192.0.2.1/24 dev br0
ip -n "$ns" link set br0 up
ip netns exec "$ns" "$runner/bin/tap-up"
ip -n "$ns" link set "$tap" master br0

# ---- virtiofsd: the INI named by bin/virtiofsd-run, each [program:virtiofsd-*] command=
ini=$(sed -n 's/.*--configuration \([^ ]*\).*/\1/p' "$runner/bin/virtiofsd-run")
ini=${ini//\'/}
mapfile -t vfs_cmds < <(awk '
  /^\[/ { prog = ($0 ~ /^\[program:virtiofsd-/) }
  prog && /^command=/ { sub(/^command=/, ""); print }' "$ini")
((${#vfs_cmds[@]} == 1)) || bad "INI has one virtiofsd program (got ${#vfs_cmds[@]})"

start_virtiofsd() { # $1 = boot number
  local c
  vfs_pids=()
  for c in "${vfs_cmds[@]}"; do
    (cd "$work" && exec setsid ip netns exec "$ns" "$c") >>"$tmp/virtiofsd.log" 2>&1 </dev/null 7>&- 8>&- &
    pgids+=($!) vfs_pids+=($!)
  done
  local sock=$work/$(cat "$runner/share/microvm/virtiofs/data/socket") i
  for i in $(seq 1 100); do [[ -S $sock ]] && break; sleep 0.1; done
  sleep 0.3
  if [[ -S $sock ]] && kill -0 "${vfs_pids[@]}" 2>/dev/null; then return 0; fi
  bad "virtiofsd running with its socket (boot $1)"; cat "$tmp/virtiofsd.log" >&2; exit 1
}

vm_pid=
start_vm() { # $1 = boot number; stdin of qemu = fifo (we keep a writer open on fd 7)
  local n=$1
  rm -f "$tmp/in$n"; mkfifo "$tmp/in$n"
  exec 7<>"$tmp/in$n"
  vm_log=$tmp/vm$n.log
  (cd "$work" && exec setsid ip netns exec "$ns" setpriv --reuid=microvm --regid=kvm --init-groups \
     "$runner/bin/microvm-run") <"$tmp/in$n" 7>&- >"$vm_log" 2>&1 &
  vm_pid=$!
  pgids+=("$vm_pid")
  vm_start=$(date +%s.%N)
}

wait_line() { # pattern timeout → 0 when seen in $vm_log
  local i
  for ((i = 0; i < $2 * 5; i++)); do
    grep -q -- "$1" "$vm_log" 2>/dev/null && return 0
    kill -0 "$vm_pid" 2>/dev/null || { grep -q -- "$1" "$vm_log" && return 0; return 1; }
    sleep 0.2
  done
  return 1
}

wait_exit() { # timeout → sets vm_status
  local i
  for ((i = 0; i < $1 * 5; i++)); do
    kill -0 "$vm_pid" 2>/dev/null || break
    sleep 0.2
  done
  if kill -0 "$vm_pid" 2>/dev/null; then vm_status=timeout; return 1; fi
  set +e; wait "$vm_pid"; vm_status=$?; set -e
}

# ================================================================ boot 1: graceful shutdown
start_virtiofsd 1
start_vm 1
if wait_line 'microvm-test-guest: ready' "$timeout_s"; then
  t=$(echo "$(date +%s.%N) - $vm_start" | bc)
  ok "boot 1 reached ready in ${t}s"
else
  bad "boot 1 reached ready"; cat "$vm_log" >&2; exit 1
fi
check "banner" grep -q 'microvm-test-guest: booted smoke' "$vm_log"
check "share mounted line" grep -q 'microvm-test-guest: share data mounted' "$vm_log"
check "marker file in share" grep -qx 'hostname=smoke' "$share/microvm-marker"
check "boot count 1" grep -qx 'boot=1' "$share/microvm-marker"
check "ping ok" grep -q 'microvm-test-guest: ping 192.0.2.1 ok' "$vm_log"
host_ping() { ip netns exec "$ns" busybox ping -q -c 1 -W 5 192.0.2.2 >/dev/null; }
check "host pings guest" host_ping
check "QMP socket in cwd" test -S "$work/$name.sock"

# type a command into the guest console (qemu's stdin)
sleep 1
echo 'echo console-says-$((6*7))' >&7
check "console shell answers" wait_line 'console-says-42' 30
if ((vcpu > 1)); then
  check "tap-flags has multi_queue" grep -qx multi_queue "$runner/share/microvm/tap-flags"
  check "tap is multi_queue" grep -q multi_queue <(ip -n "$ns" -d link show "$tap")
fi
check "qemu runs as microvm" test "$(ps -o user= -p "$vm_pid")" = microvm
check "qemu argv[0] is microvm@$name" grep -qx "microvm@$name" <(tr '\0' '\n' </proc/$vm_pid/cmdline | head -1)

# graceful stop: microvm-shutdown with a stdin pipe we close after qemu is gone
rm -f "$tmp/sd-in"; mkfifo "$tmp/sd-in"; exec 8<>"$tmp/sd-in"
(cd "$work" && exec setsid setpriv --reuid=microvm --regid=kvm --init-groups \
   "$runner/bin/microvm-shutdown") <"$tmp/sd-in" 7>&- 8>&- >"$tmp/shutdown.log" 2>&1 &
sd_pid=$!; pgids+=("$sd_pid")
t0=$(date +%s.%N)
wait_exit 60 || true
log "qemu gone $(echo "$(date +%s.%N) - $t0" | bc)s after microvm-shutdown"
exec 8>&-
for i in $(seq 1 50); do kill -0 "$sd_pid" 2>/dev/null || break; sleep 0.1; done
check "microvm-shutdown returned after stdin closed" bash -c "! kill -0 $sd_pid 2>/dev/null"
check "graceful shutdown line" grep -q 'microvm-test-guest: graceful shutdown' "$vm_log"
check "qemu exit status 0 after shutdown (got $vm_status)" test "$vm_status" = 0
exec 7>&-
vfs_gone() { local p; for p in "${vfs_pids[@]}"; do kill -0 "$p" 2>/dev/null && return 1; done; return 0; }
for i in $(seq 1 50); do vfs_gone && break; sleep 0.1; done
check "virtiofsd exited by itself after qemu disconnected" vfs_gone
check "microvm-shutdown exits 0 when the socket is gone" \
  bash -c "cd '$work' && rm -f '$name.sock' && '$runner/bin/microvm-shutdown' </dev/null"

# ================================================================ boot 2: guest reboot request
start_virtiofsd 2
start_vm 2
if wait_line 'microvm-test-guest: ready' "$timeout_s"; then
  ok "boot 2 reached ready in $(echo "$(date +%s.%N) - $vm_start" | bc)s"
else
  bad "boot 2 reached ready"; cat "$vm_log" >&2; exit 1
fi
check "boot count 2" grep -qx 'boot=2' "$share/microvm-marker"
touch "$share/reboot-request"
wait_exit 60 || true
check "rebooting on request line" grep -q 'microvm-test-guest: rebooting on request' "$vm_log"
check "qemu exit status 0 after guest reboot (got $vm_status)" test "$vm_status" = 0
check "reboot-request consumed" test ! -e "$share/reboot-request"
exec 7>&-

echo "$passed passed, $failed failed"
((failed == 0))

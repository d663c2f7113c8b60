#!/usr/bin/env bash
# The main job, end to end on one machine: a Nomad dev agent with our driver
# runs an example microVM (Debian's kernel + a busybox guest in the exact
# microvm.nix runner layout, booted by qemu; TCG where KVM is unusable).
#
#   sudo scripts/demo.sh          # runs until Ctrl-C, then cleans up
#   sudo scripts/demo.sh --once   # shows it, then stops the VM and cleans up
#
# Everything happens inside a network namespace this script creates
# (bridge br0 192.0.2.1/24, the VM at 192.0.2.2) and removes on exit.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
repo=$PWD
once=false
[[ ${1:-} == --once ]] && once=true

scripts/install-deps.sh
cargo build --workspace --bins -q

ns=microvm-demo-$$
work=$(mktemp -d /tmp/microvm-demo.XXXXXX)
chmod 755 "$work"
agent="$repo/tests/nomad-peer/agent.sh"
nomad() { "$agent" nomad "$work/agent" -- "$@"; }

cleanup() {
	trap - EXIT INT TERM
	echo
	echo "==> stopping the VM (graceful shutdown) and the agent"
	nomad job stop -detach example >/dev/null 2>&1 || true
	for _ in $(seq 1 40); do
		pgrep -f "microvm@example" >/dev/null || break
		sleep 0.5
	done
	"$agent" stop "$work/agent" >/dev/null 2>&1 || true
	for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$pid" 2>/dev/null || true; done
	ip netns del "$ns" 2>/dev/null || true
	rm -rf "$work"
	echo "==> cleaned up: no agent, no VM, no namespace left"
}
trap cleanup EXIT INT TERM

echo "==> network namespace $ns with bridge br0 (192.0.2.1/24)"
ip netns add "$ns"
ip -n "$ns" link set lo up
ip -n "$ns" link add br0 type bridge
ip -n "$ns" addr add 192.0.2.1/24 dev br0
ip -n "$ns" link set br0 up

echo "==> an example runner in the Nix store (microvm.nix layout)"
runner=$(tests/runner/make-runner.sh "$work/runners" --hostname example --tap vm-example \
	--share data:data --guest-ip 192.0.2.2/24 --ping 192.0.2.1 --store)
echo "    $runner"

mkdir -p "$work/agent/plugins"
ln -s "$repo/target/debug/nomad-driver-microvm" "$work/agent/plugins/"
cat >"$work/plugin.hcl" <<HCL
plugin "nomad-driver-microvm" {
  config {
    state_dir      = "$work/state"
    default_bridge = "br0"
    virtiofsd      = "$(tests/runner/install-virtiofsd.sh)"
  }
}
HCL
echo "==> starting a Nomad dev agent with the microvm driver"
"$agent" start "$work/agent" --plugin-dir "$work/agent/plugins" --netns "$ns" --dev --config "$work/plugin.hcl"
nomad node status -self -verbose | sed -n '/^Drivers/,/^$/p'

cat >"$work/example.nomad.hcl" <<HCL
job "example" {
  datacenters = ["*"]
  group "vm" {
    task "vm" {
      driver       = "microvm"
      kill_timeout = "30s"
      config {
        runner = "$runner"
      }
      resources {
        cpu    = 500
        memory = 300
      }
    }
  }
}
HCL
echo "==> nomad job run example.nomad.hcl"
nomad job run -detach "$work/example.nomad.hcl"
alloc=""
for _ in $(seq 1 120); do
	alloc=$(nomad job allocs -t '{{range .}}{{if eq .ClientStatus "running"}}{{.ID}}{{end}}{{end}}' example 2>/dev/null || true)
	[[ -n $alloc ]] && break
	sleep 1
done
[[ -n $alloc ]] || { echo "the VM did not start:"; nomad job status example; exit 1; }
echo "==> nomad alloc status $alloc"
nomad alloc status "$alloc"
echo "==> nomad alloc logs $alloc vm   (the guest's serial console)"
for _ in $(seq 1 120); do
	nomad alloc logs "$alloc" vm 2>/dev/null | grep -q "microvm-test-guest: ready" && break
	sleep 1
done
nomad alloc logs "$alloc" vm | tr -d '\r' | grep -a "microvm-test-guest"
if $once; then
	exit 0
fi
echo
echo "The VM runs. Try:  tests/nomad-peer/agent.sh nomad $work/agent -- alloc status $alloc"
echo "Press Ctrl-C to stop the VM, the agent and remove the namespace."
while true; do sleep 3600; done

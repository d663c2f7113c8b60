#!/usr/bin/env bash
# Build the real Nomad agent (v1.11.3, from Go modules) once and cache it.
#
#   tests/nomad-peer/build.sh        -> prints the absolute path of the binary
#
# stdout carries only that path; progress goes to stderr. With a warm cache
# this runs no `go` command at all. Environment:
#   NOMAD_PEER_CACHE  cache dir (default $HOME/.cache/nomad-microvm)
#   GO                go binary (default: `go` on PATH, else /usr/local/go/bin/go)
# The first build takes several minutes on 2 cores; Go's own build cache
# (~/.cache/go-build) is kept, so a rebuild after an edit is much faster.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache=${NOMAD_PEER_CACHE:-$HOME/.cache/nomad-microvm}

# How Nomad's release build does it (GNUmakefile + .github/workflows/build.yml),
# without the `ui` tag (no embedded web UI):
#  - release:           leaves out the mock driver and other test-only code
#  - hashicorpmetrics:  go-metrics compat shims use hashicorp/go-metrics
#  - codegen_generated: the generated msgpack codecs for nomad/structs
# CGO_ENABLED=1 like the official linux builds: the exec driver's executor
# needs runc's libcontainer/nsenter, which is cgo (raw_exec would not).
# GitCommit/BuildDate are those of the v1.11.3 tag.
tags="release hashicorpmetrics codegen_generated"
ldflags="-s -w -X github.com/hashicorp/nomad/version.GitCommit=173ab08a0210789da531847c4ce3c3518f7fb34b -X github.com/hashicorp/nomad/version.BuildDate=2026-03-11T09:10:27Z"
cgo=1
recipe="tags=$tags cgo=$cgo ldflags=$ldflags trimpath buildvcs=false"

hash=$(cat "$here/go.mod" "$here/go.sum" "$here/main.go" <(printf '%s\n' "$recipe") |
	sha256sum | cut -c1-16)
bin="$cache/nomad-$hash"

if [[ -x $bin ]]; then
	echo "$bin"
	exit 0
fi

if [[ -n ${GO:-} ]]; then
	go=$GO
elif command -v go >/dev/null 2>&1; then
	go=$(command -v go)
elif [[ -x /usr/local/go/bin/go ]]; then
	go=/usr/local/go/bin/go
else
	echo "build.sh: no Go toolchain found (set GO=...)" >&2
	exit 1
fi
if ! command -v "${CC:-cc}" >/dev/null 2>&1; then
	echo "build.sh: CGO_ENABLED=1 needs a C compiler (apt-get install gcc)" >&2
	exit 1
fi

mkdir -p "$cache"
# One build at a time; whoever waited finds the binary already there.
exec 9>"$cache/.build.lock"
flock 9
if [[ -x $bin ]]; then
	echo "$bin"
	exit 0
fi

echo "build.sh: building Nomad v1.11.3 -> $bin (several minutes the first time)" >&2
tmp="$bin.tmp.$$"
trap 'rm -f "$tmp"' EXIT
start=$SECONDS
(
	cd "$here"
	# go.mod/go.sum are committed and complete: never let the build edit them.
	CGO_ENABLED=$cgo "$go" build -mod=readonly -trimpath -buildvcs=false \
		-tags "$tags" -ldflags "$ldflags" -o "$tmp" .
) >&2
"$tmp" version >&2
mv -f "$tmp" "$bin"
trap - EXIT
echo "build.sh: built in $((SECONDS - start)) s" >&2
echo "$bin"

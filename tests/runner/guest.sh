#!/usr/bin/env bash
# guest.sh — build (once, cached) the test guest: Debian's kernel + a busybox initramfs.
#
# Usage: tests/runner/guest.sh [--kernel-version VER]
#   stdout: two lines, the absolute path of the kernel (a copy of /boot/vmlinuz-VER) and
#           the absolute path of the initramfs (gzip'd newc cpio).
#   VER defaults to the newest /boot/vmlinuz-*; GUEST_CACHE (default
#   $HOME/.cache/nomad-microvm/guest) holds one directory per kernel version + hash of
#   (init script, module list, busybox); a build is atomic (tmp dir + rename).
#   Needs: busybox-static, linux-image-amd64, kmod (modinfo), cpio, gzip.
#
# ---------------------------------------------------------------------------------------
# Guest /init (busybox sh, stays pid 1) — what the tests may rely on.
# All settings come from the kernel command line (qemu -append):
#   microvm.hostname=NAME        hostname (default "microvm")
#   microvm.share=TAG:MOUNTPOINT virtiofs share, repeatable; the FIRST one is "the share"
#   microvm.ip=ADDR/PREFIX       address for eth0 (e.g. 192.0.2.2/24); none → no network
#   microvm.ping=ADDR            host-side address to ping 3 times after the address is set
#   microvm.vsock=1              load the vsock modules (vsock, vmw_vsock_virtio_transport*)
# Console lines (serial ttyS0 = qemu's stdout), in this order:
#   microvm-test-guest: booted NAME                   (first thing init prints)
#   microvm-test-guest: module M failed               (only on insmod failure)
#   microvm-test-guest: share TAG mounted             / ... share TAG mount failed
#   microvm-test-guest: marker written boot=N         (into the first share)
#   microvm-test-guest: vsock loaded                  / ... vsock failed  (only with microvm.vsock=1)
#   microvm-test-guest: ping ADDR ok                  / ... ping ADDR failed
#   microvm-test-guest: ready
# Files in the first share:
#   microvm-bootcount   a counter, incremented on every boot (so restarts are visible)
#   microvm-marker      "hostname=NAME\nboot=N\n" rewritten on every boot
#   reboot-request      created by a test: pid 1 polls every second; when present it deletes
#                       it, prints "microvm-test-guest: rebooting on request", syncs,
#                       unmounts and does `reboot -f` (qemu -no-reboot then exits 0).
#   ignore-shutdown     created by a test: a graceful stop request is answered with
#                       "microvm-test-guest: ignoring the shutdown request" and nothing else.
# Console shell: an interactive busybox sh on ttyS0 (setsid cttyhack, respawned), so a test
# can type commands into qemu's stdin. pid 1 stays this init script.
# Graceful stop: Ctrl+Alt+Del (QMP input-send-event, as microvm.nix's microvm-shutdown does)
# makes the kernel send SIGINT to pid 1 — init first writes 0 to /proc/sys/kernel/ctrl-alt-del
# (the kernel default is 1 = immediate hard reboot, which would skip the handler). pid 1 traps INT and TERM:
# prints "microvm-test-guest: graceful shutdown", syncs, unmounts the shares, `poweroff -f`.
# With -no-reboot qemu then exits 0.
# ---------------------------------------------------------------------------------------
set -euo pipefail

kver=
while (($#)); do
  case $1 in
    --kernel-version) kver=$2; shift 2 ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "guest.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
if [[ -z $kver ]]; then
  k=$(ls -1 /boot/vmlinuz-* 2>/dev/null | sort -V | tail -n1)
  [[ -n $k ]] || { echo "guest.sh: no /boot/vmlinuz-* (apt-get install linux-image-amd64)" >&2; exit 1; }
  kver=${k#/boot/vmlinuz-}
fi
kernel_src=/boot/vmlinuz-$kver
moddir=/lib/modules/$kver
busybox=/bin/busybox
for f in "$kernel_src" "$moddir" "$busybox"; do
  [[ -e $f ]] || { echo "guest.sh: $f missing" >&2; exit 1; }
done
[[ $(ldd "$busybox" 2>&1 || true) == *"not a dynamic"* ]] || {
  echo "guest.sh: $busybox is not static (apt-get install busybox-static)" >&2; exit 1; }

# Modules loaded always (in dependency order) and for microvm.vsock=1.
base_modules=(virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci
              failover net_failover virtio_net fuse virtiofs)
vsock_modules=(vsock vmw_vsock_virtio_transport_common vmw_vsock_virtio_transport)

# Resolve a module list into dependency order (depth-first on `modinfo -F depends`),
# skipping built-ins and modules already listed. Appends "name path" lines to $out.
declare -A seen=()
out=
resolve() {
  local m=$1 f d
  [[ -n ${seen[$m]:-} ]] && return 0
  seen[$m]=1
  f=$(modinfo -k "$kver" -F filename "$m" 2>/dev/null) || { echo "guest.sh: no module $m" >&2; return 1; }
  [[ $f == "(builtin)" || -z $f ]] && return 0
  for d in $(modinfo -k "$kver" -F depends "$m" | tr ',' ' '); do resolve "$d"; done
  out+="$m $f"$'\n'
}
for m in "${base_modules[@]}"; do resolve "$m"; done
base_list=$out; out=
for m in "${vsock_modules[@]}"; do resolve "$m" || true; done
vsock_list=$out

read -r -d '' INIT <<'INIT_EOF' || true
#!/bin/sh
# microvm-test-guest init (see tests/runner/guest.sh for the contract)
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
/bin/busybox --install -s /bin
mkdir -p /proc /sys /dev /tmp /run /mnt
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts && mount -t devpts devpts /dev/pts 2>/dev/null

say() { echo "microvm-test-guest: $*"; }
# The kernel's default is 1 (Ctrl+Alt+Del = immediate hard reboot); real inits set 0 so the
# kernel sends SIGINT to pid 1 instead. Do the same.
echo 0 > /proc/sys/kernel/ctrl-alt-del
# A shutdown asked for while still booting is remembered and honoured once
# the guest is up (a real init handles it at any time; dying here would panic).
SHUTDOWN_PENDING=
trap 'SHUTDOWN_PENDING=1' INT TERM

HOSTNAME=microvm IP= PING= VSOCK= SHARES=
for arg in $(cat /proc/cmdline); do
  case $arg in
    microvm.hostname=*) HOSTNAME=${arg#*=} ;;
    microvm.ip=*) IP=${arg#*=} ;;
    microvm.ping=*) PING=${arg#*=} ;;
    microvm.vsock=*) VSOCK=${arg#*=} ;;
    microvm.share=*) SHARES="$SHARES ${arg#*=}" ;;
  esac
done
hostname "$HOSTNAME"
say "booted $HOSTNAME"

load() { # file of "name path" lines
  while read -r name path; do
    [ -n "$name" ] || continue
    insmod "$path" 2>/dev/null || grep -q "^$name " /proc/modules || say "module $name failed"
  done < "$1"
}
load /lib/modules/base.list

FIRST= MOUNTED=
for s in $SHARES; do
  tag=${s%%:*} mp=${s#*:}
  mkdir -p "$mp"
  ok=
  for i in 1 2 3 4 5 6 7 8 9 10; do
    if mount -t virtiofs "$tag" "$mp" 2>/dev/null; then ok=1; break; fi
    sleep 0.5
  done
  if [ -n "$ok" ]; then
    say "share $tag mounted"
    MOUNTED="$mp $MOUNTED"
    [ -n "$FIRST" ] || FIRST=$mp
  else
    say "share $tag mount failed"
  fi
done

if [ -n "$FIRST" ]; then
  n=$(cat "$FIRST/microvm-bootcount" 2>/dev/null || echo 0)
  case $n in ''|*[!0-9]*) n=0 ;; esac
  n=$((n + 1))
  echo "$n" > "$FIRST/microvm-bootcount"
  printf 'hostname=%s\nboot=%s\n' "$HOSTNAME" "$n" > "$FIRST/microvm-marker.tmp" &&
    mv -f "$FIRST/microvm-marker.tmp" "$FIRST/microvm-marker"
  sync
  say "marker written boot=$n"
fi

if [ "$VSOCK" = 1 ]; then
  if [ -s /lib/modules/vsock.list ]; then
    load /lib/modules/vsock.list
    if grep -q '^vmw_vsock_virtio_transport ' /proc/modules; then say "vsock loaded"; else say "vsock failed"; fi
  else
    say "vsock failed"
  fi
fi

ip link set lo up 2>/dev/null
if [ -n "$IP" ]; then
  for i in 1 2 3 4 5 6 7 8 9 10; do [ -e /sys/class/net/eth0 ] && break; sleep 0.5; done
  ip addr add "$IP" dev eth0 && ip link set eth0 up || say "eth0 setup failed"
  if [ -n "$PING" ]; then
    if ping -c 3 -W 3 "$PING" >/dev/null 2>&1; then say "ping $PING ok"; else say "ping $PING failed"; fi
  fi
fi

stop_all() { # $1 = poweroff|reboot
  sync
  [ -n "$CONSOLE_LOOP" ] && kill "$CONSOLE_LOOP" 2>/dev/null
  for mp in $MOUNTED; do umount "$mp" 2>/dev/null || umount -l "$mp" 2>/dev/null; done
  sync
  "$1" -f
  sleep 5
}
graceful() {
  # A guest that hangs in its shutdown, for tests of the driver's escalation.
  if [ -n "$FIRST" ] && [ -e "$FIRST/ignore-shutdown" ]; then say "ignoring the shutdown request"; return; fi
  trap '' INT TERM; say "graceful shutdown"; stop_all poweroff
}
trap graceful INT TERM
[ -n "$SHUTDOWN_PENDING" ] && graceful

say "ready"

# Interactive shell on the serial console, respawned; pid 1 stays here.
( while :; do setsid cttyhack sh -l </dev/ttyS0 >/dev/ttyS0 2>&1; sleep 1; done ) &
CONSOLE_LOOP=$!

while :; do
  if [ -n "$FIRST" ] && [ -e "$FIRST/reboot-request" ]; then
    rm -f "$FIRST/reboot-request"
    trap '' INT TERM
    say "rebooting on request"
    stop_all reboot
  fi
  sleep 1 &
  wait $!
done
INIT_EOF

# The shell's `sleep 0.5` needs busybox's fractional sleep (FEATURE_FANCY_SLEEP; Debian has it).
key=$( { printf '%s\n' "$INIT" "$base_list" "$vsock_list"; sha256sum "$busybox" "$kernel_src"; } \
       | sha256sum | cut -c1-16)
cache=${GUEST_CACHE:-$HOME/.cache/nomad-microvm/guest}
dir=$cache/$kver-$key
if [[ ! -s $dir/initramfs.cpio.gz || ! -s $dir/vmlinuz ]]; then
  mkdir -p "$cache"
  tmp=$(mktemp -d "$cache/.build.XXXXXX")
  trap 'rm -rf "$tmp"' EXIT
  root=$tmp/root
  mkdir -p "$root"/{bin,sbin,dev,proc,sys,tmp,run,mnt,etc,root,lib/modules}
  cp "$busybox" "$root/bin/busybox"
  ln -s busybox "$root/bin/sh"
  printf '%s\n' "$INIT" > "$root/init"
  chmod 755 "$root/init"
  echo "root:x:0:0:root:/root:/bin/sh" > "$root/etc/passwd"
  echo "root:x:0:" > "$root/etc/group"
  mkdir -p "$root/lib/modules/ko"
  : > "$root/lib/modules/base.list"; : > "$root/lib/modules/vsock.list"
  add_list() { # list-text out-file
    local name path
    while read -r name path; do
      [[ -n $name ]] || continue
      cp "$path" "$root/lib/modules/ko/"
      echo "$name /lib/modules/ko/$(basename "$path")" >> "$2"
    done <<<"$1"
  }
  add_list "$base_list" "$root/lib/modules/base.list"
  add_list "$vsock_list" "$root/lib/modules/vsock.list"
  # Decompress .ko.xz/.ko.zst if this kernel ships compressed modules (busybox insmod
  # may lack the decompressor).
  for f in "$root"/lib/modules/ko/*.ko.xz; do [[ -e $f ]] && xz -d "$f"; done
  for f in "$root"/lib/modules/ko/*.ko.zst; do [[ -e $f ]] && zstd -q -d --rm "$f"; done
  sed -i -e 's/\.ko\.\(xz\|zst\)$/.ko/' "$root"/lib/modules/*.list
  (cd "$root" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --quiet -R 0:0) \
    | gzip -9 > "$tmp/initramfs.cpio.gz"
  cp "$kernel_src" "$tmp/vmlinuz"
  rm -rf "$root"
  chmod 644 "$tmp"/*
  chmod 755 "$tmp"
  if ! mv -T "$tmp" "$dir" 2>/dev/null; then
    rm -rf "$tmp" # somebody else built it concurrently
  fi
  trap - EXIT
fi
echo "$dir/vmlinuz"
echo "$dir/initramfs.cpio.gz"

#!/usr/bin/env bash
# make-runner.sh — make a microVM runner directory in the microvm.nix layout, for tests.
#
# Usage:
#   tests/runner/make-runner.sh OUTDIR --hostname NAME [options]
# Creates OUTDIR/microvm-<hv>-NAME (hv = qemu unless --hypervisor) and prints the runner's
# path as the ONLY stdout line (with --store: the /nix/store path; OUTDIR/microvm-<hv>-NAME is
# then an out-link = indirect GC root to it). An existing OUTDIR/microvm-<hv>-NAME that is a
# runner (has bin/microvm-run) or a symlink is replaced.
#
# Options:
#   --hostname NAME          VM name (required): -name, QMP socket NAME.sock, exec -a microvm@NAME
#   --hypervisor HV          qemu (default, bootable) or a layout-only fake: cloud-hypervisor
#                            firecracker crosvm kvmtool stratovirt alioth vfkit (microvm-run
#                            prints "not bootable here" and exits 1)
#   --mem MiB                guest memory (default 256)
#   --vcpu N                 vCPUs (default 1); N>1 → multi_queue taps (qemu, CH, stratovirt)
#   --accel A                qemu accel (default tcg; e.g. kvm:tcg)
#   --share TAG:SOURCE[:ro][:noacl][:cache=C]
#                            virtiofs share (repeatable); guest mounts it at /mnt/TAG; SOURCE is
#                            written as given (absolute, or relative to the runner's cwd)
#   --tap ID[:MAC]           tap interface (repeatable; default MAC 02:xx:… derived from NAME+ID)
#   --guest-ip CIDR          address for the guest's eth0 (e.g. 192.0.2.2/24)
#   --ping ADDR              address the guest pings 3 times after setting its address
#   --vsock-cid N            write share/microvm/vsock-cid, add -device vhost-vsock-pci,guest-cid=N
#                            (qemu then needs /dev/vhost-vsock) and microvm.vsock=1 for the guest
#   --guest-vsock            only tell the guest to load its vsock modules (microvm.vsock=1)
#   --vsock-cid-file N       only write share/microvm/vsock-cid (no device: boots without
#                            /dev/vhost-vsock; the host then has no way to reach that CID)
#   --append 'ARGS'          extra kernel command-line words
#   --socket-group G         virtiofsd --socket-group (default kvm)
#   --legacy                 old layout (≤ v0.5.0): no bin/tap-up, tap-down, virtiofsd-run
#   --no-hypervisor-file     omit share/microvm/hypervisor (runners before 2026-01)
#   --no-tap-flags           omit share/microvm/tap-flags (runners before v0.5.0)
#   --no-sandbox             omit qemu's -sandbox on
#   --faithful-rlimit        per-share virtiofsd script exactly as microvm.nix's: as root it always
#                            passes --rlimit-nofile 1048576, which makes virtiofsd exit 1 (EPERM)
#                            where the hard NOFILE limit is lower and cannot be raised (this
#                            machine: hard limit 20000, no CAP_SYS_RESOURCE). Default: the script
#                            drops that flag when `ulimit -Hn 1048576` fails.
#   --store                  build the runner as a Nix store path (Debian nix, no daemon, no
#                            substituters); kernel, initrd and virtiofsd become store paths
#                            too and are registered as references (nix-store -qR works)
#   --kernel P --initrd P    use these instead of tests/runner/guest.sh's output
#   --virtiofsd P            use this virtiofsd instead of tests/runner/install-virtiofsd.sh's
#
# Layout written (every data-file line ends in \n, like microvm.nix's `echo`):
#   bin/microvm-run          bash, set -eou pipefail, exec -a "microvm@NAME" qemu … (cwd-relative
#                            sockets: NAME.sock, NAME-virtiofs-TAG.sock)
#   bin/microvm-shutdown     qemu/cloud-hypervisor/firecracker/crosvm/vfkit only (§1.8)
#   bin/tap-up, bin/tap-down            when taps and not --legacy
#   bin/virtiofsd-run        when shares, not --legacy, hv ≠ vfkit: exec supervisord --configuration
#                            <runner>/share/microvm-test/NAME-virtiofsd-supervisord.conf "$@"
#   share/microvm/{hypervisor,tap-flags,tap-interfaces,vsock-cid,virtiofs/TAG/{socket,source}}
#   share/microvm-test/      NOT part of the microvm.nix layout: the supervisord INI, one
#                            `virtiofsd-TAG` script per share (its [program:virtiofsd-TAG]
#                            command=), and a stand-in supervisord event handler.
# Unlike real runners, bin/* are regular files, not symlinks to separate store paths, and
# qemu/socat/ip/bash are Debian's (/usr/bin …), not store paths.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
self=$here/$(basename "${BASH_SOURCE[0]}")
all_args=("$@")

die() { echo "make-runner.sh: $*" >&2; exit 2; }

outdir= name= hv=qemu mem=256 vcpu=1 accel=tcg guest_ip= ping= vsock_cid= guest_vsock= vsock_cid_file=
append= socket_group=kvm legacy= hv_file=1 tap_flags_file=1 sandbox=1 store=
kernel= initrd= virtiofsd= emit_to= faithful_rlimit=
shares=() taps=()
while (($#)); do
  case $1 in
    --hostname) name=$2; shift 2 ;;
    --hypervisor) hv=$2; shift 2 ;;
    --mem) mem=$2; shift 2 ;;
    --vcpu) vcpu=$2; shift 2 ;;
    --accel) accel=$2; shift 2 ;;
    --share) shares+=("$2"); shift 2 ;;
    --tap) taps+=("$2"); shift 2 ;;
    --guest-ip) guest_ip=$2; shift 2 ;;
    --ping) ping=$2; shift 2 ;;
    --vsock-cid) vsock_cid=$2; shift 2 ;;
    --guest-vsock) guest_vsock=1; shift ;;
    --vsock-cid-file) vsock_cid_file=$2; shift 2 ;;
    --append) append=$2; shift 2 ;;
    --socket-group) socket_group=$2; shift 2 ;;
    --legacy) legacy=1; shift ;;
    --no-hypervisor-file) hv_file=; shift ;;
    --no-tap-flags) tap_flags_file=; shift ;;
    --no-sandbox) sandbox=; shift ;;
    --faithful-rlimit) faithful_rlimit=1; shift ;;
    --store) store=1; shift ;;
    --kernel) kernel=$2; shift 2 ;;
    --initrd) initrd=$2; shift 2 ;;
    --virtiofsd) virtiofsd=$2; shift 2 ;;
    --emit-to) emit_to=$2; shift 2 ;;   # internal: write the runner into $2 (used by --store)
    -h|--help) sed -n '2,50p' "$0"; exit 0 ;;
    -*) die "unknown option $1" ;;
    *) [[ -z $outdir ]] || die "only one OUTDIR"; outdir=$1; shift ;;
  esac
done
[[ -n $name ]] || die "--hostname is required"
[[ $name =~ ^[A-Za-z0-9][A-Za-z0-9._-]*$ ]] || die "bad hostname '$name'"
[[ -n $outdir || -n $emit_to ]] || die "OUTDIR is required"
[[ $mem =~ ^[0-9]+$ && $vcpu =~ ^[0-9]+$ && $vcpu -ge 1 ]] || die "bad --mem/--vcpu"
[[ -z $vsock_cid || $vsock_cid =~ ^[0-9]+$ ]] || die "bad --vsock-cid"
[[ -z $vsock_cid_file || $vsock_cid_file =~ ^[0-9]+$ ]] || die "bad --vsock-cid-file"
[[ -z $vsock_cid || -z $vsock_cid_file ]] || die "--vsock-cid and --vsock-cid-file exclude each other"
case $hv in
  qemu|cloud-hypervisor|firecracker|crosvm|kvmtool|stratovirt|alioth|vfkit) ;;
  *) die "unknown hypervisor $hv" ;;
esac
if ((${#shares[@]})) && [[ $hv == firecracker || $hv == kvmtool ]]; then
  die "$hv has no virtiofs shares in microvm.nix"
fi
runner_name=microvm-$hv-$name

# ---------------------------------------------------------------- inputs (kernel, virtiofsd)
if [[ -z $emit_to ]]; then
  if [[ $hv == qemu && ( -z $kernel || -z $initrd ) ]]; then
    { read -r k; read -r i; } < <("$here/guest.sh")
    kernel=${kernel:-$k} initrd=${initrd:-$i}
  fi
  if [[ -z $virtiofsd ]]; then
    if [[ $hv == qemu ]] && ((${#shares[@]})); then
      virtiofsd=$("$here/install-virtiofsd.sh")
    else # layout-only fakes never run it: don't build it for them
      virtiofsd=${VIRTIOFSD_ROOT:-$HOME/.cache/nomad-microvm/virtiofsd}/bin/virtiofsd
    fi
  fi
fi

qemu_bin=$(command -v qemu-system-x86_64 || echo /usr/bin/qemu-system-x86_64)
socat_bin=$(command -v socat || echo /usr/bin/socat)
ip_bin=$(command -v ip || echo /usr/sbin/ip)
curl_bin=$(command -v curl || echo /usr/bin/curl)

# shell-quote for generated scripts: bare when safe, else single quotes (like lib.escapeShellArg)
q() {
  if [[ $1 =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then printf '%s' "$1"
  else printf "'%s'" "${1//\'/\'\\\'\'}"; fi
}

multi_queue=
case $hv in qemu|cloud-hypervisor|stratovirt) ((vcpu > 1)) && multi_queue=1 ;; esac

# ------------------------------------------------------------------------------- emit
emit() {
  local out=$1 # where to write
  local self_path=$2 # the runner's final absolute path
  local sm=$out/share/microvm helper=$out/share/microvm-test
  local helper_final=$self_path/share/microvm-test
  mkdir -p "$out/bin" "$sm"

  # -- data files
  [[ -n $hv_file ]] && echo "$hv" > "$sm/hypervisor"
  if [[ -n $tap_flags_file ]]; then
    echo vnet_hdr > "$sm/tap-flags"
    [[ -n $multi_queue ]] && echo multi_queue >> "$sm/tap-flags"
  fi
  local t id mac s tag src flags f sock
  local tap_ids=() tap_macs=()
  for t in "${taps[@]}"; do
    id=${t%%:*}
    if [[ $t == *:* ]]; then mac=${t#*:}; else
      mac=02:$(printf '%s' "$name/$id" | md5sum | sed -E 's/^(..)(..)(..)(..)(..).*/\1:\2:\3:\4:\5/')
    fi
    tap_ids+=("$id") tap_macs+=("$mac")
    echo "$id" >> "$sm/tap-interfaces"
  done
  local share_tags=() share_srcs=() share_socks=() share_ro=() share_acl=() share_cache=()
  for s in "${shares[@]}"; do
    IFS=: read -r -a f <<<"$s"
    ((${#f[@]} >= 2)) || die "--share wants TAG:SOURCE[:ro][:noacl][:cache=C], got $s"
    tag=${f[0]} src=${f[1]}
    local ro= acl=1 cache=auto
    for flags in "${f[@]:2}"; do
      case $flags in ro) ro=1 ;; noacl) acl= ;; cache=*) cache=${flags#cache=} ;;
        *) die "unknown share flag $flags" ;; esac
    done
    sock=$name-virtiofs-$tag.sock
    share_tags+=("$tag") share_srcs+=("$src") share_socks+=("$sock") share_ro+=("$ro")
    share_acl+=("$acl") share_cache+=("$cache")
    mkdir -p "$sm/virtiofs/$tag"
    echo "$sock" > "$sm/virtiofs/$tag/socket"
    echo "$src" > "$sm/virtiofs/$tag/source"
  done
  [[ -n $vsock_cid ]] && echo "$vsock_cid" > "$sm/vsock-cid"
  [[ -n $vsock_cid_file ]] && echo "$vsock_cid_file" > "$sm/vsock-cid"

  # -- bin/microvm-run
  local run=$out/bin/microvm-run
  if [[ $hv == qemu ]]; then
    local cmdline="console=ttyS0 reboot=t panic=-1 quiet microvm.hostname=$name"
    for tag in "${share_tags[@]}"; do cmdline+=" microvm.share=$tag:/mnt/$tag"; done
    [[ -n $guest_ip ]] && cmdline+=" microvm.ip=$guest_ip"
    [[ -n $ping ]] && cmdline+=" microvm.ping=$ping"
    [[ -n $vsock_cid || -n $guest_vsock ]] && cmdline+=" microvm.vsock=1"
    [[ -n $append ]] && cmdline+=" $append"
    local a=(-name "$name" -M "pc,accel=$accel" -m "$mem" -smp "$vcpu"
             -nodefaults -no-user-config -nographic -no-reboot
             -chardev stdio,id=stdio,signal=off -serial chardev:stdio
             -device virtio-rng-pci)
    [[ -n $sandbox ]] && a+=(-sandbox on)
    a+=(-kernel "$kernel" -initrd "$initrd" -append "$cmdline"
        -qmp "unix:$name.sock,server,nowait")
    if ((${#share_tags[@]})); then
      a+=(-numa node,memdev=mem -object "memory-backend-memfd,id=mem,size=${mem}M,share=on")
      local i
      for i in "${!share_tags[@]}"; do
        a+=(-chardev "socket,id=fs-${share_tags[i]},path=${share_socks[i]}"
            -device "vhost-user-fs-pci,chardev=fs-${share_tags[i]},tag=${share_tags[i]}")
      done
    fi
    for i in "${!tap_ids[@]}"; do
      local nd="tap,id=${tap_ids[i]},ifname=${tap_ids[i]},script=no,downscript=no"
      local dev="virtio-net-pci,netdev=${tap_ids[i]},mac=${tap_macs[i]},romfile="
      if [[ -n $multi_queue ]]; then
        nd+=",queues=$vcpu"; dev+=",mq=on,vectors=$((2 * vcpu + 2))"
      fi
      a+=(-netdev "$nd" -device "$dev")
    done
    [[ -n $vsock_cid ]] && a+=(-device "vhost-vsock-pci,guest-cid=$vsock_cid")
    {
      echo '#!/bin/bash'
      echo 'set -eou pipefail'
      echo
      printf 'exec -a %s %s' "$(q "microvm@$name")" "$(q "$qemu_bin")"
      local x
      for x in "${a[@]}"; do printf ' %s' "$(q "$x")"; done
      echo
    } > "$run"
  else
    cat > "$run" <<EOF
#!/bin/bash
set -eou pipefail
# layout-only fake made by tests/runner/make-runner.sh
echo "microvm-run: $hv runner $(q "$name") is a layout-only fake, not bootable here" >&2
exit 1
EOF
  fi

  # -- bin/microvm-shutdown (per hypervisor, §1.8)
  local sd=$out/bin/microvm-shutdown
  local qsock; qsock=$(q "$name.sock")
  case $hv in
    qemu) cat > "$sd" <<EOF
#!/bin/bash
# Exit gracefully if QEMU is already gone
if [ ! -S $qsock ]; then
  exit 0
fi
(
  echo '{"execute":"qmp_capabilities"}'
  echo '{"execute":"input-send-event","arguments":{"events":[{"type":"key","data":{"down":true,"key":{"type":"qcode","data":"ctrl"}}},{"type":"key","data":{"down":true,"key":{"type":"qcode","data":"alt"}}},{"type":"key","data":{"down":true,"key":{"type":"qcode","data":"delete"}}}]}}'
  # wait for exit (as long as our stdin stays open)
  cat
) | $(q "$socat_bin") STDIO UNIX:$qsock,shut-none
EOF
    ;;
    cloud-hypervisor) cat > "$sd" <<EOF
#!/bin/bash
# layout-only fake (cloud-hypervisor): what microvm.nix's script does
$(q "$curl_bin") --unix-socket $qsock -X PUT http://localhost/api/v1/vm.power-button
waitpid "\$MAINPID"
EOF
    ;;
    firecracker) cat > "$sd" <<EOF
#!/bin/bash
# layout-only fake (firecracker): what microvm.nix's script does
$(q "$curl_bin") --unix-socket $qsock -X PUT http://localhost/actions -d '{"action_type":"SendCtrlAltDel"}'
$(q "$socat_bin") STDOUT UNIX:$qsock,shut-none
EOF
    ;;
    crosvm) cat > "$sd" <<EOF
#!/bin/bash
# layout-only fake (crosvm)
crosvm powerbtn $qsock
EOF
    ;;
    vfkit) cat > "$sd" <<EOF
#!/bin/bash
# layout-only fake (vfkit)
$(q "$curl_bin") --unix-socket $qsock -X POST http://localhost/vm/state -d '{"state":"Stop"}'
EOF
    ;;
    *) sd= ;; # kvmtool, stratovirt, alioth: none
  esac

  # -- new-layout helper scripts
  if [[ -z $legacy ]]; then
    if ((${#tap_ids[@]})); then
      local tf="vnet_hdr"; [[ -n $multi_queue ]] && tf+=" multi_queue"
      { echo '#!/bin/bash'; echo 'set -eou pipefail'
        for id in "${tap_ids[@]}"; do
          echo "if [ -e /sys/class/net/$(q "$id") ]; then"
          echo "  $(q "$ip_bin") link delete $(q "$id")"
          echo "fi"
          echo "$(q "$ip_bin") tuntap add name $(q "$id") mode tap user microvm $tf"
          echo "$(q "$ip_bin") link set $(q "$id") up"
        done; } > "$out/bin/tap-up"
      { echo '#!/bin/bash'; echo 'set -eou pipefail'
        for id in "${tap_ids[@]}"; do echo "$(q "$ip_bin") link delete $(q "$id")"; done
      } > "$out/bin/tap-down"
    fi
    if ((${#share_tags[@]})) && [[ $hv != vfkit ]]; then
      mkdir -p "$helper"
      local ini=$helper/$name-virtiofsd-supervisord.conf
      cat > "$helper/supervisord-event-handler" <<'EOF'
#!/bin/bash
# Stand-in for microvm.nix's supervisord-event-handler.py (which calls systemd-notify --ready
# once all programs are RUNNING). Speaks the supervisor eventlistener protocol and acks.
while :; do
  printf 'READY\n'
  read -r header || exit 0
  len=${header##*len:}; len=${len%% *}
  [ -n "$len" ] && read -r -N "$len" _payload
  printf 'RESULT 2\nOK'
done
EOF
      {
        echo "[eventlistener:notify]"
        echo "buffer_size=$(( (1 + ${#share_tags[@]}) * 16 ))"
        echo "command=$helper_final/supervisord-event-handler"
        echo "events=PROCESS_STATE"
        echo
        for i in "${!share_tags[@]}"; do
          echo "[program:virtiofsd-${share_tags[i]}]"
          echo "command=$helper_final/virtiofsd-${share_tags[i]}"
          echo "stderr_syslog=true"
          echo "stdout_syslog=true"
          echo
        done
        echo "[supervisord]"
        echo "nodaemon=true"
        echo "user=root"
      } > "$ini"
      for i in "${!share_tags[@]}"; do
        {
          echo '#!/bin/bash'
          echo 'if [ $(id -u) = 0 ]; then'
          echo '  OPT_RLIMIT="--rlimit-nofile 1048576"'
          echo 'else'
          echo '  OPT_RLIMIT=""'
          echo 'fi'
          if [[ -z $faithful_rlimit ]]; then
            echo '# make-runner.sh deviation from microvm.nix: drop the flag where the hard limit'
            echo '# cannot be raised (no CAP_SYS_RESOURCE, e.g. in a container), where virtiofsd'
            echo '# would exit with EPERM; without it virtiofsd falls back to the hard limit.'
            echo 'if [ -n "$OPT_RLIMIT" ] && ! (ulimit -Hn 1048576) 2>/dev/null; then'
            echo '  OPT_RLIMIT=""'
            echo 'fi'
          fi
          echo "exec $(q "$virtiofsd") \\"
          echo "  --socket-path=$(q "${share_socks[i]}") \\"
          [[ -n $socket_group ]] && echo "  --socket-group=$socket_group \\"
          echo "  --shared-dir=$(q "${share_srcs[i]}") \\"
          echo '  $OPT_RLIMIT \'
          echo '  --thread-pool-size $(nproc) \'
          [[ -n ${share_acl[i]} ]] && echo '  --posix-acl --xattr \'
          echo "  --cache=${share_cache[i]} \\"
          echo '  --inode-file-handles=prefer \'
          [[ $hv == crosvm ]] && echo "  --tag=${share_tags[i]} \\"
          [[ -n ${share_ro[i]} ]] && echo '  --readonly \'
          echo
        } > "$helper/virtiofsd-${share_tags[i]}"
      done
      cat > "$out/bin/virtiofsd-run" <<EOF
#!/bin/bash
exec supervisord --configuration $(q "$helper_final/$name-virtiofsd-supervisord.conf") "\$@"
EOF
    fi
  fi
  chmod 0555 "$out"/bin/*
  [[ -d $helper ]] && chmod 0555 "$helper"/virtiofsd-* "$helper/supervisord-event-handler"
  return 0
}

if [[ -n $emit_to ]]; then # internal mode (Nix builder): write into $emit_to
  emit "$emit_to" "$emit_to"
  exit 0
fi

mkdir -p "$outdir"
outdir=$(cd "$outdir" && pwd)
dest=$outdir/$runner_name
if [[ -L $dest ]]; then rm -f "$dest"
elif [[ -e $dest ]]; then
  if [[ -e $dest/bin/microvm-run ]]; then chmod -R u+w "$dest"; rm -rf "$dest"
  else die "$dest exists and is not a runner"; fi
fi

if [[ -z $store ]]; then
  [[ -z $kernel ]] || kernel=$(readlink -f "$kernel")
  [[ -z $initrd ]] || initrd=$(readlink -f "$initrd")
  emit "$dest" "$dest"
  if [[ $hv == qemu && $(id -u) == 0 ]] && id nobody >/dev/null 2>&1 &&
     ! setpriv --reuid=nobody --regid=nogroup --clear-groups test -r "$kernel" -a -r "$initrd" 2>/dev/null; then
    echo "make-runner.sh: warning: $kernel / $initrd are not readable by other users;" \
         "a non-root VMM user (microvm) cannot boot this runner: use --store, or set GUEST_CACHE" \
         "to a world-readable directory, or pass --kernel/--initrd copies elsewhere" >&2
  fi
  echo "$dest"
  exit 0
fi

# ------------------------------------------------------------------------------- --store
command -v nix-build >/dev/null || die "nix-build not found (apt-get install nix-bin)"
nixstr() { # nix string literal
  local s=$1
  s=${s//\\/\\\\}; s=${s//\"/\\\"}; s=${s//\$\{/\\\$\{}
  printf '"%s"' "$s"
}
nixpath() { # store a local file: builtins.path → "${...}"
  printf '(builtins.path { path = %s; name = %s; })' "$(nixstr "$(readlink -f "$1")")" "$(nixstr "$2")"
}
expr="let script = $(nixpath "$self" make-runner.sh);"
extra=()
if [[ $hv == qemu ]]; then
  expr+=" kernel = $(nixpath "$kernel" "vmlinuz-$(basename "$(dirname "$(readlink -f "$kernel")")")");"
  expr+=" initrd = $(nixpath "$initrd" "initramfs-$(basename "$(dirname "$(readlink -f "$initrd")")").cpio.gz");"
  extra+=('"--kernel"' '"${kernel}"' '"--initrd"' '"${initrd}"')
fi
if [[ -x $virtiofsd ]]; then
  # a store path holding bin/virtiofsd, like nixpkgs' package
  vver=$("$virtiofsd" --version 2>/dev/null | awk '{print $2}')
  expr+=" virtiofsd = derivation { name = $(nixstr "virtiofsd-$vver"); system = \"x86_64-linux\";"
  expr+=" builder = \"/bin/sh\"; PATH = \"/usr/bin:/bin\"; bin = $(nixpath "$virtiofsd" virtiofsd);"
  expr+=" args = [ \"-c\" \"mkdir -p \$out/bin \&\& cp \$bin \$out/bin/virtiofsd\" ]; };"
  extra+=('"--virtiofsd"' '"${virtiofsd}/bin/virtiofsd"')
fi
args_nix=()
for x in "${all_args[@]}"; do
  [[ $x == --store ]] && continue
  args_nix+=("$(nixstr "$x")")
done
expr+=" in derivation { name = $(nixstr "$runner_name"); system = \"x86_64-linux\";"
expr+=" builder = \"/bin/bash\"; PATH = \"/usr/bin:/bin:/usr/sbin:/sbin\";"
expr+=" args = [ \"\${script}\" ${args_nix[*]} ${extra[*]} \"--emit-to\" (builtins.placeholder \"out\") ]; }"
path=$(nix-build --option substituters '' --option sandbox false -E "$expr" -o "$dest" 2> >(grep -v -e '^these ' -e '^this ' -e "^  /nix/store" -e '^building ' >&2))
[[ $path == /nix/store/* ]] || die "nix-build failed"
echo "$path"

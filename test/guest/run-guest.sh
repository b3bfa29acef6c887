#!/usr/bin/env bash
# run-guest.sh - boot the test guest in QEMU (TCG) with vhost-user-blk disks and vhost-user-net NICs served by
# external backends.
#
# Needs the Debian packages qemu-system-x86, busybox-static and linux-image-amd64; downloads nothing.
# The backend must already listen on each socket (QEMU fails if it cannot connect).
#
# Usage: run-guest.sh [options] [-- extra qemu arguments...]
#   --script FILE           guest script, run in the guest as /guest/test.sh
#   --guest-file FILE       extra file for /guest/<basename> (repeatable)
#   --vhost-user-blk SOCK   add a vhost-user-blk-pci disk (repeatable; /dev/vda, /dev/vdb, ...)
#   --blk-queues N          num-queues of the disks added after this option (default 1; it must not
#                           exceed the backend's number of queues)
#   --blk-reconnect S       reconnect=S on the chardev of the disks added after this option (default 0:
#                           none): QEMU connects again every S seconds when the backend goes away
#   --blk-server            QEMU listens on the socket of the disks added after this option
#                           (server=on,wait=off): the backend connects (client mode), and may come later
#   --vhost-user-net SOCK[,mac=MAC][,queues=N][,server=1][,offloads=off]
#                           add a virtio-net-pci NIC (repeatable; eth0, eth1, ... in this order) whose
#                           backend listens on SOCK (no commas in SOCK); MAC default 52:54:00:12:34:5X
#                           (X = 6, 7, ... per NIC); queues = queue pairs (default 1, <= the backend's);
#                           server=1: QEMU listens on SOCK (server=on,wait=off) and the backend connects
#                           (client mode); QEMU waits for it before the guest starts.
#                           offloads=off: the NIC negotiates no checksum or segmentation offload
#                           (csum=off,guest_csum=off,host_tso4=off,...), whatever the backend offers.
#                           Always vectors=0 (INTx): Debian's QEMU 7.2 crashes with MSI-X on
#                           vhost-user netdevs.
#   --vhost-user-rng SOCK   add a vhost-user-rng-pci entropy source (repeatable) whose backend listens on
#                           SOCK; the guest's virtio_rng driver makes it /dev/hwrng
#   --vhost-user-vsock SOCK add a vhost-user-vsock-pci socket device (repeatable) whose backend listens on SOCK
#                           (the guest CID comes from the backend's config space); the guest script loads
#                           vmw_vsock_virtio_transport
#   --packed                packed virtqueues (packed=on) on every disk and NIC (VIRTIO_F_RING_PACKED; QEMU
#                           negotiates it only when the backend offers it: check the guest's features)
#   --mem SIZE              guest RAM (default 512M), always a shared memfd (share=on), as vhost-user needs
#   --maxmem SIZE           allow memory hotplug up to SIZE: -m SIZE,slots=N,maxmem=SIZE (QMP object-add
#   --slots N               memory-backend-memfd + device_add pc-dimm); slots default 4
#   --smp N                 vCPUs (default 1)
#   --accel tcg|kvm         default tcg. Do not use kvm where /dev/kvm is a software PVM (it hangs).
#   --qmp SOCK              QMP unix socket (default RUN_DIR/qmp.sock)
#   --append ARGS           more kernel arguments (guest.shell=1: shell before the poweroff)
#   --kernel FILE --initrd FILE   default: build them into $GUEST_BUILD_DIR (default
#                           ${TMPDIR:-/tmp}/vhost-user-guest-build) with build-initramfs.sh
#   --run-dir DIR           where the combined initrd, qemu.pid and qmp.sock go (default: a temp dir)
#   --exec                  replace this script with QEMU: QEMU gets this script's PID, the serial
#                           console is stdout, and the caller owns --run-dir (test/helpers/guest.ts)
#   --print-cmd             print the QEMU command on stderr
# Without --exec, the console goes to stdout and to RUN_DIR/serial.log, and the exit status is the
# guest script's ("GUEST-EXIT: <rc>"), or 126 when the guest did not get that far.
set -euo pipefail
die() { echo "run-guest.sh: ERROR: $*" >&2; exit 125; }
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

GUEST_SCRIPT=""; GUEST_FILES=(); BLK=(); NET=(); RNG=(); VSOCK=(); QUEUES=1; RECONNECT=0; SERVER=0; MEM=512M; MAXMEM=""; SLOTS=4; SMP=1; ACCEL=tcg
QMP=""; APPEND=""; KERNEL=""; INITRD=""; RUN_DIR=""; EXEC=0; PRINT_CMD=0; EXTRA=(); PACKED=""
while [ $# -gt 0 ]; do
  case "$1" in
    --script) GUEST_SCRIPT=$2; shift 2 ;;
    --guest-file) GUEST_FILES+=("$2"); shift 2 ;;
    --vhost-user-blk) BLK+=("$SERVER:$RECONNECT:$QUEUES:$2"); shift 2 ;;
    --blk-server) SERVER=1; shift ;;
    --blk-reconnect) RECONNECT=$2; shift 2 ;;
    --blk-queues) QUEUES=$2; shift 2 ;;
    --vhost-user-net) NET+=("$2"); shift 2 ;;
    --vhost-user-rng) RNG+=("$2"); shift 2 ;;
    --vhost-user-vsock) VSOCK+=("$2"); shift 2 ;;
    --packed) PACKED=",packed=on"; shift ;;
    --mem) MEM=$2; shift 2 ;;
    --maxmem) MAXMEM=$2; shift 2 ;;
    --slots) SLOTS=$2; shift 2 ;;
    --smp) SMP=$2; shift 2 ;;
    --accel) ACCEL=$2; shift 2 ;;
    --qmp) QMP=$2; shift 2 ;;
    --append) APPEND="$APPEND $2"; shift 2 ;;
    --kernel) KERNEL=$2; shift 2 ;;
    --initrd) INITRD=$2; shift 2 ;;
    --run-dir) RUN_DIR=$2; shift 2 ;;
    --exec) EXEC=1; shift ;;
    --print-cmd) PRINT_CMD=1; shift ;;
    --) shift; EXTRA=("$@"); break ;;
    -h|--help) sed -n '2,/^set -e/{/^set -e/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
    *) die "unknown argument: $1 (see --help)" ;;
  esac
done
case "$ACCEL" in tcg|kvm) ;; *) die "--accel must be tcg or kvm" ;; esac
QEMU=$(command -v qemu-system-x86_64) || die "qemu-system-x86_64 not found: apt-get install -y qemu-system-x86"
BUSYBOX=""
for b in /bin/busybox /usr/bin/busybox; do [ -x "$b" ] && { BUSYBOX=$b; break; }; done
[ -n "$BUSYBOX" ] || die "busybox not found: apt-get install -y busybox-static"

if [ -z "$KERNEL" ] || [ -z "$INITRD" ]; then
  [ -z "$KERNEL" ] && [ -z "$INITRD" ] || die "give both --kernel and --initrd, or neither"
  BUILD_DIR=${GUEST_BUILD_DIR:-${TMPDIR:-/tmp}/vhost-user-guest-build}
  KERNEL=$BUILD_DIR/vmlinux INITRD=$BUILD_DIR/initramfs.cpio.gz
  if [ ! -s "$KERNEL" ] || [ ! -s "$INITRD" ] || [ "$SCRIPT_DIR/build-initramfs.sh" -nt "$INITRD" ] \
     || [ "$SCRIPT_DIR/init" -nt "$INITRD" ]; then
    bash "$SCRIPT_DIR/build-initramfs.sh" -o "$INITRD" --vmlinux "$KERNEL" >/dev/null
  fi
fi
[ -r "$KERNEL" ] || die "kernel $KERNEL not readable"
[ -r "$INITRD" ] || die "initrd $INITRD not readable"
[ -z "$GUEST_SCRIPT" ] || [ -r "$GUEST_SCRIPT" ] || die "guest script $GUEST_SCRIPT not readable"
for d in "${BLK[@]}"; do
  p=${d#*:}; p=${p#*:}; p=${p#*:}
  [ "${d%%:*}" = 1 ] || [ -S "$p" ] || die "vhost-user socket $p does not exist (start the backend first)"
done
# --vhost-user-net SOCK[,mac=MAC][,queues=N][,server=1][,offloads=off] -> NET_SOCK[i] NET_MAC[i] NET_QUEUES[i]
# NET_SERVER[i] NET_OFFLOADS[i]
NET_SOCK=(); NET_MAC=(); NET_QUEUES=(); NET_SERVER=(); NET_OFFLOADS=()
i=0
for n in "${NET[@]}"; do
  IFS=, read -r -a parts <<< "$n"
  sock=${parts[0]:-}; mac=$(printf '52:54:00:12:34:%02x' $((0x56 + i))); q=1; srv=0; ol=''
  for kv in "${parts[@]:1}"; do
    case "$kv" in
      mac=*) mac=${kv#mac=} ;;
      queues=*) q=${kv#queues=} ;;
      server=1) srv=1 ;;
      offloads=off) ol=",csum=off,guest_csum=off,host_tso4=off,host_tso6=off,host_ecn=off,guest_tso4=off,guest_tso6=off,guest_ecn=off,host_ufo=off,guest_ufo=off" ;;
      *) die "--vhost-user-net $n: unknown option $kv (mac=, queues=, server=1, offloads=off)" ;;
    esac
  done
  [[ "$mac" =~ ^([0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2}$ ]] || die "--vhost-user-net $n: bad MAC $mac"
  [[ "$q" =~ ^[1-9][0-9]*$ ]] || die "--vhost-user-net $n: bad queues=$q"
  [ "$srv" = 1 ] || [ -S "$sock" ] || die "vhost-user socket $sock does not exist (start the backend first)"
  NET_SOCK+=("$sock"); NET_MAC+=("$mac"); NET_QUEUES+=("$q"); NET_SERVER+=("$srv"); NET_OFFLOADS+=("$ol")
  i=$((i + 1))
done

if [ -z "$RUN_DIR" ]; then
  [ "$EXEC" = 0 ] || die "--exec needs --run-dir"
  RUN_DIR=$(mktemp -d "${TMPDIR:-/tmp}/run-guest.XXXXXX")
  trap 'rm -rf "$RUN_DIR"' EXIT
fi
mkdir -p "$RUN_DIR"
[ -n "$QMP" ] || QMP=$RUN_DIR/qmp.sock
rm -f "$QMP" "$RUN_DIR/qemu.pid"

# The guest files go into a second cpio appended to the initrd: the kernel unpacks concatenated archives.
COMBINED=$INITRD
if [ -n "$GUEST_SCRIPT" ] || [ ${#GUEST_FILES[@]} -gt 0 ]; then
  OV=$RUN_DIR/overlay
  rm -rf "$OV"; mkdir -p "$OV/guest"
  [ -z "$GUEST_SCRIPT" ] || cp "$GUEST_SCRIPT" "$OV/guest/test.sh"
  for f in "${GUEST_FILES[@]}"; do cp "$f" "$OV/guest/"; done
  chmod -R a+rX "$OV"
  COMBINED=$RUN_DIR/initrd.img
  cp "$INITRD" "$COMBINED"
  ( cd "$OV" && find guest | LC_ALL=C sort | "$BUSYBOX" cpio -o -H newc -R 0:0 2>/dev/null ) \
    | "$BUSYBOX" gzip -c >> "$COMBINED"
  rm -rf "$OV"
fi

MEMOPT=$MEM
[ -z "$MAXMEM" ] || MEMOPT="$MEM,slots=$SLOTS,maxmem=$MAXMEM"
CMD=("$QEMU" -name vhost-user-test -nodefaults -no-user-config -display none -no-reboot
     -machine q35 -accel "$ACCEL" -smp "$SMP" -m "$MEMOPT"
     -object "memory-backend-memfd,id=mem,size=$MEM,share=on" -numa node,memdev=mem
     -kernel "$KERNEL" -initrd "$COMBINED"
     -append "console=ttyS0 panic=-1 loglevel=4$APPEND"
     -serial stdio
     -qmp "unix:$QMP,server=on,wait=off"
     -pidfile "$RUN_DIR/qemu.pid")
[ "$ACCEL" = tcg ] || CMD+=(-cpu host)
i=0
for d in "${BLK[@]}"; do
  srv=${d%%:*}; rest=${d#*:}; r=${rest%%:*}; rest=${rest#*:}; q=${rest%%:*}; p=${rest#*:}
  rc=""
  [ "$r" = 0 ] || rc=",reconnect=$r"
  [ "$srv" = 0 ] || rc=",server=on,wait=off"
  CMD+=(-chardev "socket,id=vublk$i,path=${p//,/,,}$rc"
        -device "vhost-user-blk-pci,id=vublk$i,chardev=vublk$i,num-queues=$q$PACKED")
  i=$((i + 1))
done
for (( i=0; i<${#NET_SOCK[@]}; i++ )); do
  q=${NET_QUEUES[$i]}; mq=""
  [ "$q" = 1 ] || mq=",mq=on"
  rc=""
  [ "${NET_SERVER[$i]}" = 0 ] || rc=",server=on,wait=off"
  CMD+=(-chardev "socket,id=vunet$i,path=${NET_SOCK[$i]}$rc"
        -netdev "vhost-user,id=vunet$i,chardev=vunet$i,queues=$q"
        -device "virtio-net-pci,id=nic$i,netdev=vunet$i,mac=${NET_MAC[$i]},romfile=,vectors=0$mq$PACKED${NET_OFFLOADS[$i]}")
done
for (( i=0; i<${#RNG[@]}; i++ )); do
  [ -S "${RNG[$i]}" ] || die "vhost-user socket ${RNG[$i]} does not exist (start the backend first)"
  CMD+=(-chardev "socket,id=vurng$i,path=${RNG[$i]//,/,,}" -device "vhost-user-rng-pci,id=vurng$i,chardev=vurng$i$PACKED")
done
for (( i=0; i<${#VSOCK[@]}; i++ )); do
  [ -S "${VSOCK[$i]}" ] || die "vhost-user socket ${VSOCK[$i]} does not exist (start the backend first)"
  CMD+=(-chardev "socket,id=vuvsock$i,path=${VSOCK[$i]//,/,,}" -device "vhost-user-vsock-pci,id=vuvsock$i,chardev=vuvsock$i")
done
CMD+=("${EXTRA[@]}")
[ "$PRINT_CMD" = 0 ] || { printf '%q ' "${CMD[@]}" >&2; echo >&2; }

if [ "$EXEC" = 1 ]; then exec "${CMD[@]}" </dev/null; fi
set +e
"${CMD[@]}" </dev/null 2>&1 | tee "$RUN_DIR/serial.log"
set -e
rc=$(tr -d '\r' < "$RUN_DIR/serial.log" | sed -n 's/^GUEST-EXIT: \([0-9]*\).*/\1/p' | tail -n 1)
[ -n "$rc" ] || { echo "run-guest.sh: no GUEST-EXIT line: the guest did not finish" >&2; exit 126; }
exit "$rc"

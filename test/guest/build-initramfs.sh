#!/usr/bin/env bash
# build-initramfs.sh - build the guest's initramfs (busybox-static + virtio/ext4 modules + ./init)
# and extract the uncompressed kernel (vmlinux) from /boot/vmlinuz-KVER.
#
# Needs the Debian packages busybox-static and linux-image-amd64; downloads nothing.
# test/helpers/guest.ts calls this once per kernel and caches the outputs.
#
# Usage: build-initramfs.sh -o OUT.cpio.gz [-k KVER] [--vmlinux FILE]
#                           [-m "boot modules"] [--extra-modules "on-demand modules"]
#   -o FILE          the initramfs to write (gzip'd newc cpio)
#   -k KVER          kernel version (default: newest with /boot/vmlinuz-KVER and /lib/modules/KVER/modules.dep)
#   --vmlinux FILE   also extract the ELF kernel to FILE (needs xz-utils for Debian's kernel). QEMU boots
#                    it through its PVH entry point, which skips the in-guest decompression (about 2 s
#                    faster per boot under TCG). If that fails, FILE is not written: boot the bzImage.
#   -m LIST          modules loaded by /init at boot (default "virtio_pci virtio_blk virtio_net virtio_rng")
#   --extra-modules LIST  modules only packed, for `modprobe NAME` in guest scripts
#                    (default "crc32c_generic ext4 vmw_vsock_virtio_transport": Debian's ext4 needs crc32c,
#                    even for ext2; virtio-vsock for the vsock tests)
#   --binaries LIST  dynamically linked host programs packed into /bin with the libraries ldd names (e.g.
#                    "socat", Debian's, which has VSOCK support); one that is not installed is left out
# Dependencies come from modules.dep; compressed modules (.ko.xz/.gz/.zst) are decompressed. The guest
# gets /lib/modules/KVER/NAME.ko plus a matching modules.dep, so busybox modprobe works in it.
set -euo pipefail
die() { echo "build-initramfs.sh: ERROR: $*" >&2; exit 1; }
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

OUT=""; KVER=""; VMLINUX=""; MODULES="virtio_pci virtio_blk virtio_net virtio_rng"; EXTRA_MODULES="crc32c_generic ext4 vmw_vsock_virtio_transport"; BINARIES=""
while [ $# -gt 0 ]; do
  case "$1" in
    -o) OUT=$2; shift 2 ;;
    -k) KVER=$2; shift 2 ;;
    --vmlinux) VMLINUX=$2; shift 2 ;;
    -m) MODULES=$2; shift 2 ;;
    --extra-modules) EXTRA_MODULES=$2; shift 2 ;;
    --binaries) BINARIES=$2; shift 2 ;;
    -h|--help) sed -n '2,/^set -e/{/^set -e/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
    *) die "unknown argument: $1 (see --help)" ;;
  esac
done
[ -n "$OUT" ] || die "-o OUT is required"

BUSYBOX=""
for b in /bin/busybox /usr/bin/busybox; do [ -x "$b" ] && { BUSYBOX=$b; break; }; done
[ -n "$BUSYBOX" ] || die "busybox not found: apt-get install -y busybox-static"
# The dynamically linked busybox (Debian package 'busybox') cannot run in the initramfs.
if ldd "$BUSYBOX" 2>/dev/null | grep -q '=>'; then
  die "$BUSYBOX is dynamically linked: apt-get install -y busybox-static"
fi
if command -v gzip >/dev/null 2>&1; then GZIP_CMD=(gzip -9 -n -c); else GZIP_CMD=("$BUSYBOX" gzip -9 -c); fi

if [ -z "$KVER" ]; then
  for v in $(ls -1 /lib/modules 2>/dev/null | sort -V -r); do
    if [ -e "/boot/vmlinuz-$v" ] && [ -e "/lib/modules/$v/modules.dep" ]; then KVER=$v; break; fi
  done
  [ -n "$KVER" ] || die "no /boot/vmlinuz-KVER with /lib/modules/KVER/modules.dep: apt-get install -y linux-image-amd64"
fi
MODDIR=/lib/modules/$KVER
[ -r "$MODDIR/modules.dep" ] || die "$MODDIR/modules.dep missing: apt-get install -y linux-image-amd64"

# ---- module resolution. modules.dep lines: "kernel/drivers/block/virtio_blk.ko[.xz]: dep1.ko dep2.ko"
norm() { local n=${1##*/}; n=${n%%.ko*}; echo "${n//-/_}"; }
declare -A PATH_OF=() DEPS_OF=() BUILTIN=() SEEN=()
while IFS= read -r line; do
  p=${line%%:*}; n=$(norm "$p"); PATH_OF[$n]=$p; DEPS_OF[$n]=${line#*:}
done < "$MODDIR/modules.dep"
if [ -r "$MODDIR/modules.builtin" ]; then
  while IFS= read -r p; do BUILTIN[$(norm "$p")]=1; done < "$MODDIR/modules.builtin"
fi
ORDER=()
resolve() {   # depth first: dependencies before the module (modules.dep lists the one to load first last)
  local n=${1//-/_} deps i
  [ -z "${SEEN[$n]:-}" ] || return 0
  SEEN[$n]=1
  if [ -z "${PATH_OF[$n]:-}" ]; then
    [ -n "${BUILTIN[$n]:-}" ] && return 0
    die "module $n not found in $MODDIR/modules.dep"
  fi
  read -r -a deps <<< "${DEPS_OF[$n]}"
  for (( i=${#deps[@]}-1; i>=0; i-- )); do resolve "$(norm "${deps[$i]}")"; done
  ORDER+=("$n")
}
for m in $MODULES $EXTRA_MODULES; do resolve "$m"; done
BOOT_MODULES=()
for m in $MODULES; do m=${m//-/_}; [ -z "${PATH_OF[$m]:-}" ] || BOOT_MODULES+=("$m"); done

# ---- staging tree
STAGE=$(mktemp -d "${TMPDIR:-/tmp}/initramfs.XXXXXX")
trap 'rm -rf "$STAGE"' EXIT
mkdir -p "$STAGE"/{bin,etc,proc,sys,dev,tmp,run,mnt,guest,lib/modules/"$KVER"}
ln -s bin "$STAGE/sbin"   # the kernel calls /sbin/modprobe for request_module()
cp "$BUSYBOX" "$STAGE/bin/busybox"
for a in $("$BUSYBOX" --list); do [ "$a" = busybox ] || ln -s busybox "$STAGE/bin/$a"; done
# gives /init a console before devtmpfs is mounted (needs root; /init copes without it)
mknod -m 600 "$STAGE/dev/console" c 5 1 2>/dev/null || true
cp "$SCRIPT_DIR/init" "$STAGE/init"; chmod 755 "$STAGE/init"
PACKED_BINARIES=()
for b in $BINARIES; do
  path=$(command -v "$b" 2>/dev/null) || continue
  cp "$path" "$STAGE/bin/$b"
  # Every library ldd resolves ("name => /path (addr)") and the loader ("/lib64/ld-linux-x86-64.so.2 (addr)").
  for lib in $(ldd "$path" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }'); do
    mkdir -p "$STAGE$(dirname "$lib")"
    cp -L "$lib" "$STAGE$lib"
  done
  PACKED_BINARIES+=("$b")
done

GDIR=$STAGE/lib/modules/$KVER
: > "$GDIR/modules.dep"
for n in "${ORDER[@]}"; do
  src=$MODDIR/${PATH_OF[$n]}
  case "$src" in
    *.ko) cp "$src" "$GDIR/$n.ko" ;;
    *.ko.xz) "$BUSYBOX" xzcat "$src" > "$GDIR/$n.ko" ;;
    *.ko.gz) "$BUSYBOX" zcat "$src" > "$GDIR/$n.ko" ;;
    *.ko.zst) command -v zstd >/dev/null 2>&1 || die "$src is zstd compressed: apt-get install -y zstd"
              zstd -q -dc "$src" > "$GDIR/$n.ko" ;;
    *) die "unknown module file type: $src" ;;
  esac
  deps=""
  for d in ${DEPS_OF[$n]}; do deps="$deps $(norm "$d").ko"; done
  echo "$n.ko:$deps" >> "$GDIR/modules.dep"
done
printf '%s\n' "${BOOT_MODULES[@]}" > "$STAGE/etc/modules.load"

mkdir -p "$(dirname "$OUT")"
( cd "$STAGE" && find . -mindepth 1 | LC_ALL=C sort | "$BUSYBOX" cpio -o -H newc -R 0:0 2>/dev/null ) \
  | "${GZIP_CMD[@]}" > "$OUT.tmp.$$"
mv "$OUT.tmp.$$" "$OUT"
echo "build-initramfs.sh: kernel $KVER, modules: ${ORDER[*]} (boot: ${BOOT_MODULES[*]}), binaries: ${PACKED_BINARIES[*]:-none}" >&2
echo "build-initramfs.sh: wrote $OUT ($(stat -c %s "$OUT") bytes)" >&2

# ---- vmlinux, the way the kernel's scripts/extract-vmlinux does it: find the payload's compression
# magic in the bzImage, decompress from there (trailing data is expected), keep the first ELF result.
# Debian's payload is xz with the x86 BCJ filter, which busybox cannot decode: that needs xz-utils.
# Without it only a warning is printed, and the guest boots the bzImage (about 2 s slower under TCG).
if [ -n "$VMLINUX" ]; then
  IMG=/boot/vmlinuz-$KVER
  [ -r "$IMG" ] || die "$IMG not readable"
  tmp=$VMLINUX.tmp.$$
  ok=0
  for spec in "xz -dc:"$'\xfd''7zXZ' "gzip -dc:"$'\x1f\x8b\x08' "zstd -q -dc:"$'\x28\xb5\x2f\xfd'; do
    dec=${spec%%:*}; magic=${spec#*:}
    command -v "${dec%% *}" >/dev/null 2>&1 || continue
    for off in $(LC_ALL=C grep -abo "$magic" "$IMG" 2>/dev/null | cut -d: -f1 | head -n 4); do
      tail -c +$((off + 1)) "$IMG" | $dec > "$tmp" 2>/dev/null || true
      if [ "$(head -c 4 "$tmp" | od -An -c | tr -d ' ')" = '177ELF' ]; then ok=1; break 2; fi
    done
  done
  if [ "$ok" = 1 ]; then
    mv "$tmp" "$VMLINUX"
    echo "build-initramfs.sh: extracted $VMLINUX ($(stat -c %s "$VMLINUX") bytes)" >&2
  else
    rm -f "$tmp"
    echo "build-initramfs.sh: WARNING: could not extract vmlinux from $IMG (apt-get install -y xz-utils);" \
      "boot $IMG instead" >&2
  fi
fi
echo "$OUT"

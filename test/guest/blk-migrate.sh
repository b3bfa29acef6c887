# blk-migrate.sh - guest script (busybox sh, run as /guest/test.sh) for live migration tests.
# While the host migrates the VM from one QEMU to another (and back), the guest keeps doing two kinds of I/O on $DEV
# (default /dev/vda), a round at a time ("GUEST-MARK: round N"):
#  - a read of the next 256 KiB of the phase's read area through the page cache (the backend writes those pages of
#    guest memory: a migration that misses them leaves stale pages in the destination's page cache);
#  - an O_DIRECT write of a numbered 4 KiB block into the write area (acknowledged writes must all be on the disk).
# The host says a migration is over through the disk itself: it writes "GO <phase>" into the last 4 KiB block of the
# image, which the guest reads with O_DIRECT each round. Then the guest prints, for that phase,
#   GUEST-RESULT: md5 <phase> <offset> <length> <md5 of the area read so far, through the page cache: no I/O>
# and goes on with the next phase (PHASES, default 2: there and back). At the end it reads every block it wrote back
# with O_DIRECT and prints GUEST-RESULT: writes <count> bad <count>.
# During a phase a background process keeps rewriting 1 MiB of memory, so that a migration held open with a tiny
# downtime limit cannot converge before the host lets it.
dev=${DEV:-/dev/vda}
phases=${PHASES:-2}
area=${READ_AREA_KIB:-6144}       # KiB read per phase, from offset (phase - 1) * area
wstart=$(( phases * area / 4 ))   # first 4 KiB block of the write area
[ -b "$dev" ] || { echo "GUEST-RESULT: FAIL no block device $dev"; exit 1; }
size=$(cat /sys/block/${dev#/dev/}/size)                      # 512-byte sectors
goblk=$(( size / 8 - 1 ))
# Keep the device open: Linux drops a block device's page cache on its last close.
exec 3<"$dev"
sync; echo 3 > /proc/sys/vm/drop_caches
block() { yes "$(printf 'mig %08d ' "$1")" | head -c 4096; }
written=0
echo "GUEST-MARK: ready"
phase=1
round=0
while [ "$phase" -le "$phases" ]; do
  read_kib=0
  base=$(( (phase - 1) * area ))
  ( while :; do dd if=/dev/zero of=/tmp/dirty bs=64k count=16 conv=notrunc 2>/dev/null; done ) &
  dirtier=$!
  while :; do
    round=$((round + 1))
    if [ "$read_kib" -lt "$area" ]; then
      dd if="$dev" of=/dev/null bs=64k skip=$(( (base + read_kib) / 64 )) count=4 2>/dev/null \
        || { echo "GUEST-RESULT: FAIL read at ${read_kib} KiB"; exit 1; }
      read_kib=$((read_kib + 256))
    fi
    block "$written" > /tmp/b
    dd if=/tmp/b of="$dev" bs=4096 seek=$((wstart + written)) count=1 oflag=direct conv=notrunc 2>/tmp/err \
      || { echo "GUEST-RESULT: FAIL write $written: $(cat /tmp/err)"; exit 1; }
    written=$((written + 1))
    echo "GUEST-MARK: round $round phase $phase"
    go=$(dd if="$dev" bs=4096 skip="$goblk" count=1 iflag=direct 2>/dev/null | head -c 4)
    [ "$go" = "GO $phase" ] && break
    sleep 0.2
  done
  kill "$dirtier"; wait "$dirtier" 2>/dev/null
  sum=$(dd if="$dev" bs=64k skip=$((base / 64)) count=$((read_kib / 64)) 2>/dev/null | md5sum | cut -d' ' -f1)
  echo "GUEST-RESULT: md5 $phase $((base * 1024)) $((read_kib * 1024)) $sum"
  phase=$((phase + 1))
done
bad=0
i=0
while [ "$i" -lt "$written" ]; do
  want=$(block "$i" | md5sum | cut -d' ' -f1)
  got=$(dd if="$dev" bs=4096 skip=$((wstart + i)) count=1 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
  [ "$want" = "$got" ] || bad=$((bad + 1))
  i=$((i + 1))
done
echo "GUEST-RESULT: writes $written bad $bad"

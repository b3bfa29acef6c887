# blk-kill-writer.sh - guest script (busybox sh, run as /guest/test.sh) for backend restart tests.
# Writes $BLOCKS numbered 4 KiB blocks (each filled with its own number) to $DEV (default /dev/vda) with O_DIRECT,
# one dd per block, printing GUEST-MARK: writing first and GUEST-MARK: wrote N about every 64 blocks; the host kills and
# restarts the backend meanwhile. Any failed dd is an I/O error the guest saw: FAIL. Then it drops the caches, reads
# every block back with O_DIRECT and compares; prints GUEST-RESULT: PASS blocks=N or FAIL with the first bad block.
dev=${DEV:-/dev/vda}
n=${BLOCKS:-512}
[ -b "$dev" ] || { echo "GUEST-RESULT: FAIL no block device $dev"; exit 1; }
block() { yes "$(printf 'block %08d ' "$1")" | head -c 4096; }
# $WRITERS (default 1) writers run at once, writer w taking the blocks i with i % WRITERS == w: several requests in
# flight, so that a backend completing out of order is exercised.
writers=${WRITERS:-1}
rm -f /tmp/failed
writer() {
  i=$1
  while [ "$i" -lt "$n" ]; do
    block "$i" > /tmp/b$1
    dd if=/tmp/b$1 of="$dev" bs=4096 seek="$i" count=1 oflag=direct conv=notrunc 2>/tmp/err$1 \
      || { echo "write $i: $(cat /tmp/err$1)" >> /tmp/failed; return 1; }
    i=$((i + writers))
    [ $((i % 64)) -ge "$writers" ] || echo "GUEST-MARK: wrote $i"
  done
}
echo "GUEST-MARK: writing"
w=0
while [ "$w" -lt "$writers" ]; do
  writer "$w" &
  w=$((w + 1))
done
wait
[ ! -e /tmp/failed ] || { echo "GUEST-RESULT: FAIL $(head -n 1 /tmp/failed)"; exit 1; }
sync; echo 3 > /proc/sys/vm/drop_caches
i=0
while [ "$i" -lt "$n" ]; do
  want=$(block "$i" | md5sum | cut -d' ' -f1)
  got=$(dd if="$dev" bs=4096 skip="$i" count=1 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
  [ "$want" = "$got" ] || { echo "GUEST-RESULT: FAIL block $i reads back wrong"; exit 1; }
  i=$((i + 1))
done
echo "GUEST-RESULT: PASS blocks=$n"

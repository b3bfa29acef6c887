# blk-kill-writer.sh - guest script (busybox sh, run as /guest/test.sh) for backend restart tests.
# Writes $BLOCKS numbered 4 KiB blocks (each filled with its own number) to $DEV (default /dev/vda) with O_DIRECT,
# one dd per block, printing GUEST-MARK: writing first and GUEST-MARK: wrote N every 64 blocks; the host kills and
# restarts the backend meanwhile. Any failed dd is an I/O error the guest saw: FAIL. Then it drops the caches, reads
# every block back with O_DIRECT and compares; prints GUEST-RESULT: PASS blocks=N or FAIL with the first bad block.
dev=${DEV:-/dev/vda}
n=${BLOCKS:-512}
[ -b "$dev" ] || { echo "GUEST-RESULT: FAIL no block device $dev"; exit 1; }
block() { yes "$(printf 'block %08d ' "$1")" | head -c 4096; }
echo "GUEST-MARK: writing"
i=0
while [ "$i" -lt "$n" ]; do
  block "$i" > /tmp/b
  dd if=/tmp/b of="$dev" bs=4096 seek="$i" count=1 oflag=direct conv=notrunc 2>/tmp/err \
    || { echo "GUEST-RESULT: FAIL write $i: $(cat /tmp/err)"; exit 1; }
  i=$((i + 1))
  [ $((i % 64)) -ne 0 ] || echo "GUEST-MARK: wrote $i"
done
sync; echo 3 > /proc/sys/vm/drop_caches
i=0
while [ "$i" -lt "$n" ]; do
  want=$(block "$i" | md5sum | cut -d' ' -f1)
  got=$(dd if="$dev" bs=4096 skip="$i" count=1 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
  [ "$want" = "$got" ] || { echo "GUEST-RESULT: FAIL block $i reads back wrong"; exit 1; }
  i=$((i + 1))
done
echo "GUEST-RESULT: PASS blocks=$n"

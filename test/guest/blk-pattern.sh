# blk-pattern.sh - guest script (busybox sh, run as /guest/test.sh).
# Reads the 1 MiB pattern the host wrote at offset 0 of $DEV (default /dev/vda), writes its own 4 MiB
# pattern at offset 1 MiB with O_DIRECT, drops the caches, reads it back with O_DIRECT, and prints the
# md5s as GUEST-RESULT lines. The host then checks the image file.
dev=${DEV:-/dev/vda}
if [ ! -b "$dev" ]; then
  echo "GUEST-RESULT: FAIL no block device $dev"; ls -l /sys/block /sys/bus/virtio/devices; exit 1
fi
echo "GUEST-RESULT: $dev sectors=$(cat "/sys/block/${dev#/dev/}/size")"

md5_host=$(dd if="$dev" bs=1M count=1 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
echo "GUEST-RESULT: host-pattern md5=$md5_host"

yes "vhost-user-blk guest pattern 0123456789abcdef" | head -c 4194304 > /tmp/pat
md5_w=$(md5sum < /tmp/pat | cut -d' ' -f1)
dd if=/tmp/pat of="$dev" bs=1M seek=1 oflag=direct conv=fsync 2>/dev/null \
  || { echo "GUEST-RESULT: FAIL write"; exit 1; }
sync; echo 3 > /proc/sys/vm/drop_caches
md5_r=$(dd if="$dev" bs=1M skip=1 count=4 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
echo "GUEST-RESULT: guest-pattern written md5=$md5_w"
echo "GUEST-RESULT: guest-pattern readback md5=$md5_r"
if [ "$md5_w" = "$md5_r" ]; then echo "GUEST-RESULT: PASS"; exit 0; fi
echo "GUEST-RESULT: FAIL readback mismatch"; exit 1

# fs-roundtrip.sh - guest script (busybox sh, run as /guest/test.sh).
# Makes an ext2 filesystem on $DEV (default /dev/vda) with busybox mke2fs, mounts it (ext4 driver),
# writes a file, syncs, unmounts, drops the caches, mounts again and checks the file. The file holds
# "$FS_TEXT" repeated (default below), so the host can find that text in the image afterwards.
dev=${DEV:-/dev/vda}
text=${FS_TEXT:-vhost-user-blk ext2 round trip}
fail() { echo "GUEST-RESULT: FAIL $*"; exit 1; }
[ -b "$dev" ] || fail "no block device $dev"
modprobe -a crc32c_generic ext4 || fail "modprobe crc32c_generic ext4"
mke2fs -q -F "$dev" >/dev/null 2>&1 || mke2fs -F "$dev" >/dev/null 2>&1 || fail "mke2fs $dev"
mkdir -p /mnt/t
mount -t ext2 "$dev" /mnt/t || fail "mount"
yes "$text" | head -c 65536 > /mnt/t/data.txt
md5_w=$(md5sum < /mnt/t/data.txt | cut -d' ' -f1)
sync
umount /mnt/t || fail "umount"
echo 3 > /proc/sys/vm/drop_caches
mount -t ext2 -o ro "$dev" /mnt/t || fail "second mount"
md5_r=$(md5sum < /mnt/t/data.txt | cut -d' ' -f1)
umount /mnt/t
echo "GUEST-RESULT: fs written md5=$md5_w"
echo "GUEST-RESULT: fs readback md5=$md5_r"
[ "$md5_w" = "$md5_r" ] || fail "fs readback mismatch"
echo "GUEST-RESULT: PASS"

# rng-read.sh - guest script (busybox sh, run as /guest/test.sh) for a vhost-user-rng-pci device: the virtio_rng
# driver must be the current hardware RNG, and two reads of $RNG_BYTES (default 256 KiB) from /dev/hwrng must come
# back whole, differ from each other and not be mostly zeroes. Output: GUEST-RESULT lines "rng current=...",
# "rng bytes=N nonzero=N", then PASS or FAIL.
n=${RNG_BYTES:-262144}
fail() { echo "GUEST-RESULT: FAIL $*"; exit 1; }
[ -c /dev/hwrng ] || fail "no /dev/hwrng"
cur=$(cat /sys/class/misc/hw_random/rng_current)
echo "GUEST-RESULT: rng current=$cur"
case "$cur" in virtio_rng*) ;; *) fail "the current hwrng is $cur, not virtio_rng" ;; esac
head -c "$n" /dev/hwrng > /tmp/a || fail "read /dev/hwrng"
head -c "$n" /dev/hwrng > /tmp/b || fail "read /dev/hwrng again"
size=$(wc -c < /tmp/a)
nonzero=$(tr -d '\000' < /tmp/a | wc -c)
echo "GUEST-RESULT: rng bytes=$size nonzero=$nonzero"
[ "$size" = "$n" ] || fail "read $size bytes of $n"
[ "$(md5sum < /tmp/a)" != "$(md5sum < /tmp/b)" ] || fail "two reads gave the same bytes"
# Random bytes are zero one time in 256: well over 90 % are not.
[ "$nonzero" -gt $((n * 9 / 10)) ] || fail "only $nonzero of $n bytes are not zero"
echo "GUEST-RESULT: PASS"

# hotplug.sh - guest script (busybox sh, run as /guest/test.sh): memory hotplug and unplug while $DEV
# (default /dev/vda) is busy. Adapted from the recipe in /work/shared/guest/guest-tests/hotplug.sh.
# Protocol with the host (test/system/hotplug-guest.test.ts), through console markers:
#   guest: I/O check, starts a background O_DIRECT write/read-verify loop, prints
#          "GUEST-MARK: ready-for-plug"
#   host : QMP object-add memory-backend-memfd + device_add pc-dimm
#   guest: waits for the new /sys/devices/system/memory/memoryN blocks, onlines them as online_movable (so
#          user pages, among them the loop's O_DIRECT buffers, come from the DIMM), I/O check, prints
#          "GUEST-MARK: ready-for-unplug"
#   host : QMP device_del (ACPI eject: the guest kernel offlines the blocks), DEVICE_DELETED, object-del
#   guest: waits for the blocks to go away, I/O check, stops the loop, writes the final pattern
# Results: "GUEST-RESULT: background-io iterations=N errors=E", "GUEST-RESULT: final-pattern ...", and
# "GUEST-RESULT: PASS" or "GUEST-RESULT: FAIL ...". Layout of $DEV: pattern A (4 MiB) at 1 MiB by the I/O
# checks, pattern B (2 MiB) at 16 MiB by the loop, the final pattern (4 MiB) at 32 MiB; nothing else written.
# The texts can be set with PAT_A_TEXT, PAT_B_TEXT and FINAL_TEXT; HOTPLUG_TIMEOUT (s) bounds each wait.
dev=${DEV:-/dev/vda}
MEMDIR=/sys/devices/system/memory
TMO=${HOTPLUG_TIMEOUT:-60}
fail=0
up() { cut -d' ' -f1 /proc/uptime; }
nblocks() { ls -d $MEMDIR/memory[0-9]* 2>/dev/null | wc -l; }
memtotal() { sed -n 's/^MemTotal: *//p' /proc/meminfo; }
md5() { md5sum | cut -d' ' -f1; }
bg_n() { cat /tmp/bg.n 2>/dev/null || echo 0; }

if [ ! -b "$dev" ]; then echo "GUEST-RESULT: FAIL no block device $dev"; exit 1; fi
yes "${PAT_A_TEXT:-hotplug pattern A 0123456789}" | head -c 4194304 > /tmp/patA
yes "${PAT_B_TEXT:-hotplug pattern B abcdefghij}" | head -c 2097152 > /tmp/patB
yes "${FINAL_TEXT:-hotplug final pattern 9876543210}" | head -c 4194304 > /tmp/patF
md5A=$(md5 < /tmp/patA)
md5B=$(md5 < /tmp/patB)
md5F=$(md5 < /tmp/patF)

io_check() {   # $1 = label; pattern A at 1 MiB, written and read back with O_DIRECT
  if ! dd if=/tmp/patA of="$dev" bs=1M seek=1 oflag=direct 2>/dev/null; then
    echo "GUEST-RESULT: FAIL io-$1 write"; fail=1; return
  fi
  r=$(dd if="$dev" bs=1M skip=1 count=4 iflag=direct 2>/dev/null | md5)
  if [ "$r" = "$md5A" ]; then echo "GUEST-RESULT: io-$1 OK t=$(up)"
  else echo "GUEST-RESULT: FAIL io-$1 md5=$r expected=$md5A"; fail=1; fi
}

bg_loop() {    # O_DIRECT write + read-verify of pattern B at 16 MiB (128 KiB requests) until /tmp/stop exists
  i=0; bad=0
  while [ ! -e /tmp/stop ]; do
    if ! dd if=/tmp/patB of="$dev" bs=128k seek=128 oflag=direct 2>/dev/null; then
      bad=$((bad+1)); echo "GUEST-RESULT: bg-error iteration=$i write t=$(up)"
    fi
    r=$(dd if="$dev" bs=128k skip=128 count=16 iflag=direct 2>/dev/null | md5)
    if [ "$r" != "$md5B" ]; then
      bad=$((bad+1)); echo "GUEST-RESULT: bg-error iteration=$i md5=$r t=$(up)"
    fi
    i=$((i+1)); echo $i > /tmp/bg.n
  done
  echo "$i $bad" > /tmp/bg.result
}

# wait_blocks OP N: waits until the number of memory blocks is OP N (-gt/-le), checking every 0.2 s
wait_blocks() {
  t=0
  while ! [ "$(nblocks)" "$1" "$2" ]; do
    sleep 0.2; t=$((t+1)); [ $t -lt $((TMO*5)) ] || return 1
  done
}

echo "GUEST-RESULT: memory block_size_bytes=0x$(cat $MEMDIR/block_size_bytes) blocks=$(nblocks) MemTotal=$(memtotal)"
io_check initial
base=$(nblocks)
bg_loop &
bgpid=$!
echo "GUEST-MARK: ready-for-plug t=$(up)"

# ---- plugged: the host has added the DIMM
wait_blocks -gt "$base" || { echo "GUEST-RESULT: FAIL no memory hotplugged after ${TMO}s"; fail=1; }
sleep 0.2   # all blocks of the DIMM are added by one ACPI notification; let the last one register
onlined=0
for m in $MEMDIR/memory[0-9]*; do
  [ "$(cat "$m/state")" = offline ] || continue
  if echo online_movable > "$m/state" 2>/dev/null; then onlined=$((onlined+1))
  else echo "GUEST-RESULT: FAIL online_movable ${m##*/}"; fail=1; fi
done
echo "GUEST-RESULT: plugged blocks=$(nblocks) onlined=$onlined MemTotal=$(memtotal) bg=$(bg_n) t=$(up)"
# Use the new memory: tmpfs pages are movable allocations, which prefer ZONE_MOVABLE (the DIMM).
dd if=/dev/zero of=/tmp/fill bs=1M count=32 2>/dev/null
io_check after-plug
rm -f /tmp/fill
sleep 1     # the loop runs on with its buffers in the DIMM
echo "GUEST-MARK: ready-for-unplug bg=$(bg_n) t=$(up)"

# ---- unplugged: the host has deleted the DIMM (the kernel offlined its blocks before the eject)
wait_blocks -le "$base" || { echo "GUEST-RESULT: FAIL memory not unplugged after ${TMO}s"; fail=1; }
echo "GUEST-RESULT: unplugged blocks=$(nblocks) MemTotal=$(memtotal) bg=$(bg_n) t=$(up)"
sleep 0.5
io_check after-unplug
touch /tmp/stop; wait $bgpid
read -r n bad < /tmp/bg.result
echo "GUEST-RESULT: background-io iterations=$n errors=$bad"
[ "$bad" = 0 ] || fail=1

# ---- the final pattern, for the host to find in the image
if dd if=/tmp/patF of="$dev" bs=1M seek=32 oflag=direct conv=fsync 2>/dev/null; then
  r=$(dd if="$dev" bs=1M skip=32 count=4 iflag=direct 2>/dev/null | md5)
  echo "GUEST-RESULT: final-pattern written=$md5F readback=$r"
  [ "$r" = "$md5F" ] || { echo "GUEST-RESULT: FAIL final-pattern readback"; fail=1; }
else
  echo "GUEST-RESULT: FAIL final-pattern write"; fail=1
fi
if [ "$fail" = 0 ]; then echo "GUEST-RESULT: PASS"; else echo "GUEST-RESULT: FAIL"; fi
exit $fail

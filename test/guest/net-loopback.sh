# net-loopback.sh - guest script (busybox sh, run as /guest/test.sh) for a NIC whose backend sends every frame
# back (`vhost-user net --port loopback`, or DPDK testpmd's macswap). IPv6 and ARP are off on $NET_DEV, so the
# only frames are $NET_FRAMES IPv4 pings to a made-up address (to the NIC's own MAC, as ARP is off): each must
# come back once. The stack drops the returned frames (not its address, no forwarding); the driver counts them.
# Output: GUEST-RESULT lines "eth0 mac=...", "stats rx_packets=... tx_packets=... ...", PASS or FAIL.
dev=${NET_DEV:-eth0}
frames=${NET_FRAMES:-5}
[ -e "/sys/class/net/$dev" ] || { echo "GUEST-RESULT: FAIL no $dev"; ls /sys/class/net; exit 1; }
stat_of() { cat "/sys/class/net/$dev/statistics/$1"; }
echo 1 > "/proc/sys/net/ipv6/conf/$dev/disable_ipv6" 2>/dev/null
ip addr add 10.9.0.1/24 dev "$dev"
# No ARP: every IPv4 frame goes to the NIC's own MAC, and nothing waits for a neighbour that never answers.
ip link set "$dev" arp off
ip link set "$dev" up
# Frames sent before the carrier is up are dropped by the qdisc: wait (max 5 s) for it.
i=0
while [ "$(cat "/sys/class/net/$dev/operstate")" != up ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
echo "GUEST-RESULT: $dev mac=$(cat "/sys/class/net/$dev/address")"
ping -c "$frames" -i 0.2 -W 1 10.9.0.2 >/dev/null 2>&1
# A frame the backend returns arrives within microseconds; give the last one a moment under TCG.
i=0
while [ "$(stat_of rx_packets)" -lt "$(stat_of tx_packets)" ] && [ $i -lt 20 ]; do sleep 0.1; i=$((i + 1)); done
s=""
for k in rx_packets tx_packets rx_bytes tx_bytes rx_dropped tx_dropped rx_errors tx_errors; do s="$s $k=$(stat_of $k)"; done
echo "GUEST-RESULT: stats$s"
tx=$(stat_of tx_packets); rx=$(stat_of rx_packets)
if [ "$tx" -ge "$frames" ] && [ "$rx" = "$tx" ]; then echo "GUEST-RESULT: PASS"; exit 0; fi
echo "GUEST-RESULT: FAIL sent $tx frames, got $rx back"; exit 1

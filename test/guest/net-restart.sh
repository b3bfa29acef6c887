# net-restart.sh - guest script (busybox sh, run as /guest/test.sh) for a NIC whose backend sends every frame back
# (`vhost-user net --port loopback`) and is restarted by the host meanwhile. Set up as net-loopback.sh (no IPv6, no
# ARP: pings to a made-up address go to the NIC's own MAC and come back). Round 0: 5 pings, each back once. Then for
# each of $NET_RESTARTS restarts: print GUEST-MARK: waiting-restart R, wait (max 90 s) until the carrier went down
# (QEMU sets the link down when the backend's connection closes, up when a new backend has started the device) and
# is up again, then 5 more pings must each come back once: GUEST-MARK: round R ok. Ends with GUEST-RESULT: PASS.
dev=${NET_DEV:-eth0}
restarts=${NET_RESTARTS:-2}
[ -e "/sys/class/net/$dev" ] || { echo "GUEST-RESULT: FAIL no $dev"; exit 1; }
stat_of() { cat "/sys/class/net/$dev/statistics/$1"; }
downs() { cat "/sys/class/net/$dev/carrier_down_count"; }
up() { [ "$(cat "/sys/class/net/$dev/operstate")" = up ]; }
echo 1 > "/proc/sys/net/ipv6/conf/$dev/disable_ipv6" 2>/dev/null
ip addr add 10.9.0.1/24 dev "$dev"
ip link set "$dev" arp off
ip link set "$dev" up
# 5 pings; each must come back (the backend returns a frame within microseconds; a moment more under TCG).
round() {
  tx0=$(stat_of tx_packets); rx0=$(stat_of rx_packets)
  ping -c 5 -i 0.2 -W 1 10.9.0.2 >/dev/null 2>&1
  i=0
  while [ $(($(stat_of rx_packets) - rx0)) -lt $(($(stat_of tx_packets) - tx0)) ] && [ $i -lt 20 ]; do sleep 0.1; i=$((i + 1)); done
  tx=$(($(stat_of tx_packets) - tx0)); rx=$(($(stat_of rx_packets) - rx0))
  [ "$tx" -ge 5 ] && [ "$rx" = "$tx" ] || { echo "GUEST-RESULT: FAIL round $1: sent $tx frames, got $rx back"; exit 1; }
  echo "GUEST-MARK: round $1 ok tx=$tx rx=$rx"
}
i=0
while ! up && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
round 0
r=1
while [ "$r" -le "$restarts" ]; do
  d=$(downs)
  echo "GUEST-MARK: waiting-restart $r"
  i=0
  while { [ "$(downs)" = "$d" ] || ! up; } && [ $i -lt 900 ]; do sleep 0.1; i=$((i + 1)); done
  [ "$(downs)" != "$d" ] && up || { echo "GUEST-RESULT: FAIL restart $r: carrier down count $(downs), operstate $(cat "/sys/class/net/$dev/operstate")"; exit 1; }
  round "$r"
  r=$((r + 1))
done
echo "GUEST-RESULT: PASS"

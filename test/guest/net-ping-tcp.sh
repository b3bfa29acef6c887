# net-ping-tcp.sh - guest script (busybox sh, run as /guest/test.sh): IPv4 over a virtio-net NIC.
# Configures $NET_DEV, waits until $NET_PEER answers a ping (bounded: the peer may still be booting), pings it
# $NET_PINGS times, then optionally receives and/or sends one TCP stream with busybox nc and prints its md5.
#
# Variables (bootGuest({ env })):
#   NET_ADDR       this guest's address with prefix, e.g. 10.0.0.1/24 (required)
#   NET_PEER       the peer's IPv4 address (required)
#   NET_DEV        default eth0
#   NET_WAIT_S     how long to wait for the peer's first answer, and for each TCP step (default 60)
#   NET_PINGS      pings after the first answer (default 3; all must be answered)
#   NET_RECV_PORT  listen on this TCP port, receive one stream until EOF
#   NET_SEND_PORT  then send NET_BYTES random bytes to NET_PEER:NET_SEND_PORT (connects again until the peer
#                  listens, bounded by NET_WAIT_S)
#   NET_BYTES      default 2097152
#   NET_SEND_PACE_S  send the stream 64 KiB at a time with this many seconds between pieces (e.g. 0.1): a stream
#                  that lasts (a migration meanwhile). It is sent in one connection attempt, made once the peer's
#                  beacon (below) answers on NET_SEND_PORT + 1
#   NET_RECV_BEACON  with NET_RECV_PORT: once listening, also accept one connection on NET_RECV_PORT + 1, which
#                  tells a paced sender that the stream's port listens
# Output (GUEST-RESULT lines):
#   eth0 mac=... mtu=... packed=0|1 offloads=XXXX
#   ping-first peer=IP tries=N
#   ping peer=IP sent=N received=M
#   tcp recv bytes=N md5=X            tcp sent bytes=N md5=X ms=T (T: the successful connection's nc, unpaced)
#   stats rx_packets=... tx_packets=... rx_bytes=... tx_bytes=... rx_dropped=... tx_dropped=... rx_errors=...
#   PASS | FAIL reason
# Markers (GUEST-MARK lines): "net-up peer=IP" once the pings are done (the host can ping this guest now, it
# stays up until the TCP steps are over); "tcp-listening port=P" once nc really listens (from /proc/net/tcp).
dev=${NET_DEV:-eth0}
addr=${NET_ADDR:?NET_ADDR is required}
peer=${NET_PEER:?NET_PEER is required}
wait_s=${NET_WAIT_S:-60}
pings=${NET_PINGS:-3}
bytes=${NET_BYTES:-2097152}

fail() { echo "GUEST-RESULT: FAIL $*"; stats; exit 1; }
stat_of() { cat "/sys/class/net/$dev/statistics/$1" 2>/dev/null; }
stats() {
  s=""
  for k in rx_packets tx_packets rx_bytes tx_bytes rx_dropped tx_dropped rx_errors tx_errors; do
    s="$s $k=$(stat_of $k)"
  done
  echo "GUEST-RESULT: stats$s"
}
now() { cut -d' ' -f1 /proc/uptime | cut -d. -f1; }
centis() { cut -d' ' -f1 /proc/uptime | tr -d .; }
deadline() { echo $(( $(now) + wait_s )); }

[ -e "/sys/class/net/$dev" ] || { echo "GUEST-RESULT: FAIL no $dev"; ls /sys/class/net; exit 1; }
ip link set lo up
ip addr add "$addr" dev "$dev" || fail "ip addr add $addr"
ip link set "$dev" up || fail "ip link set $dev up"
# features: one character per feature bit, bit 34 = VIRTIO_F_RING_PACKED; offloads = bits 0 (CSUM), 1 (GUEST_CSUM),
# 7 (GUEST_TSO4), 11 (HOST_TSO4), e.g. 1111 with every one negotiated
f="/sys/class/net/$dev/device/features"
echo "GUEST-RESULT: $dev mac=$(cat "/sys/class/net/$dev/address") mtu=$(cat "/sys/class/net/$dev/mtu") packed=$(cut -c35 "$f") offloads=$(cut -c1,2,8,12 "$f" | tr -d ,)"

# The peer may still be booting: one ping per second until it answers.
tries=0; end=$(deadline)
while :; do
  tries=$((tries + 1))
  ping -c 1 -W 1 "$peer" >/dev/null 2>&1 && break
  [ "$(now)" -lt "$end" ] || fail "no answer from $peer after $tries pings"
  sleep 0.2
done
echo "GUEST-RESULT: ping-first peer=$peer tries=$tries"
out=$(ping -c "$pings" -i 0.2 -W 2 "$peer" 2>&1)
sent=$(echo "$out" | sed -n 's/^\([0-9]*\) packets transmitted.*/\1/p')
recv=$(echo "$out" | sed -n 's/.* \([0-9]*\) packets received.*/\1/p')
echo "GUEST-RESULT: ping peer=$peer sent=${sent:-0} received=${recv:-0}"
[ "${recv:-0}" = "$pings" ] || fail "ping: $out"
echo "GUEST-MARK: net-up peer=$peer"

if [ -n "${NET_RECV_PORT:-}" ]; then
  hexport=$(printf '%04X' "$NET_RECV_PORT")
  # nc's stdin must not reach EOF: busybox nc then half-closes the connection, and the sender's nc exits on
  # that EOF before it has sent everything. A FIFO held open by a sleeping writer never does.
  mkfifo /tmp/rx.hold
  sleep "$wait_s" >/tmp/rx.hold &
  hold_pid=$!
  timeout "$wait_s" nc -l -p "$NET_RECV_PORT" </tmp/rx.hold >/tmp/rx &
  nc_pid=$!
  # Announce the port only once the socket listens (state 0A in /proc/net/tcp or tcp6: busybox nc listens on
  # ::), so that the host connects once.
  i=0
  until cat /proc/net/tcp /proc/net/tcp6 2>/dev/null | grep -q "^ *[0-9]*: [0-9A-F]*:$hexport [0-9A-F]*:0000 0A"; do
    i=$((i + 1)); [ $i -lt 100 ] || fail "nc -l -p $NET_RECV_PORT is not listening"
    sleep 0.05
  done
  echo "GUEST-MARK: tcp-listening port=$NET_RECV_PORT"
  [ -z "${NET_RECV_BEACON:-}" ] || timeout "$wait_s" nc -l -p $((NET_RECV_PORT + 1)) </dev/null >/dev/null 2>&1 &
  wait "$nc_pid"; rc=$?
  kill "$hold_pid" 2>/dev/null; wait "$hold_pid" 2>/dev/null; rm -f /tmp/rx.hold
  [ "$rc" = 0 ] || fail "nc -l -p $NET_RECV_PORT failed or timed out (status $rc)"
  echo "GUEST-RESULT: tcp recv bytes=$(wc -c < /tmp/rx | tr -d ' ') md5=$(md5sum < /tmp/rx | cut -d' ' -f1)"
  rm -f /tmp/rx
fi

if [ -n "${NET_SEND_PORT:-}" ]; then
  dd if=/dev/urandom of=/tmp/tx bs=65536 count=$((bytes / 65536)) 2>/dev/null
  [ $((bytes % 65536)) = 0 ] || dd if=/dev/urandom bs=$((bytes % 65536)) count=1 2>/dev/null >> /tmp/tx
  tries=0; end=$(deadline)
  echo "GUEST-MARK: tcp-sending port=$NET_SEND_PORT"
  if [ -n "${NET_SEND_PACE_S:-}" ]; then
    until nc "$peer" $((NET_SEND_PORT + 1)) </dev/null >/dev/null 2>&1; do
      [ "$(now)" -lt "$end" ] || fail "no beacon from $peer on port $((NET_SEND_PORT + 1))"
      sleep 0.2
    done
    pieces=$(( (bytes + 65535) / 65536 ))
    ( i=0; while [ $i -lt $pieces ]; do dd if=/tmp/tx bs=65536 skip=$i count=1 2>/dev/null; i=$((i + 1)); sleep "$NET_SEND_PACE_S"; done ) \
      | nc "$peer" "$NET_SEND_PORT" >/dev/null 2>/tmp/nc.err || fail "nc $peer $NET_SEND_PORT: $(cat /tmp/nc.err)"
  else
  # nc exits non-zero when the connection is refused (the peer does not listen yet); try again.
  until t0=$(centis); nc "$peer" "$NET_SEND_PORT" </tmp/tx >/dev/null 2>/tmp/nc.err; do
    tries=$((tries + 1))
    [ "$(now)" -lt "$end" ] || fail "nc $peer $NET_SEND_PORT: $(cat /tmp/nc.err) ($tries tries)"
    sleep 0.2
  done
  fi
  t1=$(centis)
  echo "GUEST-RESULT: tcp sent bytes=$(wc -c < /tmp/tx | tr -d ' ') md5=$(md5sum < /tmp/tx | cut -d' ' -f1) ms=$(( (t1 - ${t0:-$t1}) * 10 ))"
  rm -f /tmp/tx
fi

stats
echo "GUEST-RESULT: PASS"

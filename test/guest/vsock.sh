# vsock.sh - guest script (busybox sh + socat, run as /guest/test.sh) for a vhost-user-vsock-pci device. The host
# (CID 2) side is the test: port 5000 is a unix socket of the hybrid convention (UDS_5000), 5001..5004 are Node API
# listeners. Each upload is $VSOCK_BYTES (default 4 MiB) of random bytes; the host answers each with the md5 of
# what it got. Output: GUEST-RESULT lines, then PASS or FAIL.
n=${VSOCK_BYTES:-4194304}
fail() { echo "GUEST-RESULT: FAIL $*"; exit 1; }
modprobe vmw_vsock_virtio_transport || fail "modprobe vmw_vsock_virtio_transport"
command -v socat >/dev/null || fail "no socat in the guest"
head -c "$n" /dev/urandom > /tmp/up
echo "GUEST-RESULT: up md5=$(md5sum < /tmp/up | cut -d' ' -f1)"
# socat half-closes after its input (SHUTDOWN SEND) and waits (-t) for the host's answer.
for port in 5000 5001; do
  got=$(socat -t 30 - "VSOCK-CONNECT:2:$port" < /tmp/up) || fail "upload to port $port"
  echo "GUEST-RESULT: upload port=$port reply=$got"
done
# A slow reader on the host (5003): it reads nothing for 2 s; credit must hold the guest back, nothing is lost.
got=$(socat -t 30 - VSOCK-CONNECT:2:5003 < /tmp/up) || fail "upload to the slow reader"
echo "GUEST-RESULT: upload port=5003 reply=$got"
# 32 connections at once (5002), 64 KiB each.
i=0
while [ "$i" -lt 32 ]; do
  head -c 65536 /dev/urandom > "/tmp/c$i"
  (socat -t 30 - VSOCK-CONNECT:2:5002 < "/tmp/c$i" > "/tmp/r$i") &
  i=$((i + 1))
done
wait
i=0; ok=0
while [ "$i" -lt 32 ]; do
  [ "$(md5sum < "/tmp/c$i" | cut -d' ' -f1)" = "$(cat "/tmp/r$i")" ] && ok=$((ok + 1))
  i=$((i + 1))
done
echo "GUEST-RESULT: concurrent ok=$ok"
# The host resets a connection (5004) after its first bytes: socat sees the reset.
if socat -u FILE:/tmp/up VSOCK-CONNECT:2:5004 2>/dev/null; then r=0; else r=1; fi
echo "GUEST-RESULT: reset failed=$r"
# Host -> guest: listeners on 6000 (reached through the unix socket) and 6001 (the Node API's connect), and on 6002 a
# slow reader: it reads nothing for 4 s (credit must hold the host back), then everything.
socat -u VSOCK-LISTEN:6000 CREATE:/tmp/down0 & p0=$!
socat -u VSOCK-LISTEN:6001 CREATE:/tmp/down1 & p1=$!
socat -u VSOCK-LISTEN:6002 SYSTEM:'sleep 4; cat > /tmp/down2' & p2=$!
sleep 1
echo "GUEST-MARK: listening"
wait "$p0" || fail "listener 6000"
wait "$p1" || fail "listener 6001"
wait "$p2" || fail "listener 6002"
for port in 0 1 2; do
  echo "GUEST-RESULT: download port=600$port md5=$(md5sum < "/tmp/down$port" | cut -d' ' -f1)"
done
echo "GUEST-RESULT: PASS"

// DPDK's testpmd (net_virtio_user, Debian: dpdk-dev) as the vhost-user-net frontend against our net backend
// (`bin/vhost-user.js net`, its own process): traffic in both directions, payload integrity, loopback, 2 queue pairs.
// A third-party driver, so what we accept and what we produce is checked against another implementation than ours.
//
// How the counters compare. testpmd counts a frame as transmitted when it is in the TX avail ring; our `txFrames`
// counts what the backend took out of it. When testpmd stops, it disables the rings and asks for their bases
// (GET_VRING_BASE) without waiting for the backend to drain them, so frames still in the avail ring are never
// taken: ours <= testpmd's, and the difference is at most what a ring holds (queue size, 256, per queue pair). The
// other way round, frames we put into the RX used ring after testpmd's last poll are counted by us and never by
// testpmd: testpmd's RX-packets <= our rxFrames, again within a ring per queue pair (testpmd runs with --no-flush-rx:
// otherwise it drains its RX queues uncounted for a while before forwarding starts).
import assert from 'node:assert/strict';
import { test, type TestContext } from 'node:test';
import { startBackend, type BackendProcess } from '../helpers/backend.js';
import {
  DPDK_TOOLS,
  formatTestpmdResult,
  parseTestpmdOutput,
  runTestpmd,
  startTestpmd,
  type TestpmdOptions,
  type TestpmdResult,
} from '../helpers/dpdk.js';
import { requireTools } from '../helpers/require-tool.js';
import { testTempDir } from '../helpers/tmp.js';

const TIMEOUT = { timeout: 60_000 };
/** virtio_user's default ring size: the most frames that can be in flight on one ring. */
const RING = 256;
/** Seconds of forwarding per case (testpmd prints a stats interval every 1-2 s on this VM: at least one with traffic). */
const SECONDS = 2;

interface NetStats {
  rxFrames: number;
  rxBytes: number;
  rxDropped: number;
  txFrames: number;
  txBytes: number;
  txErrors: number;
  checked: number;
  corrupt: number;
}

async function startOurs(t: TestContext, args: readonly string[]): Promise<BackendProcess> {
  const dir = await testTempDir(t, 'vu-net-');
  const be = await startBackend({ command: 'net', socketPath: dir.join('net.sock'), args, logLevel: 'info' });
  t.after(() => be.stop());
  return be;
}

/** Stops our backend (SIGTERM: it must exit 0) and returns the counters of its `net stats` line. */
async function stopOurs(be: BackendProcess): Promise<NetStats> {
  const code = await be.stop();
  const line = be.logs().find((l) => l.msg === 'net stats');
  assert.equal(code, 0, 'our backend exits 0 on SIGTERM');
  assert.ok(line !== undefined, 'our backend logs one "net stats" line on SIGTERM');
  const stats = line.stats as NetStats;
  for (const k of ['rxFrames', 'rxBytes', 'rxDropped', 'txFrames', 'txBytes', 'txErrors', 'checked', 'corrupt'] as const) {
    assert.equal(typeof stats[k], 'number', `net stats has ${k}`);
  }
  return stats;
}

async function frontend(t: TestContext, be: BackendProcess, o: Omit<TestpmdOptions, 'role' | 'socketPath'>): Promise<TestpmdResult> {
  const r = await runTestpmd({ role: 'frontend', socketPath: be.socketPath, seconds: SECONDS, signal: t.signal, ...o });
  t.diagnostic(`testpmd: ${formatTestpmdResult(r)}`);
  return r;
}

/** testpmd echoed our source's frames (io or macswap forwarding) and every one came back intact. */
function assertEchoIntact(r: TestpmdResult, s: NetStats): void {
  assert.ok(r.rxPackets > 0 && r.txPackets > 0, 'testpmd forwarded frames');
  assert.ok(s.checked > 0, 'our source got its own frames back and checked them');
  assert.equal(s.corrupt, 0, 'no frame came back altered');
  assert.equal(s.checked, s.txFrames, 'every echoed frame is one of ours');
  assert.equal(s.txErrors, 0);
}

/** a <= b, and b - a within `slack`. */
function within(a: number, b: number, slack: number, what: string): void {
  assert.ok(a <= b && b - a <= slack, `${what}: ${a} should be <= ${b} and within ${slack} of it`);
}

// ---- the helper itself ---------------------------------------------------------------------------------------------

const SAMPLE = `
testpmd: create a new mbuf pool <mb_pool_0>: n=16384, size=2176, socket=0
txonly packet forwarding - ports=1 - cores=1 - streams=2 - NUMA support enabled, MP allocation mode: native
Port statistics ====================================
  ######################## NIC statistics for port 0  ########################
  RX-packets: 0          RX-missed: 0          RX-bytes:  0
  RX-errors: 0
  RX-nombuf:  0
  TX-packets: 0          TX-errors: 0          TX-bytes:  0

  Throughput (since last show)
  Rx-pps:            0          Rx-bps:            0
  Tx-pps:            0          Tx-bps:            0
  ############################################################################
  ######################## NIC statistics for port 0  ########################
  RX-packets: 0          RX-missed: 0          RX-bytes:  0
  RX-errors: 0
  RX-nombuf:  0
  TX-packets: 5563904    TX-errors: 0          TX-bytes:  8345856000

  Throughput (since last show)
  Rx-pps:            0          Rx-bps:            0
  Tx-pps:      5000000          Tx-bps:  60000000000
  ############################################################################
  ######################## NIC statistics for port 0  ########################
  RX-packets: 0          RX-missed: 0          RX-bytes:  0
  RX-errors: 0
  RX-nombuf:  0
  TX-packets: 11449280   TX-errors: 0          TX-bytes:  17173920000

  Throughput (since last show)
  Rx-pps:            0          Rx-bps:            0
  Tx-pps:      6000000          Tx-bps:  72000000000
  ############################################################################
  ######################## NIC statistics for port 0  ########################
  RX-packets: 0          RX-missed: 0          RX-bytes:  0
  RX-errors: 0
  RX-nombuf:  0
  TX-packets: 17498272   TX-errors: 0          TX-bytes:  26247408000

  Throughput (since last show)
  Rx-pps:            0          Rx-bps:            0
  Tx-pps:      8000000          Tx-bps:  96000000000
  ############################################################################
Telling cores to stop...

  ------- Forward Stats for RX Port= 0/Queue= 0 -> TX Port= 0/Queue= 0 -------
  RX-packets: 0              TX-packets: 11871776       TX-dropped: 53332736

  ------- Forward Stats for RX Port= 0/Queue= 1 -> TX Port= 0/Queue= 1 -------
  RX-packets: 0              TX-packets: 11871872       TX-dropped: 53332640

  ---------------------- Forward statistics for port 0  ----------------------
  RX-packets: 0              RX-dropped: 0             RX-total: 0
  TX-packets: 23743648       TX-dropped: 106665376     TX-total: 130409024
  ----------------------------------------------------------------------------

  +++++++++++++++ Accumulated forward statistics for all ports+++++++++++++++
  RX-packets: 0              RX-dropped: 0             RX-total: 0
  TX-packets: 23743648       TX-dropped: 106665376     TX-total: 130409024
  ++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++
`;

test('testpmd output parser: rates without warm-up, totals, per-queue streams, frame length', () => {
  const r = parseTestpmdOutput(SAMPLE, { role: 'frontend', mode: 'txonly', cpu: 0.99, seconds: 3 });
  // Intervals 0, 5, 6, 8 Mpps: the idle one and the first busy one (warm-up) are dropped.
  assert.deepEqual(r.intervalsPps, [0, 5e6, 6e6, 8e6]);
  assert.equal(r.samples, 2);
  assert.equal(r.mpps, 7);
  assert.equal(r.minMpps, 6);
  assert.equal(r.maxMpps, 8);
  assert.equal(r.pktlen, 1500);
  assert.equal(r.txPackets, 23743648);
  assert.equal(r.txDropped, 106665376);
  assert.equal(r.rxPackets, 0);
  assert.deepEqual(r.nic, { rxPackets: 0, rxBytes: 0, txPackets: 17498272, txBytes: 26247408000 });
  assert.deepEqual(r.streams, [
    { rxQueue: 0, txQueue: 0, rxPackets: 0, txPackets: 11871776, txDropped: 53332736 },
    { rxQueue: 1, txQueue: 1, rxPackets: 0, txPackets: 11871872, txDropped: 53332640 },
  ]);
  assert.throws(() => parseTestpmdOutput('EAL: Error', { role: 'frontend', mode: 'txonly' }), /no forward statistics/);
});

test('reference pair: DPDK virtio_user txonly -> DPDK vhost PMD rxonly (the helper, both roles)', TIMEOUT, async (t) => {
  if (!requireTools(t, DPDK_TOOLS)) return;
  const dir = await testTempDir(t, 'vu-net-');
  const be = await startTestpmd({ role: 'backend', socketPath: dir.join('vhost.sock'), mode: 'rxonly' });
  t.after(() => be.stop().then(() => undefined, () => undefined));
  const fe = await runTestpmd({ role: 'frontend', socketPath: dir.join('vhost.sock'), mode: 'txonly', seconds: 1, signal: t.signal });
  const ber = await be.stop();
  t.diagnostic(`frontend: ${formatTestpmdResult(fe)}; backend: ${formatTestpmdResult(ber)}`);
  assert.ok(fe.txPackets > 0);
  within(ber.rxPackets, fe.txPackets, RING, 'vhost PMD RX vs virtio_user TX');
});

// ---- our backend ---------------------------------------------------------------------------------------------------

test('(a) DPDK txonly -> our sink: every frame arrives whole, counts match testpmd', TIMEOUT, async (t) => {
  if (!requireTools(t, DPDK_TOOLS)) return;
  const be = await startOurs(t, ['--port', 'sink']);
  const r = await frontend(t, be, { mode: 'txonly', pktlen: 64 });
  const s = await stopOurs(be);
  t.diagnostic(`ours: ${JSON.stringify(s)}`);
  assert.ok(s.txFrames > 0, 'our sink got frames');
  assert.equal(s.txErrors, 0);
  within(s.txFrames, r.txPackets, RING, 'our txFrames vs testpmd TX-packets');
  assert.equal(s.txBytes, s.txFrames * 64, 'every frame 64 bytes (without the virtio-net header)');
  assert.equal(s.rxFrames, 0);
});

test('(b) our source -> DPDK rxonly, 1500-byte frames (mrg_rxbuf): testpmd receives what we sent', TIMEOUT, async (t) => {
  if (!requireTools(t, DPDK_TOOLS)) return;
  const be = await startOurs(t, ['--port', 'source', '--frame-len', '1500']);
  const r = await frontend(t, be, { mode: 'rxonly' });
  const s = await stopOurs(be);
  t.diagnostic(`ours: ${JSON.stringify(s)}`);
  assert.ok(r.rxPackets > 0, 'testpmd received frames');
  within(r.rxPackets, s.rxFrames, RING, 'testpmd RX-packets vs our rxFrames');
  assert.equal(s.rxBytes, s.rxFrames * 1500);
  assert.ok(r.nic !== undefined && r.nic.rxPackets > 0, 'testpmd printed NIC statistics with traffic');
  assert.equal(r.nic.rxBytes, r.nic.rxPackets * 1500, 'testpmd saw 1500-byte frames');
  assert.equal(s.txErrors, 0);
});

test('(c) our source -> DPDK io forwarding (echo) -> our checker, 1500 B: payload intact', TIMEOUT, async (t) => {
  if (!requireTools(t, DPDK_TOOLS)) return;
  const be = await startOurs(t, ['--port', 'source', '--frame-len', '1500']);
  const r = await frontend(t, be, { mode: 'io', txFirst: false });
  const s = await stopOurs(be);
  t.diagnostic(`ours: ${JSON.stringify(s)}`);
  assert.ok(r.rxPackets > 0 && r.txPackets > 0, 'testpmd forwarded frames');
  assert.ok(s.checked > 0, 'our source got its own frames back and checked them');
  assert.equal(s.corrupt, 0, 'no frame came back altered');
  assert.equal(s.txErrors, 0);
  within(s.txFrames, r.txPackets, RING, 'our txFrames vs testpmd TX-packets');
  assert.equal(s.checked, s.txFrames, 'every echoed frame is one of ours');
});

test('(d) loopback: DPDK io --tx-first, frames circulate both ways', TIMEOUT, async (t) => {
  if (!requireTools(t, DPDK_TOOLS)) return;
  const be = await startOurs(t, ['--port', 'loopback']);
  const r = await frontend(t, be, { mode: 'io', txFirst: true, pktlen: 64 });
  const s = await stopOurs(be);
  t.diagnostic(`ours: ${JSON.stringify(s)}`);
  // One burst of 32 frames seeds the loop; each turn is one frame through our TX and RX and testpmd's RX and TX.
  assert.ok(r.rxPackets > 1000 && r.txPackets > 1000, 'testpmd received and sent many frames');
  assert.ok(s.txFrames > 1000 && s.rxFrames > 1000, 'ours received and sent many frames');
  within(s.txFrames, r.txPackets, RING, 'our txFrames vs testpmd TX-packets');
  within(r.rxPackets, s.rxFrames, RING, 'testpmd RX-packets vs our rxFrames');
  assert.ok(s.rxFrames + s.rxDropped <= s.txFrames, 'loopback sends back only what it received');
  assert.equal(s.txErrors, 0);
});

test('(e) 2 queue pairs: both carry traffic, to our sink and from our source', TIMEOUT, async (t) => {
  if (!requireTools(t, DPDK_TOOLS)) return;
  await t.test('txonly -> sink', async (t2) => {
    const be = await startOurs(t2, ['--port', 'sink', '--queues', '2']);
    const r = await frontend(t2, be, { mode: 'txonly', queues: 2, pktlen: 64 });
    const s = await stopOurs(be);
    t2.diagnostic(`ours: ${JSON.stringify(s)}`);
    assert.equal(r.streams.length, 2, 'testpmd reports one stream per queue pair');
    for (const st of r.streams) assert.ok(st.txPackets > 0, `queue ${st.txQueue} sent frames`);
    within(s.txFrames, r.txPackets, 2 * RING, 'our txFrames vs testpmd TX-packets');
    assert.equal(s.txErrors, 0);
  });
  await t.test('source -> rxonly', async (t2) => {
    const be = await startOurs(t2, ['--port', 'source', '--queues', '2']);
    const r = await frontend(t2, be, { mode: 'rxonly', queues: 2 });
    const s = await stopOurs(be);
    t2.diagnostic(`ours: ${JSON.stringify(s)}`);
    assert.equal(r.streams.length, 2, 'testpmd reports one stream per queue pair with traffic');
    for (const st of r.streams) assert.ok(st.rxPackets > 0, `queue ${st.rxQueue} received frames`);
    within(r.rxPackets, s.rxFrames, 2 * RING, 'testpmd RX-packets vs our rxFrames');
  });
});

// Polling mode (--busy-poll): the worker watches the rings instead of sleeping, notifications off (DPDK's vhost PMD
// way). Echo through testpmd io and macswap (which swaps the MAC addresses: our checker looks only past them), every
// frame's payload checked, 64 and 1500 bytes, 1 and 2 queue pairs.
test('(h) polling mode: echo through io and macswap, 64 B and 1500 B, 1 and 2 queue pairs, payloads intact', TIMEOUT, async (t) => {
  if (!requireTools(t, DPDK_TOOLS)) return;
  for (const [mode, len, pairs] of [['io', 64, 1], ['macswap', 1500, 1], ['macswap', 64, 2], ['io', 1500, 2]] as const) {
    await t.test(`${mode}, ${len} B, ${pairs} queue pair(s)`, async (t2) => {
      const be = await startOurs(t2, ['--port', 'source', '--frame-len', String(len), '--queues', String(pairs), '--busy-poll', '1000000']);
      const r = await frontend(t2, be, { mode, txFirst: false, queues: pairs });
      const s = await stopOurs(be);
      t2.diagnostic(`ours: ${JSON.stringify(s)}`);
      assertEchoIntact(r, s);
      if (pairs > 1) assert.equal(r.streams.length, pairs, 'every queue pair carried frames');
    });
  }
});

// Packed virtqueues (VIRTIO_F_RING_PACKED), negotiated with DPDK's virtio_user `packed_vq=1`: with its default
// in_order and mrg_rxbuf, without in_order (IN_ORDER is not offered, so both run out-of-order-capable paths) and
// without mergeable receive buffers. Each: frames both ways with their payload checked (our source, echoed by
// testpmd, back to our checker), and DPDK's own frames counted by our sink.
for (const devargs of ['packed_vq=1', 'packed_vq=1,in_order=0', 'packed_vq=1,mrg_rxbuf=0']) {
  test(`(f) packed rings, ${devargs}: echo with payloads checked, and txonly -> our sink`, TIMEOUT, async (t) => {
    if (!requireTools(t, DPDK_TOOLS)) return;
    await t.test('our source -> DPDK io (echo) -> our checker, 1500 B', async (t2) => {
      const be = await startOurs(t2, ['--port', 'source', '--frame-len', '1500']);
      const r = await frontend(t2, be, { mode: 'io', txFirst: false, devargs });
      const s = await stopOurs(be);
      t2.diagnostic(`ours: ${JSON.stringify(s)}`);
      assertEchoIntact(r, s);
      assertPacked(be);
    });
    await t.test('DPDK txonly -> our sink, 64 B', async (t2) => {
      const be = await startOurs(t2, ['--port', 'sink']);
      const r = await frontend(t2, be, { mode: 'txonly', pktlen: 64, devargs });
      const s = await stopOurs(be);
      t2.diagnostic(`ours: ${JSON.stringify(s)}`);
      assert.ok(s.txFrames > 0, 'our sink got frames');
      within(s.txFrames, r.txPackets, RING, 'our txFrames vs testpmd TX-packets');
      assert.equal(s.txBytes, s.txFrames * 64);
      assert.equal(s.txErrors, 0);
      assertPacked(be);
    });
  });
}

// Client mode: testpmd's virtio_user listens (server=1) and our backend connects (`net --connect`). Our backend is
// SIGKILLed mid-traffic and started again: virtio_user takes the new connection (with SET_VRING_BASE 0 whatever its
// rings say: the backend resumes at used.idx, as DPDK's own does) and its frames reach the new sink.
test('(g) client mode: DPDK virtio_user server=1, our net --connect sink killed mid-traffic and restarted', TIMEOUT, async (t) => {
  if (!requireTools(t, DPDK_TOOLS)) return;
  const dir = await testTempDir(t, 'vu-net-client-');
  const socketPath = dir.join('vmm.sock');
  const ours = (): Promise<BackendProcess> =>
    startBackend({ command: 'net', socketPath, args: ['--port', 'sink'], logLevel: 'info', connect: true });
  // testpmd waits for its backend before it forwards: ours starts meanwhile and retries until the socket is there.
  const tpStarted = startTestpmd({ role: 'frontend', socketPath, mode: 'txonly', pktlen: 64, frontendListens: true });
  let first: BackendProcess | undefined;
  let second: BackendProcess | undefined;
  try {
    first = await ours();
    const tp = await tpStarted;
    try {
      await new Promise((r) => setTimeout(r, 1500));
      await first.kill();
      second = await ours();
      const deadline = Date.now() + 20_000;
      while (!second.logs().some((l) => l.msg === 'ring started') && Date.now() < deadline) await new Promise((r) => setTimeout(r, 100));
      await new Promise((r) => setTimeout(r, 2000));
      const resynced = second.logs().filter((l) => l.msg === 'SET_VRING_BASE disagrees with used.idx: resuming at used.idx');
      const s = await stopOurs(second);
      second = undefined;
      t.diagnostic(`after the restart: ${JSON.stringify(s)}; resynced: ${JSON.stringify(resynced)}`);
      // virtio_user sends SET_VRING_BASE 0 after a reconnect, whatever its rings say: the TX ring resumes at used.idx.
      assert.ok(resynced.length >= 1, 'the TX ring was resynced to used.idx');
      assert.ok(s.txFrames > 0, 'frames reached the restarted backend');
      assert.equal(s.txErrors, 0);
      assert.equal(s.txBytes, s.txFrames * 64);
    } finally {
      await tp.stop().catch(() => undefined);
    }
  } finally {
    await first?.kill();
    await second?.kill();
    await tpStarted.then((tp) => tp.stop()).catch(() => undefined);
  }
});

/** Every ring our backend started ran packed. */
function assertPacked(be: BackendProcess): void {
  const started = be.logs().filter((l) => l.msg === 'ring started');
  assert.ok(started.length >= 2 && started.every((l) => l.packed === true), `rings started: ${JSON.stringify(started)}`);
}

// virtio-net queue handlers (VIRTIO 1.2 §5.1.6) driven directly, in this thread: a driver-side ring builds the chains a
// guest's virtio_net would, the device's handler takes them from a real SplitQueue over test memory, and each case
// checks the bytes the driver finds in its buffers, the used lengths and the counters. Memory is a MemoryTable over
// plain SharedArrayBuffers (so the handlers' one-buffer fast paths run) or the TestMemory of the queue tests (every
// access through GuestMemory.view: the general paths).
//
// Frames on the wire here have no FCS. The virtio-net header is 12 bytes with VERSION_1 or MRG_RXBUF:
//   flags u8 | gso_type u8 | hdr_len u16 | gso_size u16 | csum_start u16 | csum_offset u16 | num_buffers u16
// and 10 bytes (no num_buffers) for a legacy driver without MRG_RXBUF.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { ProduceResult, type QueueHandler, type QueueProducer } from '../../src/devices/device.js';
import { MAX_TX_FRAME, NetFeature } from '../../src/devices/net/constants.js';
import { checksumsVerify, ETH_LEN, ipHeaderLength, TCP_CSUM_OFFSET, TCP_LEN, tcpFrame, tcpPayload } from '../helpers/net-frames.js';
import { createQueueHandler, netHeaderSize, type NetQueueOptions } from '../../src/devices/net/net-queue.js';
import type { PortSpec } from '../../src/devices/net/ports/port.js';
import { SOURCE_ETHERTYPE } from '../../src/devices/net/ports/simple.js';
import { LOOPBACK_RING_BYTES } from '../../src/devices/net/ports/simple.js';
import { SWITCH_RING_BYTES, SwitchFabric, SwitchPort } from '../../src/devices/net/ports/switch.js';
import { newVnetHeader } from '../../src/devices/net/offload.js';

/** The largest frame a switch ring takes (half of it), and how many 64-byte frames it holds (a record: 16 + 64 bytes, in 128). */
const SWITCH_MAX_FRAME = SWITCH_RING_BYTES / 2 - 16;
const SWITCH_RING_FRAMES_64 = SWITCH_RING_BYTES / 128;
const NO_OFFLOAD = newVnetHeader();
import { createNetStats, readNetStats, type NetStatsSnapshot } from '../../src/devices/net/stats.js';
import type { GuestMemory } from '../../src/memory/guest-memory.js';
import { MemoryTable } from '../../src/memory/memory-table.js';
import type { MappedRegion } from '../../src/memory/region.js';
import * as native from '../../src/native/index.js';
import { VirtioFeature, featureBit } from '../../src/protocol/constants.js';
import { copyFromGuest, copyToGuest } from '../../src/queue/descriptor-chain.js';
import { SplitQueue } from '../../src/queue/split-queue.js';
import { SplitQueueDriver, type Segment } from '../../src/queue/split-queue-driver.js';
import { codeOf, standardMemory } from '../queue/test-memory.js';
import { QUEUE_COUNTERS } from '../../src/devices/queue-stats.js';

// ---- memory -------------------------------------------------------------------------------------------------------

// A: [0, 64K) rings and small buffers; B: [0x2_0000, 0x3_0000) and C: [0x3_0000, 0x4_0000), adjacent but separate
// mappings (a buffer may cross from B into C); holes elsewhere. The same map as test/queue/test-memory.ts.
const A_BUF = 0x8000;
const REGION_B = 0x2_0000;
const REGION_C = 0x3_0000;
const REGION_END = 0x4_0000;
const RX_RING = 0x1000;
const TX_RING = 0x3000;
const INDIRECT = 0x6000;

function mappedRegion(gpa: number, size: number, slot: number): MappedRegion {
  const bufferOffset = 64 * (slot + 1); // not 0: code that forgets bufferOffset reads the wrong bytes
  return {
    gpa,
    size,
    uva: 0x7f00_0000_0000 + gpa,
    fileOffset: 0,
    buffer: new SharedArrayBuffer(bufferOffset + size),
    bufferOffset,
    dev: 0n,
    ino: BigInt(slot + 1),
    slot,
  };
}

function tableMemory(): MemoryTable {
  return new MemoryTable([mappedRegion(0, 0x1_0000, 0), mappedRegion(REGION_B, 0x1_0000, 1), mappedRegion(REGION_C, 0x1_0000, 2)]);
}

function put(mem: GuestMemory, gpa: number, bytes: Uint8Array | readonly number[]): void {
  const b = bytes instanceof Uint8Array ? bytes : Uint8Array.from(bytes);
  copyToGuest(mem, gpa, b, 0, b.length);
}

function get(mem: GuestMemory, gpa: number, len: number): Uint8Array {
  const out = new Uint8Array(len);
  copyFromGuest(mem, gpa, out, 0, len);
  return out;
}

function hex(b: Uint8Array): string {
  return Buffer.from(b).toString('hex').replace(/(..)(?!$)/g, '$1 ');
}

// ---- frames and headers -------------------------------------------------------------------------------------------

const MAC_A = [0x52, 0x54, 0x00, 0x00, 0x00, 0x0a];
const MAC_B = [0x52, 0x54, 0x00, 0x00, 0x00, 0x0b];
const MAC_C = [0x52, 0x54, 0x00, 0x00, 0x00, 0x0c];
const BROADCAST = [0xff, 0xff, 0xff, 0xff, 0xff, 0xff];

/** An Ethernet frame of `len` bytes (dst, src, EtherType 0x88b5, then bytes that tell `tag` and their offset). */
function frame(len: number, tag = 0, dst = MAC_B, src = MAC_A): Uint8Array {
  const f = new Uint8Array(len);
  f.set(dst.slice(0, Math.min(6, len)));
  if (len > 6) f.set(src.slice(0, Math.min(6, len - 6)), 6);
  for (let i = 12; i < len; i++) f[i] = (tag * 31 + i * 7) & 0xff;
  if (len >= 14) {
    f[12] = 0x88;
    f[13] = 0xb5;
  }
  return f;
}

/** A virtio-net header of `size` bytes: all zero but flags and gso_type. */
function header(size: number, flags = 0, gsoType = 0): Uint8Array {
  const h = new Uint8Array(size);
  h[0] = flags;
  h[1] = gsoType;
  return h;
}

const V1 = featureBit(VirtioFeature.VERSION_1);
const MRG = featureBit(NetFeature.MRG_RXBUF);

// ---- a queue pair over test memory ---------------------------------------------------------------------------------

interface RxChain {
  /** The writable segments, in chain order. */
  readonly segs: readonly { addr: number; len: number }[];
}

interface Used {
  readonly chain: number;
  readonly len: number;
}

interface Net {
  readonly mem: GuestMemory;
  readonly hdrSize: number;
  readonly rxDriver: SplitQueueDriver<number>;
  readonly rxQueue: SplitQueue;
  readonly rx: QueueHandler;
  readonly producer: QueueProducer;
  readonly txDriver: SplitQueueDriver<number>;
  readonly txQueue: SplitQueue;
  readonly tx: QueueHandler;
  /** Receive chains posted so far; used elements name them by index. */
  readonly rxChains: RxChain[];
  stats(): NetStatsSnapshot;
  /** Adds, publishes and processes one transmit chain; returns its used length. */
  transmit(segments: readonly Segment[], indirectAddr?: number): number;
  /** Posts receive chains of the given descriptor sizes, one after the other from `at`; returns the next free address. */
  postRx(layouts: readonly (readonly number[])[], at: number): number;
  /** Posts one receive chain with these segments. */
  postRxSegments(segs: readonly Segment[]): void;
  produce(budget?: number): ProduceResult;
  /** Used elements of the receive queue since the last call. */
  used(): Used[];
  /** The first `len` bytes the device wrote into receive chain `chain` (its writable segments as one stream). */
  written(chain: number, len: number): Uint8Array;
  close(): void;
}

interface NetOptions {
  readonly port?: PortSpec;
  readonly features?: bigint;
  /** The receive queue's features, when its driver differs (default `features`). */
  readonly rxFeatures?: bigint;
  readonly size?: number;
  readonly mem?: GuestMemory;
}

function ringPair(mem: GuestMemory, size: number, base: number): { driver: SplitQueueDriver<number>; queue: SplitQueue } {
  const layout = SplitQueueDriver.layout(size, base);
  const driver = new SplitQueueDriver<number>(mem, { size, ...layout });
  const queue = new SplitQueue({ size, ...layout, eventIdx: false, indirect: true });
  queue.attach(mem);
  return { driver, queue };
}

/** Pair 0 of a device (receive queue 0, transmit queue 1) over `mem`, with its port and counters. */
function netPair(options: NetOptions = {}): Net {
  const mem = options.mem ?? tableMemory();
  const size = options.size ?? 64;
  const features = options.features ?? (V1 | MRG);
  const statsBuffer = createNetStats(1);
  const queueOptions: NetQueueOptions = { port: options.port ?? { kind: 'loopback' }, stats: statsBuffer };
  const rxRing = ringPair(mem, size, RX_RING);
  const txRing = ringPair(mem, size, TX_RING);
  const rx = createQueueHandler(queueOptions, { queueIndex: 0, features: options.rxFeatures ?? features, instance: 0, stats: new Float64Array(QUEUE_COUNTERS.length) });
  const tx = createQueueHandler(queueOptions, { queueIndex: 1, features, instance: 0, stats: new Float64Array(QUEUE_COUNTERS.length) });
  assert.ok(rx.producer !== undefined, 'the receive queue has a producer');
  assert.equal(tx.producer, undefined, 'the transmit queue has none');
  const producer = rx.producer;
  const txChain = txRing.queue.createChain();
  const rxChains: RxChain[] = [];
  const net: Net = {
    mem,
    hdrSize: netHeaderSize(features),
    rxDriver: rxRing.driver,
    rxQueue: rxRing.queue,
    rx,
    producer,
    txDriver: txRing.driver,
    txQueue: txRing.queue,
    tx,
    rxChains,
    stats: () => readNetStats(statsBuffer),
    transmit(segments, indirectAddr) {
      const head = txRing.driver.addChain(segments, 0, indirectAddr === undefined ? {} : { indirectAddr });
      assert.notEqual(head, -1, 'transmit ring full');
      txRing.driver.publish();
      assert.ok(txRing.queue.popChain(mem, txChain));
      const len = tx.process(mem, txChain);
      txRing.queue.addUsed(txChain.head, len);
      assert.equal(txRing.driver.pollUsed(() => undefined), 1);
      return len;
    },
    postRx(layouts, at) {
      let addr = at;
      for (const sizes of layouts) {
        const segs = sizes.map((len) => {
          const s = { addr, len, writable: true };
          addr += len;
          return s;
        });
        net.postRxSegments(segs);
      }
      return addr;
    },
    postRxSegments(segs) {
      assert.notEqual(rxRing.driver.addChain(segs, rxChains.length), -1, 'receive ring full');
      rxChains.push({ segs: segs.map((s) => ({ addr: s.addr, len: s.len })) });
      rxRing.driver.publish();
    },
    produce(budget = 64) {
      const r = producer.produce(mem, rxRing.queue, budget);
      rxRing.queue.publishUsed();
      return r;
    },
    used() {
      const out: Used[] = [];
      rxRing.driver.pollUsed((chain, len) => out.push({ chain, len }));
      return out;
    },
    written(chain, len) {
      const out = new Uint8Array(len);
      let done = 0;
      for (const s of (rxChains[chain] as RxChain).segs) {
        const n = Math.min(s.len, len - done);
        out.set(get(mem, s.addr, n), done);
        done += n;
      }
      assert.equal(done, len, `chain ${chain} holds fewer than ${len} bytes`);
      return out;
    },
    close() {
      rx.close();
      tx.close();
    },
  };
  return net;
}

/** One frame as the driver reassembles it: num_buffers from the first header, the chains, the frame bytes. */
interface Received {
  readonly header: Uint8Array;
  readonly numBuffers: number;
  readonly chains: number[];
  readonly frame: Uint8Array;
}

/**
 * Reassembles used elements into frames: num_buffers in each frame's header says how many elements it takes. The
 * header is read as the start of the frame's byte stream (it may straddle elements when buffers are tiny).
 */
function reassemble(net: Net, used: readonly Used[]): Received[] {
  const out: Received[] = [];
  const h = net.hdrSize;
  for (let i = 0; i < used.length; ) {
    const parts: Uint8Array[] = [];
    const chains: number[] = [];
    let have = 0;
    const take = (): void => {
      const u = used[i + chains.length];
      assert.ok(u !== undefined, `frame at used element ${i}: ${chains.length} elements hold only ${have} bytes`);
      parts.push(net.written(u.chain, u.len));
      chains.push(u.chain);
      have += u.len;
    };
    while (have < h) take();
    const head = Buffer.concat(parts);
    const numBuffers = h === 12 ? (head[10] as number) | ((head[11] as number) << 8) : 1;
    assert.ok(numBuffers >= chains.length, `num_buffers ${numBuffers} at used element ${i}`);
    while (chains.length < numBuffers) take();
    const stream = Uint8Array.from(Buffer.concat(parts));
    out.push({ header: stream.slice(0, h), numBuffers, chains, frame: stream.slice(h) });
    i += chains.length;
  }
  return out;
}

/** Sends `f` on the transmit queue as one buffer (header + frame) at `at`. */
function sendOne(net: Net, f: Uint8Array, at = A_BUF): number {
  put(net.mem, at, header(net.hdrSize));
  put(net.mem, at + net.hdrSize, f);
  return net.transmit([{ addr: at, len: net.hdrSize + f.length, writable: false }]);
}

const ZERO_COUNTERS: NetStatsSnapshot = {
  rxFrames: 0,
  rxBytes: 0,
  rxDropped: 0,
  txFrames: 0,
  txBytes: 0,
  txErrors: 0,
  txDropped: 0,
  checked: 0,
  corrupt: 0,
  txGso: 0,
  rxGso: 0,
  rxSegmented: 0,
  rxChecksummed: 0,
};

function counters(partial: Partial<NetStatsSnapshot>): NetStatsSnapshot {
  return { ...ZERO_COUNTERS, ...partial };
}

// ---- header size ----------------------------------------------------------------------------------------------------

test('header: 12 bytes with VERSION_1 or MRG_RXBUF, 10 for a legacy driver without MRG_RXBUF', () => {
  assert.equal(netHeaderSize(0n), 10);
  assert.equal(netHeaderSize(V1), 12);
  assert.equal(netHeaderSize(MRG), 12);
  assert.equal(netHeaderSize(V1 | MRG), 12);

  for (const [features, expected] of [
    [0n, '00 00 00 00 00 00 00 00 00 00'],
    [V1, '00 00 00 00 00 00 00 00 00 00 01 00'],
    [MRG, '00 00 00 00 00 00 00 00 00 00 01 00'],
  ] as const) {
    const net = netPair({ features });
    try {
      const f = frame(60, 1);
      // The header the driver sends is all zeros but must be skipped by exactly its size.
      assert.equal(sendOne(net, f), 0, 'nothing is written into a transmit chain');
      net.postRx([[2048]], REGION_B);
      put(net.mem, REGION_B, new Uint8Array(2048).fill(0xee));
      assert.equal(net.produce(), ProduceResult.IDLE);
      const used = net.used();
      const h = net.hdrSize;
      assert.deepEqual(used, [{ chain: 0, len: h + 60 }]);
      const bytes = net.written(0, h + 60);
      assert.equal(hex(bytes.subarray(0, h)), expected, `features 0x${features.toString(16)}`);
      assert.deepEqual(bytes.subarray(h), f);
      assert.equal(get(net.mem, REGION_B + h + 60, 1)[0], 0xee, 'nothing written past the used length');
      assert.deepEqual(net.stats(), counters({ txFrames: 1, txBytes: 60, rxFrames: 1, rxBytes: 60 }));
    } finally {
      net.close();
    }
  }
});

// ---- transmit -------------------------------------------------------------------------------------------------------

test('transmit: one buffer, header then frame, gathered pieces, across regions, indirect: the port gets the same frame', () => {
  const layouts: { name: string; mem: 'table' | 'test'; build: (net: Net, f: Uint8Array) => number }[] = [
    {
      name: 'header and frame in one buffer (DPDK, Linux any_layout)',
      mem: 'table',
      build: (net, f) => sendOne(net, f),
    },
    {
      name: 'header alone, then the frame',
      mem: 'table',
      build: (net, f) => {
        put(net.mem, A_BUF, header(12));
        put(net.mem, REGION_B, f);
        return net.transmit([
          { addr: A_BUF, len: 12, writable: false },
          { addr: REGION_B, len: f.length, writable: false },
        ]);
      },
    },
    {
      name: 'header split over two buffers, frame in three',
      mem: 'table',
      build: (net, f) => {
        put(net.mem, A_BUF, header(12).subarray(0, 5));
        put(net.mem, A_BUF + 0x100, header(12).subarray(5));
        const cut = Math.min(100, f.length); // 14 bytes: the third piece is empty (a zero-length descriptor)
        put(net.mem, REGION_B, f.subarray(0, 10));
        put(net.mem, REGION_B + 0x400, f.subarray(10, cut));
        put(net.mem, REGION_C + 0x400, f.subarray(cut));
        return net.transmit([
          { addr: A_BUF, len: 5, writable: false },
          { addr: A_BUF + 0x100, len: 7, writable: false },
          { addr: REGION_B, len: 10, writable: false },
          { addr: REGION_B + 0x400, len: cut - 10, writable: false },
          { addr: REGION_C + 0x400, len: f.length - cut, writable: false },
        ]);
      },
    },
    {
      name: 'one buffer that crosses from region B into region C',
      mem: 'table',
      build: (net, f) => sendOne(net, f, REGION_C - 40),
    },
    {
      name: 'header alone, then the frame across B and C',
      mem: 'table',
      build: (net, f) => {
        put(net.mem, A_BUF, header(12));
        put(net.mem, REGION_C - 7, f);
        return net.transmit([
          { addr: A_BUF, len: 12, writable: false },
          { addr: REGION_C - 7, len: f.length, writable: false },
        ]);
      },
    },
    {
      name: 'indirect table: header, frame',
      mem: 'table',
      build: (net, f) => {
        put(net.mem, A_BUF, header(12));
        put(net.mem, REGION_B, f);
        return net.transmit(
          [
            { addr: A_BUF, len: 12, writable: false },
            { addr: REGION_B, len: f.length, writable: false },
          ],
          INDIRECT,
        );
      },
    },
    {
      name: 'one buffer, memory that is not a MemoryTable (general path)',
      mem: 'test',
      build: (net, f) => sendOne(net, f),
    },
    {
      name: 'a device-writable descriptor after the frame is ignored',
      mem: 'table',
      build: (net, f) => {
        put(net.mem, A_BUF, Buffer.concat([header(12), f]));
        return net.transmit([
          { addr: A_BUF, len: 12 + f.length, writable: false },
          { addr: REGION_B, len: 64, writable: true },
        ]);
      },
    },
  ];
  for (const len of [14, 60, 1514]) {
    for (const l of layouts) {
      const net = netPair({ mem: l.mem === 'table' ? tableMemory() : standardMemory() });
      try {
        const f = frame(len, len);
        assert.equal(l.build(net, f), 0, l.name);
        net.postRx([[4096]], REGION_B + 0x8000);
        assert.equal(net.produce(), ProduceResult.IDLE);
        const [r, ...more] = reassemble(net, net.used());
        assert.equal(more.length, 0);
        assert.deepEqual(r?.frame, f, `${l.name}, ${len} bytes`);
        assert.deepEqual(net.stats(), counters({ txFrames: 1, txBytes: len, rxFrames: 1, rxBytes: len }), l.name);
      } finally {
        net.close();
      }
    }
  }
});

test('transmit: NEEDS_CSUM, a GSO type, short and oversized frames are txErrors; the queue goes on', () => {
  const net = netPair();
  try {
    const f = frame(60);
    const send = (hdr: Uint8Array, body: Uint8Array): number => {
      put(net.mem, A_BUF, hdr);
      put(net.mem, REGION_B, body);
      return net.transmit([
        { addr: A_BUF, len: hdr.length, writable: false },
        { addr: REGION_B, len: body.length, writable: false },
      ]);
    };
    assert.equal(send(header(12, 0x01), f), 0, 'flags = VIRTIO_NET_HDR_F_NEEDS_CSUM');
    assert.equal(send(header(12, 0, 0x01), f), 0, 'gso_type = VIRTIO_NET_HDR_GSO_TCPV4');
    assert.equal(send(header(12, 0, 0x80), f), 0, 'gso_type = ECN bit alone');
    assert.equal(send(header(12), frame(13)), 0, '13 bytes: shorter than an Ethernet header');
    assert.equal(send(header(12), new Uint8Array(MAX_TX_FRAME + 1)), 0, 'over a 64 KiB IP packet with Ethernet and VLAN headers');
    // The same offload requests through the one-buffer fast path.
    put(net.mem, A_BUF, Buffer.concat([header(12, 0x01), f]));
    assert.equal(net.transmit([{ addr: A_BUF, len: 72, writable: false }]), 0);
    // A chain with only 8 header bytes and nothing else.
    assert.equal(net.transmit([{ addr: A_BUF, len: 8, writable: false }]), 0);
    // A chain with no readable part at all.
    assert.equal(net.transmit([{ addr: A_BUF, len: 100, writable: true }]), 0);
    assert.deepEqual(net.stats(), counters({ txErrors: 8 }));
    assert.equal(net.producer.hasInput(), false, 'nothing reached the port');

    // The queue goes on: a 14-byte frame (the smallest accepted) and the largest.
    assert.equal(send(header(12), frame(14, 3)), 0);
    assert.equal(send(header(12), new Uint8Array(MAX_TX_FRAME)), 0);
    assert.deepEqual(net.stats(), counters({ txErrors: 8, txFrames: 2, txBytes: 14 + MAX_TX_FRAME }));
    net.postRx([[2048]], REGION_C);
    net.produce();
    assert.deepEqual(reassemble(net, net.used()).map((r) => r.frame), [frame(14, 3)]);
  } finally {
    net.close();
  }
});

// ---- offloads (VIRTIO 1.2 §5.1.6.2, §5.1.6.4) ------------------------------------------------------------------------

const HOST_OFFLOADS = [NetFeature.CSUM, NetFeature.HOST_TSO4, NetFeature.HOST_TSO6, NetFeature.HOST_ECN].reduce((f, b) => f | featureBit(b), 0n);
const GUEST_OFFLOADS = [NetFeature.GUEST_CSUM, NetFeature.GUEST_TSO4, NetFeature.GUEST_TSO6, NetFeature.GUEST_ECN].reduce(
  (f, b) => f | featureBit(b),
  0n,
);

interface VnetFields {
  flags?: number;
  gsoType?: number;
  hdrLen?: number;
  gsoSize?: number;
  csumStart?: number;
  csumOffset?: number;
}

/** A 12-byte virtio-net header (little-endian fields, num_buffers 0). */
function vnet(f: VnetFields): Uint8Array {
  const h = new Uint8Array(12);
  const dv = new DataView(h.buffer);
  h[0] = f.flags ?? 0;
  h[1] = f.gsoType ?? 0;
  dv.setUint16(2, f.hdrLen ?? 0, true);
  dv.setUint16(4, f.gsoSize ?? 0, true);
  dv.setUint16(6, f.csumStart ?? 0, true);
  dv.setUint16(8, f.csumOffset ?? 0, true);
  return h;
}

/** Sends header + frame as one transmit buffer in region B (64 KiB: room for a GSO frame). */
function sendWith(net: Net, hdr: Uint8Array, f: Uint8Array): number {
  put(net.mem, REGION_B, hdr);
  put(net.mem, REGION_B + hdr.length, f);
  return net.transmit([{ addr: REGION_B, len: hdr.length + f.length, writable: false }]);
}

/** Receives everything waiting, into mergeable 4 KiB buffers in region C. */
function receiveAll(net: Net): Received[] {
  const out: Received[] = [];
  for (;;) {
    net.postRx(Array.from({ length: 16 }, () => [4096]), REGION_C);
    const r = net.produce();
    out.push(...reassemble(net, net.used()));
    if (r === ProduceResult.IDLE) return out;
  }
}

function partialTcp(ipv6: boolean, payload: number, tcpFlags = 0x18): { frame: Uint8Array; fields: VnetFields } {
  const csumStart = ETH_LEN + ipHeaderLength(ipv6);
  return {
    frame: tcpFrame({ ipv6, payload, checksum: 'partial', tcpFlags, seed: 7 }),
    fields: { flags: 1, csumStart, csumOffset: TCP_CSUM_OFFSET, hdrLen: csumStart + TCP_LEN },
  };
}

test('offloads: a partial checksum passes to a driver with GUEST_CSUM unchanged, and is completed for one without', () => {
  for (const withCsum of [true, false]) {
    const net = netPair({ features: V1 | MRG | HOST_OFFLOADS, rxFeatures: V1 | MRG | (withCsum ? GUEST_OFFLOADS : 0n) });
    try {
      const { frame: f, fields } = partialTcp(false, 100);
      assert.equal(checksumsVerify(f), false, 'a partial checksum does not verify yet');
      assert.equal(sendWith(net, vnet(fields), f), 0);
      const [r, ...more] = receiveAll(net);
      assert.equal(more.length, 0);
      assert.ok(r !== undefined);
      if (withCsum) {
        assert.equal(hex(r.header), '01 00 36 00 00 00 22 00 10 00 01 00', 'NEEDS_CSUM, hdr_len 54, csum_start 34, csum_offset 16');
        assert.deepEqual(r.frame, f, 'the frame as sent');
        assert.equal(net.stats().rxChecksummed, 0);
      } else {
        assert.equal(hex(r.header), '00 00 00 00 00 00 00 00 00 00 01 00', 'a complete frame');
        assert.ok(checksumsVerify(r.frame), 'the checksum was completed');
        assert.deepEqual(tcpPayload(r.frame), tcpPayload(f));
        assert.equal(net.stats().rxChecksummed, 1);
      }
    } finally {
      net.close();
    }
  }
});

test('offloads: a TSO frame (IPv4 and IPv6) reaches a driver with GUEST_TSO whole, and is segmented for one without', () => {
  for (const ipv6 of [false, true]) {
    for (const withTso of [true, false]) {
      const net = netPair({ features: V1 | MRG | HOST_OFFLOADS, rxFeatures: V1 | MRG | (withTso ? GUEST_OFFLOADS : 0n) });
      try {
        const { frame: f, fields } = partialTcp(ipv6, 5000, 0x19); // FIN | PSH | ACK
        const hdr = vnet({ ...fields, gsoType: ipv6 ? 4 : 1, gsoSize: 1448 });
        assert.equal(sendWith(net, hdr, f), 0);
        assert.equal(net.stats().txGso, 1);
        const got = receiveAll(net);
        if (withTso) {
          assert.equal(got.length, 1);
          const [r] = got as [Received];
          assert.deepEqual(r.header.subarray(0, 10), hdr.subarray(0, 10), 'the GSO fields as sent');
          assert.ok(r.numBuffers > 1, 'a 5 KiB frame in 4 KiB mergeable buffers');
          assert.deepEqual(r.frame, f);
          assert.equal(net.stats().rxGso, 1);
        } else {
          assert.equal(got.length, 4, '5000 bytes in segments of 1448');
          const payloads = got.map((r) => tcpPayload(r.frame, ipv6));
          assert.deepEqual(payloads.map((p) => p.length), [1448, 1448, 1448, 656]);
          assert.deepEqual(Uint8Array.from(Buffer.concat(payloads)), tcpPayload(f, ipv6));
          got.forEach((r, i) => {
            assert.equal(hex(r.header), '00 00 00 00 00 00 00 00 00 00 01 00');
            assert.ok(checksumsVerify(r.frame, ipv6), `segment ${i}: checksums verify`);
            const tcp = ETH_LEN + ipHeaderLength(ipv6);
            assert.equal(new DataView(r.frame.buffer, r.frame.byteOffset).getUint32(tcp + 4), 1000 + 1448 * i, 'sequence number');
            assert.equal(r.frame[tcp + 13], i === 3 ? 0x19 : 0x10, 'FIN and PSH on the last segment only');
          });
          const s = net.stats();
          assert.equal(s.rxSegmented, 1);
          assert.equal(s.rxFrames, 4);
        }
      } finally {
        net.close();
      }
    }
  }
});

test('offloads: malformed or unnegotiated offload headers are txErrors, nothing reaches the port, the queue goes on', () => {
  const { frame: f, fields } = partialTcp(false, 3000);
  const tso = { ...fields, gsoType: 1, gsoSize: 1448 };
  const cases: [string, bigint, VnetFields][] = [
    ['NEEDS_CSUM without CSUM negotiated', 0n, fields],
    ['TCPV4 without HOST_TSO4', featureBit(NetFeature.CSUM), tso],
    ['TCPV6 without HOST_TSO6', featureBit(NetFeature.CSUM) | featureBit(NetFeature.HOST_TSO4), { ...tso, gsoType: 4 }],
    ['the ECN bit without HOST_ECN', featureBit(NetFeature.CSUM) | featureBit(NetFeature.HOST_TSO4), { ...tso, gsoType: 0x81 }],
    ['gso_size 0', HOST_OFFLOADS, { ...tso, gsoSize: 0 }],
    ['GSO without NEEDS_CSUM', HOST_OFFLOADS, { ...tso, flags: 0 }],
    ['UDP (UFO), never offered', HOST_OFFLOADS, { ...tso, gsoType: 3 }],
    ['an unknown GSO type', HOST_OFFLOADS, { ...tso, gsoType: 2 }],
    ['csum_start past the frame', HOST_OFFLOADS, { ...fields, csumStart: f.length }],
    ['the checksum field straddles the end', HOST_OFFLOADS, { ...fields, csumStart: f.length - 1, csumOffset: 0 }],
    ['csum_offset 0xffff', HOST_OFFLOADS, { ...fields, csumOffset: 0xffff }],
  ];
  for (const [name, offloads, h] of cases) {
    const net = netPair({ features: V1 | MRG | offloads, rxFeatures: V1 | MRG | GUEST_OFFLOADS });
    try {
      assert.equal(sendWith(net, vnet(h), f), 0);
      assert.deepEqual(net.stats(), counters({ txErrors: 1 }), name);
      assert.equal(net.producer.hasInput(), false, `${name}: nothing reached the port`);
      assert.equal(sendWith(net, vnet({}), frame(60, 1)), 0);
      assert.deepEqual(receiveAll(net).map((r) => r.frame), [frame(60, 1)], `${name}: the queue goes on`);
    } finally {
      net.close();
    }
  }
});

// ---- receive --------------------------------------------------------------------------------------------------------

test('receive into one big buffer: zeroed header, num_buffers 1, the frame, nothing past it', () => {
  for (const [name, mem, at] of [
    ['fast path: one buffer inside a region', tableMemory(), REGION_B],
    ['one buffer across regions B and C', tableMemory(), REGION_C - 100],
    ['memory that is not a MemoryTable', standardMemory(), REGION_B],
  ] as const) {
    const net = netPair({ mem });
    try {
      put(mem, at, new Uint8Array(2048).fill(0xee)); // stale bytes where the header goes must be zeroed
      net.postRx([[2048]], at);
      const f = frame(1514, 9);
      sendOne(net, f);
      assert.equal(net.produce(), ProduceResult.IDLE, name);
      assert.deepEqual(net.used(), [{ chain: 0, len: 12 + 1514 }], name);
      const bytes = net.written(0, 12 + 1514);
      assert.equal(hex(bytes.subarray(0, 12)), '00 00 00 00 00 00 00 00 00 00 01 00', name);
      assert.deepEqual(bytes.subarray(12), f, name);
      assert.equal(get(mem, at + 12 + 1514, 1)[0], 0xee, `${name}: nothing written past the frame`);
    } finally {
      net.close();
    }
  }
});

test('receive with MRG_RXBUF: a frame spans several chains, num_buffers counts them, the bytes are right', () => {
  const net = netPair({ features: V1 | MRG });
  try {
    // Six chains of three descriptors (100 + 50 + 50 bytes); the first descriptor of the first chain holds 11 bytes,
    // so num_buffers straddles two descriptors (byte 10 in one, byte 11 in the next).
    net.postRxSegments([
      { addr: REGION_B, len: 11, writable: true },
      { addr: REGION_B + 0x100, len: 139, writable: true },
      { addr: REGION_B + 0x200, len: 50, writable: true },
    ]);
    net.postRx(Array.from({ length: 5 }, () => [100, 50, 50]), REGION_C - 250); // the second chain crosses into C
    const f = frame(1000, 4);
    sendOne(net, f);
    assert.equal(net.produce(), ProduceResult.IDLE);
    const used = net.used();
    // 12 + 1000 bytes: five full chains of 200 bytes, then 12 bytes in the sixth.
    assert.deepEqual(used, [0, 1, 2, 3, 4, 5].map((chain) => ({ chain, len: chain < 5 ? 200 : 12 })));
    assert.equal(hex(net.written(0, 12)), '00 00 00 00 00 00 00 00 00 00 06 00');
    const [r] = reassemble(net, used);
    assert.equal(r?.numBuffers, 6);
    assert.deepEqual(r?.frame, f);
    assert.deepEqual(net.stats(), counters({ txFrames: 1, txBytes: 1000, rxFrames: 1, rxBytes: 1000 }));
  } finally {
    net.close();
  }
});

test('receive with MRG_RXBUF: buffers smaller than the header (a driver error) still get num_buffers right', () => {
  // VIRTIO 1.2 §5.1.6.3.1 asks the driver for buffers of at least the header's size; Linux vhost-net copes with less
  // by writing the header as a byte stream across buffers. The device must not lose num_buffers (or fail the queue).
  const net = netPair({ features: V1 | MRG });
  try {
    net.postRx([[8], [300], [300]], REGION_B);
    const f = frame(400, 2);
    sendOne(net, f);
    assert.equal(net.produce(), ProduceResult.IDLE);
    const used = net.used();
    assert.deepEqual(used, [
      { chain: 0, len: 8 },
      { chain: 1, len: 300 },
      { chain: 2, len: 104 }, // 12 + 400 bytes: 8 + 300 + 104
    ]);
    const stream = Buffer.concat(used.map((u) => net.written(u.chain, u.len)));
    assert.equal(hex(stream.subarray(0, 12)), '00 00 00 00 00 00 00 00 00 00 03 00');
    assert.deepEqual(Uint8Array.from(stream.subarray(12)), f);
  } finally {
    net.close();
  }
});

test('receive without MRG_RXBUF: a frame larger than the next buffer is dropped, the buffer given back', () => {
  for (const features of [V1, 0n]) {
    const net = netPair({ features });
    try {
      net.postRx([[500, 100], [600]], REGION_B);
      sendOne(net, frame(600 - net.hdrSize + 1, 1)); // one byte too many for either chain
      sendOne(net, frame(100, 2));
      sendOne(net, frame(600 - net.hdrSize, 3)); // exactly fills a chain
      assert.equal(net.produce(), ProduceResult.IDLE);
      const used = net.used();
      assert.deepEqual(used, [
        { chain: 0, len: net.hdrSize + 100 },
        { chain: 1, len: 600 },
      ]);
      const got = reassemble(net, used);
      assert.deepEqual(got.map((r) => r.frame), [frame(100, 2), frame(600 - net.hdrSize, 3)]);
      assert.ok(got.every((r) => r.numBuffers === 1));
      const s = net.stats();
      assert.equal(s.rxDropped, 1);
      assert.equal(s.rxFrames, 2);
    } finally {
      net.close();
    }
  }
});

test('receive with an empty ring: STARVED, the frame waits in the port and is delivered once buffers come', () => {
  const net = netPair();
  try {
    const f1 = frame(1000, 1);
    const f2 = frame(60, 2);
    sendOne(net, f1);
    sendOne(net, f2);
    assert.equal(net.produce(), ProduceResult.STARVED);
    assert.equal(net.producer.hasInput(), true);
    assert.deepEqual(net.used(), []);
    // Two chains of 400 bytes are not enough for 12 + 1000 bytes: they are taken, then given back.
    net.postRx([[400], [400]], REGION_B);
    assert.equal(net.produce(), ProduceResult.STARVED);
    assert.deepEqual(net.used(), []);
    assert.equal(net.rxQueue.availableCount(), 2, 'both chains were given back');
    // A third makes room for the first frame; the second waits for more buffers.
    net.postRx([[400]], REGION_B + 0x1000);
    assert.equal(net.produce(), ProduceResult.STARVED);
    const first = reassemble(net, net.used());
    assert.deepEqual(first.map((r) => [r.chains, r.frame]), [[[0, 1, 2], f1]]);
    net.postRx([[400]], REGION_B + 0x2000);
    assert.equal(net.produce(), ProduceResult.IDLE);
    assert.deepEqual(reassemble(net, net.used()).map((r) => r.frame), [f2]);
    assert.equal(net.producer.hasInput(), false);
    assert.deepEqual(net.stats(), counters({ txFrames: 2, txBytes: 1060, rxFrames: 2, rxBytes: 1060 }));
  } finally {
    net.close();
  }
});

test('produce delivers at most `budget` frames and says BUDGET', () => {
  const net = netPair();
  try {
    for (let i = 0; i < 5; i++) sendOne(net, frame(60, i));
    net.postRx(Array.from({ length: 5 }, () => [128]), REGION_B);
    assert.equal(net.produce(2), ProduceResult.BUDGET);
    assert.equal(net.used().length, 2);
    assert.equal(net.produce(3), ProduceResult.BUDGET);
    assert.equal(net.produce(3), ProduceResult.IDLE);
    assert.equal(net.used().length, 3);
  } finally {
    net.close();
  }
});

test('a receive chain with a device-readable descriptor stops the queue: VIRTIO_NET_RX_READABLE', () => {
  // As the first chain of a frame (fast path) and as a later chain of a merged frame.
  for (const later of [false, true]) {
    const net = netPair();
    try {
      if (later) net.postRx([[100]], REGION_B);
      net.postRxSegments([
        { addr: REGION_B + 0x1000, len: 12, writable: false },
        { addr: REGION_B + 0x1100, len: 2048, writable: true },
      ]);
      sendOne(net, frame(200));
      assert.equal(codeOf(() => net.produce()), 'VIRTIO_NET_RX_READABLE');
      assert.equal(net.stats().rxFrames, 0);
    } finally {
      net.close();
    }
  }
  // A receive buffer in a hole is a guest memory error, not a crash.
  const net = netPair();
  try {
    net.postRxSegments([{ addr: REGION_END + 0x1000, len: 2048, writable: true }]);
    sendOne(net, frame(200));
    assert.equal(codeOf(() => net.produce()), 'GUEST_MEMORY_UNMAPPED');
  } finally {
    net.close();
  }
});

// ---- ports ----------------------------------------------------------------------------------------------------------

test('loopback: a FIFO of 1 MiB between transmit and receive (8192 frames of 64..70 bytes); one more is counted txDropped', () => {
  const net = netPair({ size: 64 });
  const frames = LOOPBACK_RING_BYTES / 128; // a record: 16 bytes of header and the frame, in 64-byte units
  try {
    for (let i = 0; i <= frames; i++) sendOne(net, frame(64 + (i % 7), i));
    let bytes = 0;
    for (let i = 0; i < frames; i++) bytes += 64 + (i % 7);
    assert.deepEqual(net.stats(), counters({ txFrames: frames, txBytes: bytes, txDropped: 1 }));
    let got = 0;
    for (let round = 0; round < frames / 64; round++) {
      net.postRx(Array.from({ length: 64 }, () => [128]), REGION_B);
      assert.equal(net.produce(65), round < frames / 64 - 1 ? ProduceResult.STARVED : ProduceResult.IDLE);
      for (const r of reassemble(net, net.used())) {
        assert.deepEqual(r.frame, frame(64 + (got % 7), got), `frame ${got} in order`);
        got++;
      }
    }
    assert.equal(got, frames);
  } finally {
    net.close();
  }
});

test('sink: transmitted frames are counted and dropped; nothing is received', () => {
  const net = netPair({ port: { kind: 'sink' } });
  try {
    for (let i = 0; i < 3; i++) sendOne(net, frame(100, i));
    net.postRx([[2048]], REGION_B);
    assert.equal(net.producer.hasInput(), false);
    assert.equal(net.producer.inputFd, undefined);
    assert.equal(net.produce(), ProduceResult.IDLE);
    assert.deepEqual(net.used(), []);
    assert.deepEqual(net.stats(), counters({ txFrames: 3, txBytes: 300 }));
  } finally {
    net.close();
  }
});

test('source: numbered broadcast frames with the pattern; echoed frames are checked, corrupt ones counted', () => {
  const mac = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
  const net = netPair({ port: { kind: 'source', frameLen: 64, mac } });
  try {
    net.postRx(Array.from({ length: 4 }, () => [128]), REGION_B);
    assert.equal(net.producer.hasInput(), true);
    assert.equal(net.produce(4), ProduceResult.BUDGET, 'a source never runs dry');
    const got = reassemble(net, net.used());
    assert.equal(got.length, 4);
    got.forEach((r, seq) => {
      // ff:ff:ff:ff:ff:ff <- 52:54:00:12:34:56, EtherType 88b5, "VUSR", seq (big endian), then (seq + i) & 0xff
      const expectedHead = `ff ff ff ff ff ff 52 54 00 12 34 56 88 b5 56 55 53 52 00 00 00 0${seq}`;
      assert.equal(hex(r.frame.subarray(0, 22)), expectedHead);
      assert.equal(r.frame.length, 64);
      r.frame.subarray(22).forEach((b, i) => assert.equal(b, (seq + i) & 0xff));
    });
    assert.equal(SOURCE_ETHERTYPE, 0x88b5);

    // Echo them back (as testpmd's io mode would): all checked, none corrupt.
    for (const r of got) sendOne(net, r.frame);
    // One with a flipped payload byte, one without the magic (not checked), one too short to carry it.
    const bad = Uint8Array.from((got[2] as Received).frame);
    bad[40] = (bad[40] as number) ^ 1;
    sendOne(net, bad);
    const foreign = Uint8Array.from((got[1] as Received).frame);
    foreign[14] = 0x00;
    sendOne(net, foreign);
    sendOne(net, (got[0] as Received).frame.subarray(0, 20));
    const s = net.stats();
    assert.equal(s.checked, 5);
    assert.equal(s.corrupt, 1);
    assert.equal(s.txFrames, 7);
    assert.equal(s.rxFrames, 4);
  } finally {
    net.close();
  }
});

test('switch ports: learning, unicast, flooding, a full ring drops, the eventfd wakes the receiver', () => {
  const fabric = new SwitchFabric(3);
  try {
    const [p0, p1, p2] = [0, 1, 2].map((i) => new SwitchPort(fabric.shared, i)) as [SwitchPort, SwitchPort, SwitchPort];
    const efd = fabric.shared.eventFds;
    const drain = (p: SwitchPort): Uint8Array[] => {
      const out: Uint8Array[] = [];
      while (p.next()) {
        out.push(p.frame.buf.slice(p.frame.offset, p.frame.offset + p.frame.length));
        p.consume();
      }
      return out;
    };
    const send = (p: SwitchPort, f: Uint8Array): boolean => p.transmit(f, 0, f.length, NO_OFFLOAD);
    assert.equal(p1.inputFd, efd[1]);

    // A -> B, B unknown: flooded to ports 1 and 2, each woken once (their rings were empty).
    const ab = frame(100, 1, MAC_B, MAC_A);
    assert.equal(send(p0, ab), true);
    assert.equal(native.eventfdRead(efd[1] as number), 1);
    assert.equal(native.eventfdRead(efd[2] as number), 1);
    assert.equal(native.eventfdRead(efd[0] as number), 0, 'not sent back to its own port');
    assert.equal(p1.hasInput(), true);
    assert.deepEqual(drain(p1), [ab]);
    assert.deepEqual(drain(p2), [ab]);
    assert.equal(p1.hasInput(), false);

    // B -> A from port 1: A was learned on port 0, so only port 0 gets it; B is learned on port 1.
    const ba = frame(80, 2, MAC_A, MAC_B);
    assert.equal(send(p1, ba), true);
    assert.equal(p2.hasInput(), false);
    assert.deepEqual(drain(p0), [ba]);
    // A -> B now goes to port 1 only.
    assert.equal(send(p0, ab), true);
    assert.equal(p2.hasInput(), false);
    assert.deepEqual(drain(p1), [ab]);
    // Broadcast from port 2 (C is learned there): to 0 and 1.
    const bc = frame(60, 3, BROADCAST, MAC_C);
    assert.equal(send(p2, bc), true);
    assert.deepEqual(drain(p0), [bc]);
    assert.deepEqual(drain(p1), [bc]);
    // To a MAC behind the sender's own port: nowhere. Multicast source addresses are not learned.
    assert.equal(send(p0, frame(60, 4, MAC_A, MAC_A)), true);
    const mcastSrc = [0x01, 0x00, 0x5e, 0x00, 0x00, 0x01];
    assert.equal(send(p1, frame(60, 5, MAC_C, mcastSrc)), true);
    assert.deepEqual(drain(p2), [frame(60, 5, MAC_C, mcastSrc)]);
    assert.equal(send(p0, frame(60, 6, mcastSrc, MAC_A)), true, 'a multicast destination floods');
    assert.equal(drain(p1).length + drain(p2).length, 2);
    assert.equal(p0.hasInput(), false);
    // Frames the switch cannot carry.
    assert.equal(send(p0, frame(13)), false);
    assert.equal(send(p0, frame(SWITCH_MAX_FRAME + 1)), false);
    assert.equal(send(p0, frame(SWITCH_MAX_FRAME, 7)), true);
    assert.deepEqual(drain(p1), [frame(SWITCH_MAX_FRAME, 7)]);

    // The ring 0 -> 1 holds SWITCH_RING_FRAMES_64 frames of 64 bytes; the next is dropped (port 1 does not consume).
    for (const fd of efd) native.eventfdRead(fd);
    for (let i = 0; i < SWITCH_RING_FRAMES_64; i++) assert.equal(send(p0, frame(64, i)), true);
    assert.equal(native.eventfdRead(efd[1] as number), 1, 'one wake-up for a burst into an empty ring');
    assert.equal(send(p0, frame(64, 999)), false);
    const burst = drain(p1);
    assert.equal(burst.length, SWITCH_RING_FRAMES_64);
    burst.forEach((f, i) => assert.deepEqual(f, frame(64, i)));
    // Having found nothing, next() cleared the eventfd; the next frame into the empty ring writes it again.
    assert.equal(native.eventfdRead(efd[1] as number), 0);
    assert.equal(send(p0, frame(64, 1000)), true);
    assert.equal(native.eventfdRead(efd[1] as number), 1);
    assert.deepEqual(drain(p1), [frame(64, 1000)]);
  } finally {
    fabric.close();
  }
});

test('switch port behind the queue handlers: a frame from the device reaches the other port and back', () => {
  const fabric = new SwitchFabric(2);
  const net = netPair({ port: { kind: 'switch', shared: fabric.shared, index: 0 } });
  try {
    const other = new SwitchPort(fabric.shared, 1);
    assert.equal(net.producer.inputFd, fabric.shared.eventFds[0]);
    const out = frame(300, 1, BROADCAST, MAC_A);
    sendOne(net, out);
    assert.ok(other.next());
    assert.deepEqual(other.frame.buf.slice(other.frame.offset, other.frame.offset + other.frame.length), out);
    other.consume();
    // The reply, unicast to the device's MAC (learned on port 0).
    const back = frame(200, 2, MAC_A, MAC_B);
    assert.ok(other.transmit(back, 0, back.length, NO_OFFLOAD));
    assert.equal(native.eventfdRead(fabric.shared.eventFds[0] as number), 1);
    assert.equal(net.producer.hasInput(), true);
    net.postRx([[2048]], REGION_B);
    assert.equal(net.produce(), ProduceResult.IDLE);
    assert.deepEqual(reassemble(net, net.used()).map((r) => r.frame), [back]);
    // The ring to port 1 fills up: the device counts txDropped. (Fewer than a ring's worth of records fit: the ring
    // does not start at 0 after the first frame, and the record that does not fit before its end skips to the start.)
    let sent = 0;
    while (net.stats().txDropped === 0 && sent <= SWITCH_RING_FRAMES_64) sendOne(net, frame(60, sent++, MAC_B, MAC_A));
    const s = net.stats();
    assert.ok(sent > SWITCH_RING_FRAMES_64 - 4 && sent <= SWITCH_RING_FRAMES_64, `${sent} frames`);
    assert.equal(s.txFrames, sent);
    assert.equal(s.txDropped, 1);
    assert.equal(s.rxFrames, 1);
  } finally {
    net.close();
    fabric.close();
  }
});

// ---- property -------------------------------------------------------------------------------------------------------

const CANARY = 0xa5;

test('property: random receive buffer layouts and frame lengths; every frame arrives intact or is counted dropped, nothing is written outside the writable buffers', () => {
  const layoutArb = fc.array(fc.array(fc.integer({ min: 1, max: 700 }), { minLength: 1, maxLength: 4 }), { minLength: 1, maxLength: 12 });
  const gapsArb = fc.array(fc.integer({ min: 0, max: 64 }), { minLength: 48, maxLength: 48 });
  const framesArb = fc.array(fc.integer({ min: 14, max: 3000 }), { minLength: 1, maxLength: 8 });
  const featuresArb = fc.constantFrom(V1 | MRG, V1, MRG, 0n);
  fc.assert(
    fc.property(layoutArb, gapsArb, framesArb, featuresArb, fc.boolean(), (layout, gaps, lengths, features, table) => {
      const mem = table ? tableMemory() : standardMemory();
      // Canary everywhere the buffers go (regions B and C); the descriptors go there with random gaps between.
      put(mem, REGION_B, new Uint8Array(REGION_END - REGION_B).fill(CANARY));
      const net = netPair({ mem, features, size: 64 });
      try {
        const mergeable = (features & MRG) !== 0n;
        const h = net.hdrSize;
        let addr = REGION_B + 0xf000; // the buffers run across the B/C boundary
        let g = 0;
        const segLists: Segment[][] = layout.map((sizes) =>
          sizes.map((len) => {
            addr += gaps[g++ % gaps.length] as number;
            const s = { addr, len, writable: true };
            addr += len;
            return s;
          }),
        );
        for (const segs of segLists) net.postRxSegments(segs);
        const frames = lengths.map((len, i) => frame(len, i));
        for (const f of frames) sendOne(net, f, A_BUF);
        const result = net.produce(64);
        const used = net.used();

        // The model: chains are taken in order; a frame takes chains until header + frame fit (one chain only without
        // MRG_RXBUF, else it is dropped and the chain given back); when the ring runs dry it waits (STARVED).
        const caps = layout.map((sizes) => sizes.reduce((a, b) => a + b, 0));
        let next = 0;
        const expectUsed: Used[] = [];
        const delivered: Uint8Array[] = [];
        let dropped = 0;
        let starved = false;
        for (const f of frames) {
          let left = h + f.length;
          if (!mergeable) {
            if (next >= caps.length) {
              starved = true;
              break;
            }
            if ((caps[next] as number) < left) {
              dropped++;
              continue;
            }
            expectUsed.push({ chain: next, len: left });
            next++;
            delivered.push(f);
            continue;
          }
          let k = next;
          const taken: Used[] = [];
          while (left > 0 && k < caps.length) {
            const n = Math.min(caps[k] as number, left);
            taken.push({ chain: k, len: n });
            left -= n;
            k++;
          }
          if (left > 0) {
            starved = true;
            break;
          }
          expectUsed.push(...taken);
          next = k;
          delivered.push(f);
        }
        assert.equal(result, starved ? ProduceResult.STARVED : ProduceResult.IDLE);
        assert.deepEqual(used, expectUsed);
        const got = reassemble(net, used);
        assert.deepEqual(got.map((r) => r.frame), delivered);
        if (h === 12) {
          got.forEach((r) => assert.equal(r.numBuffers, mergeable ? r.chains.length : 1));
        }
        for (const r of got) assert.deepEqual([...r.header.subarray(0, 10)], new Array(10).fill(0));
        const s = net.stats();
        assert.equal(s.rxFrames, delivered.length);
        assert.equal(s.rxDropped, dropped);
        assert.equal(s.rxBytes, delivered.reduce((a, f) => a + f.length, 0));

        // Outside the writable buffers, regions B and C still hold the canary.
        const all = get(mem, REGION_B, REGION_END - REGION_B);
        const inside = new Uint8Array(all.length);
        for (const segs of segLists) for (const sg of segs) inside.fill(1, sg.addr - REGION_B, sg.addr - REGION_B + sg.len);
        for (let i = 0; i < all.length; i++) {
          if (inside[i] === 0 && all[i] !== CANARY) assert.fail(`byte at 0x${(REGION_B + i).toString(16)} outside the buffers was written`);
        }
      } finally {
        net.close();
      }
    }),
    { numRuns: 200 },
  );
});

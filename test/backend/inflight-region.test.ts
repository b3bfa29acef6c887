// Inflight I/O tracking (vhost-user.rst "Inflight I/O tracking"): layout and sizes, validation of the frontend's
// GET/SET_INFLIGHT_FD, the split and packed algorithms on hex region images, hostile regions, a crash at every store
// of real queue traffic, and fast-check properties against an independent model.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { VirtioError } from '../../src/errors.js';
import {
  INFLIGHT_VERSION,
  InflightError,
  InflightRegion,
  PackedInflightQueue,
  PackedRegion,
  SplitInflightQueue,
  SplitRegion,
  checkGetInflight,
  checkSetInflight,
  inflightGeometry,
  inflightMmapSize,
  inflightQueueRegionSize,
  type InflightAnomalies,
  type PackedRecovery,
  type SplitRecovery,
} from '../../src/backend/inflight-region.js';
import {
  PackedQueue,
  PackedQueueDriver,
  SplitQueue,
  SplitQueueDriver,
  VRING_DESC_F_NEXT,
  VRING_DESC_F_WRITE,
  VRING_PACKED_DESC_F_AVAIL,
  VRING_PACKED_DESC_F_USED,
  type DescriptorChain,
  type PackedDescriptorValue,
} from '../../src/queue/index.js';
import { hex, toHex } from '../protocol/helpers.js';
import { BUF_BASE, RING_BASE, standardMemory, type TestMemory } from '../queue/test-memory.js';

const AVAIL = VRING_PACKED_DESC_F_AVAIL;
const USED = VRING_PACKED_DESC_F_USED;

function inflightError(code: string): { name: string; code: string } {
  return { name: 'InflightError', code };
}

/** A queue region of `descNum` states from hex: the header, then `descs[i]` at descriptor state i. */
function image(packed: boolean, descNum: number, header: string, descs: Readonly<Record<number, string>> = {}): Uint8Array {
  const bytes = new Uint8Array(new SharedArrayBuffer(inflightQueueRegionSize(descNum, packed)));
  const h = hex(header);
  assert.equal(h.length, packed ? PackedRegion.DESC : SplitRegion.DESC, 'header length');
  bytes.set(h, 0);
  const base = packed ? PackedRegion.DESC : SplitRegion.DESC;
  const size = packed ? PackedRegion.DESC_SIZE : SplitRegion.DESC_SIZE;
  for (const [i, d] of Object.entries(descs)) {
    const b = hex(d);
    assert.equal(b.length, size, `descriptor state ${i} length`);
    bytes.set(b, base + size * Number(i));
  }
  return bytes;
}

function header(bytes: Uint8Array, packed: boolean): string {
  return toHex(bytes.subarray(0, packed ? PackedRegion.DESC : SplitRegion.DESC));
}

function desc(bytes: Uint8Array, packed: boolean, i: number): string {
  const base = packed ? PackedRegion.DESC : SplitRegion.DESC;
  const size = packed ? PackedRegion.DESC_SIZE : SplitRegion.DESC_SIZE;
  return toHex(bytes.subarray(base + size * i, base + size * (i + 1)));
}

const clean = (s: string): string => s.replace(/\s+/g, '');

// ---------------------------------------------------------------------------------------------------------------
// Sizes and layout

test('queue region sizes: split as libvhost-user and DPDK compute it (equal for every size), packed as DPDK', () => {
  const alignUp = (x: number): number => Math.ceil(x / 64) * 64;
  for (let q = 1; q <= 32768; q++) {
    const split = inflightQueueRegionSize(q, false);
    assert.equal(split, alignUp(16 * q + 2), `libvhost-user vu_inflight_queue_size(${q})`);
    assert.equal(split, alignUp(16 * q + 8 + 2 * 4), `DPDK get_pervq_shm_size_split(${q})`);
    assert.ok(split >= SplitRegion.DESC + SplitRegion.DESC_SIZE * q);
    const packed = inflightQueueRegionSize(q, true);
    assert.equal(packed, alignUp(32 * q + 8 + 2 * 6 + 9), `DPDK get_pervq_shm_size_packed(${q})`);
    assert.ok(packed >= PackedRegion.DESC + PackedRegion.DESC_SIZE * q);
  }
  assert.equal(inflightQueueRegionSize(128, false), 0x840); // QEMU's default vhost-user-blk queue-size
  assert.equal(inflightQueueRegionSize(128, true), 0x1040);
  assert.equal(inflightMmapSize(4, 128, false), 4 * 0x840);
  assert.deepEqual(inflightGeometry(2, 256, true), {
    numQueues: 2,
    queueSize: 256,
    packed: true,
    queueRegionSize: 0x2040,
    mmapSize: 0x4080,
  });
  for (const q of [0, 32769, 1.5, -1]) assert.throws(() => inflightQueueRegionSize(q, false), RangeError);
  assert.throws(() => inflightMmapSize(0, 128, false), RangeError);
});

test('field offsets match the C structs (spec QueueRegionSplit / QueueRegionPacked, DPDK rte_vhost.h)', () => {
  assert.deepEqual(
    [SplitRegion.VERSION, SplitRegion.DESC_NUM, SplitRegion.LAST_BATCH_HEAD, SplitRegion.USED_IDX, SplitRegion.DESC],
    [8, 10, 12, 14, 16],
  );
  assert.deepEqual([SplitRegion.D_INFLIGHT, SplitRegion.D_NEXT, SplitRegion.D_COUNTER, SplitRegion.DESC_SIZE], [0, 6, 8, 16]);
  assert.deepEqual(
    [
      PackedRegion.VERSION,
      PackedRegion.DESC_NUM,
      PackedRegion.FREE_HEAD,
      PackedRegion.OLD_FREE_HEAD,
      PackedRegion.USED_IDX,
      PackedRegion.OLD_USED_IDX,
      PackedRegion.USED_WRAP_COUNTER,
      PackedRegion.OLD_USED_WRAP_COUNTER,
      PackedRegion.DESC,
    ],
    [8, 10, 12, 14, 16, 18, 20, 21, 32],
  );
  assert.deepEqual(
    [
      PackedRegion.D_INFLIGHT,
      PackedRegion.D_NEXT,
      PackedRegion.D_LAST,
      PackedRegion.D_NUM,
      PackedRegion.D_COUNTER,
      PackedRegion.D_ID,
      PackedRegion.D_FLAGS,
      PackedRegion.D_LEN,
      PackedRegion.D_ADDR,
      PackedRegion.DESC_SIZE,
    ],
    [0, 2, 4, 6, 8, 16, 18, 20, 24, 32],
  );
});

test('InflightRegion: queue regions are consecutive, layouts are not mixed, memory must fit', () => {
  const g = inflightGeometry(3, 8, false);
  const region = new InflightRegion(new SharedArrayBuffer(g.mmapSize), g);
  assert.equal(region.queueBytes(2).byteOffset, 2 * g.queueRegionSize);
  assert.equal(region.queueBytes(2).length, g.queueRegionSize);
  assert.throws(() => region.queueBytes(3), RangeError);
  assert.throws(() => region.packedQueue(0), RangeError);
  assert.ok(region.splitQueue(1) instanceof SplitInflightQueue);
  assert.throws(() => new InflightRegion(new SharedArrayBuffer(g.mmapSize - 1), g), RangeError);
  assert.throws(() => new InflightRegion(new Uint8Array(new SharedArrayBuffer(g.mmapSize + 8), 4), g), RangeError);
  const p = inflightGeometry(1, 8, true);
  assert.ok(new InflightRegion(new SharedArrayBuffer(p.mmapSize), p).packedQueue(0) instanceof PackedInflightQueue);
});

// ---------------------------------------------------------------------------------------------------------------
// GET_INFLIGHT_FD / SET_INFLIGHT_FD validation: one test per rejected case

const LIMITS = { maxQueues: 4, packed: false } as const;
const FILE = { fileSize: 0x4000, pageSize: 0x1000 } as const;
const GOOD = { mmapSize: 0x2100n, mmapOffset: 0n, numQueues: 4, queueSize: 128 } as const; // 4 * 0x840

test('GET_INFLIGHT_FD: a valid request gives the region to allocate (mmap fields ignored)', () => {
  assert.deepEqual(checkGetInflight({ mmapSize: 0n, mmapOffset: 0n, numQueues: 2, queueSize: 128 }, LIMITS), {
    numQueues: 2,
    queueSize: 128,
    packed: false,
    queueRegionSize: 0x840,
    mmapSize: 0x1080,
  });
  assert.equal(checkGetInflight({ ...GOOD, mmapSize: 1n, mmapOffset: 3n }, LIMITS).mmapSize, 0x2100);
  assert.equal(checkGetInflight({ ...GOOD, numQueues: 1 }, { maxQueues: 1, packed: true }).mmapSize, 0x1040);
  assert.equal(checkGetInflight({ ...GOOD, queueSize: 32768 }, LIMITS).queueSize, 32768);
});

test('rejected: num_queues 0', () => {
  assert.throws(() => checkGetInflight({ ...GOOD, numQueues: 0 }, LIMITS), inflightError('VHOST_INFLIGHT_BAD_NUM_QUEUES'));
  assert.throws(() => checkSetInflight({ ...GOOD, numQueues: 0 }, LIMITS, FILE), inflightError('VHOST_INFLIGHT_BAD_NUM_QUEUES'));
});

test('rejected: num_queues above the device queues (DPDK CVE-2021-3839 class)', () => {
  assert.throws(() => checkGetInflight({ ...GOOD, numQueues: 5 }, LIMITS), inflightError('VHOST_INFLIGHT_BAD_NUM_QUEUES'));
  assert.throws(() => checkSetInflight({ ...GOOD, numQueues: 0xffff }, LIMITS, FILE), inflightError('VHOST_INFLIGHT_BAD_NUM_QUEUES'));
});

test('rejected: queue_size 0', () => {
  assert.throws(() => checkGetInflight({ ...GOOD, queueSize: 0 }, LIMITS), inflightError('VHOST_INFLIGHT_BAD_QUEUE_SIZE'));
  assert.throws(() => checkSetInflight({ ...GOOD, queueSize: 0 }, LIMITS, FILE), inflightError('VHOST_INFLIGHT_BAD_QUEUE_SIZE'));
});

test('rejected: queue_size above 32768', () => {
  assert.throws(() => checkGetInflight({ ...GOOD, queueSize: 32769 }, LIMITS), inflightError('VHOST_INFLIGHT_BAD_QUEUE_SIZE'));
  assert.throws(() => checkSetInflight({ ...GOOD, queueSize: 0xffff }, LIMITS, FILE), inflightError('VHOST_INFLIGHT_BAD_QUEUE_SIZE'));
});

test('SET_INFLIGHT_FD: a valid request (what QEMU sends back after a restart) and a larger mmap_size', () => {
  const g = checkSetInflight(GOOD, LIMITS, FILE);
  assert.equal(g.mmapSize, 0x2100);
  assert.equal(g.mmapOffset, 0);
  assert.equal(checkSetInflight({ ...GOOD, mmapSize: 0x3000n, mmapOffset: 0x1000n }, LIMITS, FILE).mmapSize, 0x2100);
  assert.equal(checkSetInflight({ ...GOOD, mmapSize: 0x4000n }, LIMITS, FILE).mmapOffset, 0);
});

test('rejected: mmap_size smaller than num_queues queue regions', () => {
  assert.throws(() => checkSetInflight({ ...GOOD, mmapSize: 0x20ffn }, LIMITS, FILE), inflightError('VHOST_INFLIGHT_REGION_TOO_SMALL'));
  assert.throws(() => checkSetInflight({ ...GOOD, mmapSize: 0n }, LIMITS, FILE), inflightError('VHOST_INFLIGHT_REGION_TOO_SMALL'));
  // Enough for split, not for packed queue regions of the same size.
  assert.throws(
    () => checkSetInflight(GOOD, { maxQueues: 4, packed: true }, { fileSize: 0x10000, pageSize: 0x1000 }),
    inflightError('VHOST_INFLIGHT_REGION_TOO_SMALL'),
  );
});

test('rejected: mmap_offset not page-aligned', () => {
  assert.throws(() => checkSetInflight({ ...GOOD, mmapOffset: 0x800n }, LIMITS, FILE), inflightError('VHOST_INFLIGHT_BAD_OFFSET'));
  assert.throws(() => checkSetInflight({ ...GOOD, mmapOffset: 1n }, LIMITS, FILE), inflightError('VHOST_INFLIGHT_BAD_OFFSET'));
});

test('rejected: mmap_offset + mmap_size past the end of the file (also when they overflow u64)', () => {
  assert.throws(() => checkSetInflight({ ...GOOD, mmapOffset: 0x2000n }, LIMITS, FILE), inflightError('VHOST_INFLIGHT_BEYOND_FILE'));
  assert.throws(() => checkSetInflight({ ...GOOD, mmapSize: 0x4001n }, LIMITS, FILE), inflightError('VHOST_INFLIGHT_BEYOND_FILE'));
  assert.throws(
    () => checkSetInflight({ ...GOOD, mmapSize: 0xffff_ffff_ffff_ffffn, mmapOffset: 0xffff_ffff_ffff_f000n }, LIMITS, FILE),
    inflightError('VHOST_INFLIGHT_BEYOND_FILE'),
  );
});

test('rejected at ring start: a ring larger than the region tracks', () => {
  const split = new SplitInflightQueue(image(false, 4, '00'.repeat(16)), 4);
  assert.throws(() => split.recover(0, 8), inflightError('VHOST_INFLIGHT_RING_TOO_LARGE'));
  const packed = new PackedInflightQueue(image(true, 4, '00'.repeat(32)), 4);
  const ring = { ringFlagsAt: (): number => 0, setRingFlags: (): void => undefined };
  assert.throws(() => packed.recover({ ringSize: 5, base: 0x8000, ...ring }), inflightError('VHOST_INFLIGHT_RING_TOO_LARGE'));
  assert.ok(new InflightError('VHOST_INFLIGHT_X', 'x') instanceof Error);
});

// ---------------------------------------------------------------------------------------------------------------
// Split: the algorithm on region images

test('split: a fresh region (version 0) is initialised at used->idx, nothing to resubmit', () => {
  const bytes = image(false, 4, '0000000000000000 0000 0000 0300 0900', { 1: '01 0000000000 0000 0500000000000000' });
  const q = new SplitInflightQueue(bytes, 4);
  const r = q.recover(5, 4);
  assert.deepEqual(r, { fresh: true, resubmit: [], lastAvailIdx: 5, usedIdx: 5, repaired: 0, anomalies: {} });
  // features, version 1, desc_num 4, last_batch_head 0, used_idx 5; the stale mark is gone.
  assert.equal(header(bytes, false), clean('0000000000000000 0100 0400 0000 0500'));
  assert.equal(desc(bytes, false, 1), clean('00 0000000000 0000 0500000000000000'));
  assert.equal(q.counter, 0);
});

test('split: marks store the counter then inflight; a batch links next / last_batch_head, then clears and sets used_idx', () => {
  const bytes = image(false, 4, '00'.repeat(16));
  const q = new SplitInflightQueue(bytes, 4);
  q.recover(5, 4);
  assert.ok(q.markInflight(2));
  assert.ok(q.markInflight(0));
  assert.ok(q.markInflight(3));
  assert.equal(q.markInflight(3), false, 'a head already in flight is refused');
  //                                     inflight pad        next counter
  assert.equal(desc(bytes, false, 2), clean('01 0000000000 0000 0000000000000000'));
  assert.equal(desc(bytes, false, 0), clean('01 0000000000 0000 0100000000000000'));
  assert.equal(desc(bytes, false, 3), clean('01 0000000000 0000 0200000000000000'));

  q.pushUsed(3);
  q.prepareUsed();
  assert.equal(header(bytes, false), clean('0000000000000000 0100 0400 0300 0500'), 'last_batch_head 3, used_idx not yet');
  q.commitUsed();
  assert.equal(header(bytes, false), clean('0000000000000000 0100 0400 0300 0600'));
  assert.equal(desc(bytes, false, 3), clean('00 0000000000 0000 0200000000000000'));

  q.pushUsed(0);
  q.pushUsed(2);
  assert.throws(() => q.pushUsed(2), RangeError, 'pushed twice');
  q.prepareUsed();
  // 0.next = 3 (the previous batch), 2.next = 0, last_batch_head = 2; still in flight until commit.
  assert.equal(header(bytes, false), clean('0000000000000000 0100 0400 0200 0600'));
  assert.equal(desc(bytes, false, 0), clean('01 0000000000 0300 0100000000000000'));
  assert.equal(desc(bytes, false, 2), clean('01 0000000000 0000 0000000000000000'));
  assert.throws(() => q.markInflight(1), RangeError, 'no mark between prepareUsed and commitUsed');
  q.commitUsed();
  assert.equal(header(bytes, false), clean('0000000000000000 0100 0400 0200 0800'));
  assert.equal(desc(bytes, false, 0), clean('00 0000000000 0300 0100000000000000'));
  assert.equal(desc(bytes, false, 2), clean('00 0000000000 0000 0000000000000000'));
  assert.equal(q.usedIdx, 8);
  assert.equal(q.inFlight, 0);
  assert.throws(() => q.pushUsed(0), RangeError, 'not in flight');
  q.prepareUsed(); // an empty batch: no-op
  q.commitUsed();
});

test('split: the API refuses use before recover and heads out of range', () => {
  const q = new SplitInflightQueue(image(false, 4, '00'.repeat(16)), 4);
  assert.throws(() => q.markInflight(0), RangeError);
  q.recover(0, 2);
  assert.throws(() => q.markInflight(2), RangeError);
  assert.throws(() => q.markInflight(-1), RangeError);
  assert.throws(() => q.recover(0x1_0000, 2), RangeError);
  q.markInflight(1);
  q.pushUsed(1);
  assert.throws(() => q.commitUsed(), RangeError, 'commit without prepare');
});

test('split: the heads still in flight are resubmitted in counter order (not index order), counter resumes after them', () => {
  const bytes = image(false, 4, '0000000000000000 0100 0400 0100 0a00', {
    0: '01 0000000000 0000 0700000000000000',
    1: '01 0000000000 0200 0300000000000000',
    2: '00 0000000000 0000 0900000000000000', // completed: counter ignored
    3: '01 0000000000 0000 0500000001000000', // counter 0x1_0000_0005
  });
  const q = new SplitInflightQueue(bytes, 4);
  const r = q.recover(10, 4);
  assert.deepEqual(r, { fresh: false, resubmit: [1, 0, 3], lastAvailIdx: 13, usedIdx: 10, repaired: 0, anomalies: {} });
  assert.equal(q.counter, 0x1_0000_0006);
  assert.equal(q.markInflight(0), false, 'resubmitted heads stay in flight');
  q.markInflight(2);
  assert.equal(desc(bytes, false, 2), clean('01 0000000000 0000 0600000001000000'));
});

test('split: a batch published (used->idx stored) but not cleared is repaired from last_batch_head, not resubmitted', () => {
  // Batch [0, 2] (2.next = 0, last_batch_head = 2) was published: used->idx 10, used_idx still 8. Head 1 is in flight.
  const img = (): Uint8Array =>
    image(false, 4, '0000000000000000 0100 0400 0200 0800', {
      0: '01 0000000000 0300 0100000000000000',
      1: '01 0000000000 0000 0400000000000000',
      2: '01 0000000000 0000 0000000000000000',
    });
  const bytes = img();
  const r = new SplitInflightQueue(bytes, 4).recover(10, 4);
  assert.deepEqual(r, { fresh: false, resubmit: [1], lastAvailIdx: 11, usedIdx: 10, repaired: 2, anomalies: {} });
  assert.equal(header(bytes, false), clean('0000000000000000 0100 0400 0200 0a00'));
  assert.equal(desc(bytes, false, 0).slice(0, 2), '00');
  assert.equal(desc(bytes, false, 2).slice(0, 2), '00');
  // The same batch not yet published (used->idx 8): everything is resubmitted, oldest first.
  assert.deepEqual(new SplitInflightQueue(img(), 4).recover(8, 4).resubmit, [2, 0, 1]);
  // Half cleared: 2 already cleared, 0 not.
  const half = img();
  half[SplitRegion.DESC + 2 * SplitRegion.DESC_SIZE] = 0;
  const h = new SplitInflightQueue(half, 4).recover(10, 4);
  assert.deepEqual([h.resubmit, h.repaired], [[1], 1]);
});

test('split: libvhost-user batches of one (used->idx one ahead) are repaired the same way', () => {
  const bytes = image(false, 4, '0000000000000000 0100 0400 0300 ffff', {
    3: '01 0000000000 0100 0200000000000000',
    1: '01 0000000000 0000 0100000000000000',
  });
  const r = new SplitInflightQueue(bytes, 4).recover(0, 4); // used->idx wrapped 0xffff -> 0
  assert.deepEqual([r.resubmit, r.repaired, r.lastAvailIdx], [[1], 1, 1]);
});

// Hostile split regions: every rule skips per entry, counts a reason, and never throws or reads out of range.

function splitRecover(bytes: Uint8Array, usedIdx: number, ringSize: number, descNum = 4): SplitRecovery {
  return new SplitInflightQueue(bytes, descNum).recover(usedIdx, ringSize);
}

test('hostile split: an entry in flight at an index >= the ring size is skipped and cleared', () => {
  const bytes = image(false, 8, '0000000000000000 0100 0800 0000 0000', {
    1: '01 0000000000 0000 0100000000000000',
    6: '01 0000000000 0000 0000000000000000',
  });
  const r = splitRecover(bytes, 0, 4, 8);
  assert.deepEqual([r.resubmit, r.anomalies], [[1], { 'index-out-of-range': 1 }]);
  assert.equal(desc(bytes, false, 6).slice(0, 2), '00');
});

test('hostile split: a last-batch list that loops stops at the loop', () => {
  // used->idx - used_idx = 3, last_batch_head 1, 1.next = 1.
  const bytes = image(false, 4, '0000000000000000 0100 0400 0100 0000', {
    1: '01 0000000000 0100 0000000000000000',
    2: '01 0000000000 0000 0100000000000000',
  });
  const r = splitRecover(bytes, 3, 4);
  assert.deepEqual([r.resubmit, r.repaired, r.anomalies], [[2], 1, { 'batch-loop': 1 }]);
});

test('hostile split: a last-batch list that runs out of range stops there', () => {
  const bytes = image(false, 4, '0000000000000000 0100 0400 0100 0000', {
    1: '01 0000000000 0900 0000000000000000',
    2: '01 0000000000 0000 0100000000000000',
  });
  const r = splitRecover(bytes, 2, 4);
  assert.deepEqual([r.resubmit, r.repaired, r.anomalies], [[2], 1, { 'batch-index-out-of-range': 1 }]);
  const head = image(false, 4, '0000000000000000 0100 0400 ff00 0000', { 2: '01 0000000000 0000 0100000000000000' });
  const h = splitRecover(head, 1, 4);
  assert.deepEqual([h.resubmit, h.repaired, h.anomalies], [[2], 0, { 'batch-index-out-of-range': 1 }]);
});

test('hostile split: a last batch larger than the ring is walked at most ring-size entries', () => {
  const bytes = image(false, 4, '0000000000000000 0100 0400 0000 0000', {
    0: '01 0000000000 0100 0000000000000000',
    1: '01 0000000000 0200 0100000000000000',
    2: '01 0000000000 0300 0200000000000000',
    3: '01 0000000000 0000 0300000000000000',
  });
  const r = splitRecover(bytes, 100, 4);
  assert.deepEqual([r.resubmit, r.repaired, r.usedIdx, r.anomalies], [[], 4, 100, { 'batch-too-large': 1 }]);
});

test('hostile split: counters that repeat keep the lowest index, the others are skipped', () => {
  const bytes = image(false, 4, '0000000000000000 0100 0400 0000 0000', {
    0: '01 0000000000 0000 0500000000000000',
    2: '01 0000000000 0000 0500000000000000',
    3: '01 0000000000 0000 0400000000000000',
  });
  const r = splitRecover(bytes, 0, 4);
  assert.deepEqual([r.resubmit, r.lastAvailIdx, r.anomalies], [[3, 0], 2, { 'duplicate-counter': 1 }]);
  assert.equal(desc(bytes, false, 2).slice(0, 2), '00');
});

test('hostile split: an inflight byte other than 0 or 1, and counters >= 2^53, are skipped', () => {
  const bytes = image(false, 4, '0000000000000000 0100 0400 0000 0000', {
    0: '02 0000000000 0000 0000000000000000',
    1: '01 0000000000 0000 0000000000002000', // 2^53
    2: '01 0000000000 0000 ffffffffffff1f00', // 2^53 - 1: fine
  });
  const r = splitRecover(bytes, 0, 4);
  assert.deepEqual([r.resubmit, r.anomalies], [[2], { 'bad-inflight-value': 1, 'counter-out-of-range': 1 }]);
});

test('hostile split: an unknown version resets the queue region', () => {
  const bytes = image(false, 4, '0000000000000000 0700 0400 0000 0000', { 0: '01 0000000000 0000 0000000000000000' });
  const r = splitRecover(bytes, 3, 4);
  assert.deepEqual([r.fresh, r.resubmit, r.anomalies], [true, [], { 'unknown-version': 1 }]);
  assert.equal(header(bytes, false), clean('0000000000000000 0100 0400 0000 0300'));
});

test('split: a VM reset (fresh GET_INFLIGHT_FD: a zeroed region) drops all resubmit state', () => {
  const g = inflightGeometry(1, 4, false);
  const old = new InflightRegion(new SharedArrayBuffer(g.mmapSize), g).splitQueue(0);
  old.recover(0, 4);
  old.markInflight(0);
  old.markInflight(1);
  // A VM reset: QEMU frees the region and asks for a new one, all zero.
  const fresh = new InflightRegion(new SharedArrayBuffer(g.mmapSize), g).splitQueue(0);
  assert.deepEqual(fresh.recover(0, 4).resubmit, []);
  // The same tracker over memory that was zeroed (a new mapping at the same place) forgets what it had too.
  const bytes = image(false, 4, '0000000000000000 0100 0400 0000 0000', { 0: '01 0000000000 0000 0000000000000000' });
  const q = new SplitInflightQueue(bytes, 4);
  assert.deepEqual(q.recover(0, 4).resubmit, [0]);
  bytes.fill(0);
  const again = q.recover(0, 4);
  assert.deepEqual([again.fresh, again.resubmit], [true, []]);
  assert.ok(q.markInflight(0), 'head 0 is no longer in flight');
});

// ---------------------------------------------------------------------------------------------------------------
// Packed: the algorithm on region images

/** A ring for recover: flags per slot, and a record of what recover stored. */
function fakeRing(flags: Record<number, number>): {
  ringFlagsAt: (slot: number) => number;
  setRingFlags: (slot: number, f: number) => void;
  reads: number[];
  writes: [number, number][];
} {
  const reads: number[] = [];
  const writes: [number, number][] = [];
  return {
    ringFlagsAt: (slot) => {
      reads.push(slot);
      return flags[slot] ?? 0;
    },
    setRingFlags: (slot, f) => {
      writes.push([slot, f]);
      flags[slot] = f;
    },
    reads,
    writes,
  };
}

const FRESH_PACKED = '00'.repeat(32);
const COPY_A0 = { addr: 0x8000, len: 0x10, id: 0, flags: VRING_DESC_F_NEXT | AVAIL };
const COPY_A1 = { addr: 0x1_0000_9000n, len: 0x200, id: 1, flags: VRING_DESC_F_WRITE | AVAIL };
const COPY_B = { addr: 0xa000, len: 4, id: 2, flags: AVAIL };

test('packed: a fresh region is initialised at SET_VRING_BASE (free list j -> j + 1, both positions, version last)', () => {
  const bytes = image(true, 4, FRESH_PACKED);
  const q = new PackedInflightQueue(bytes, 4);
  const r = q.recover({ ringSize: 4, base: 0x8002, ...fakeRing({}) });
  assert.deepEqual(r, {
    fresh: true,
    batch: 'none',
    resubmit: [],
    availPosition: 0x8002,
    usedPosition: 0x8002,
    discarded: 0,
    ringSlotsReset: 0,
    anomalies: {},
  });
  // features, version, desc_num, free_head, old_free_head, used_idx, old_used_idx, wraps, padding
  assert.equal(header(bytes, true), clean('0000000000000000 0100 0400 0000 0000 0200 0200 01 01 00000000000000 000000'));
  // inflight pad next last num counter id flags len addr
  assert.equal(desc(bytes, true, 0), clean('00 00 0100 0000 0000 0000000000000000 0000 0000 00000000 0000000000000000'));
  assert.equal(desc(bytes, true, 3), clean('00 00 0400 0000 0000 0000000000000000 0000 0000 00000000 0000000000000000'));
});

/** The region after: fresh at 0x8002, chain A (entries 0, 1; id 1) and chain B (entry 2; id 2) marked. */
function packedMarked(): { bytes: Uint8Array; q: PackedInflightQueue } {
  const bytes = image(true, 4, FRESH_PACKED);
  const q = new PackedInflightQueue(bytes, 4);
  q.recover({ ringSize: 4, base: 0x8002, ...fakeRing({}) });
  assert.equal(q.markChain([COPY_A0, COPY_A1]), 0);
  assert.equal(q.markChain([COPY_B]), 2);
  return { bytes, q };
}

test('packed: marking copies each ring descriptor into entries from the free list, head gets last/num/counter/inflight', () => {
  const { bytes, q } = packedMarked();
  assert.equal(desc(bytes, true, 0), clean('01 00 0100 0100 0200 0000000000000000 0000 8100 10000000 0080000000000000'));
  assert.equal(desc(bytes, true, 1), clean('00 00 0200 0000 0000 0000000000000000 0100 8200 00020000 0090000001000000'));
  assert.equal(desc(bytes, true, 2), clean('01 00 0300 0200 0100 0100000000000000 0200 8000 04000000 00a0000000000000'));
  // free_head = old_free_head = 3 (the mark's commit)
  assert.equal(header(bytes, true), clean('0000000000000000 0100 0400 0300 0300 0200 0200 01 01 00000000000000 000000'));
  assert.equal(q.inFlight, 2);
  assert.throws(() => q.markChain([{ ...COPY_B, id: 1 }]), RangeError, 'buffer id 1 is in flight');
  assert.throws(() => q.markChain([]), RangeError);
});

test('packed: a batch returns its chains to the free list and moves the used position, then commits old_*', () => {
  const { bytes, q } = packedMarked();
  q.pushUsed(2);
  q.prepareUsed();
  // 2.last = 2: 2.next = free_head (3); free_head = 2; used 2 -> 3.
  assert.equal(header(bytes, true), clean('0000000000000000 0100 0400 0200 0300 0300 0200 01 01 00000000000000 000000'));
  assert.equal(q.usedPosition, 0x8003);
  q.commitUsed();
  assert.equal(header(bytes, true), clean('0000000000000000 0100 0400 0200 0200 0300 0300 01 01 00000000000000 000000'));
  assert.equal(desc(bytes, true, 2).slice(0, 2), '00');
  q.pushUsed(1);
  q.prepareUsed();
  // A's last (1): 1.next = 2; free_head = 0; used 3 + 2 slots = 5 -> index 1, wrap 0.
  assert.equal(header(bytes, true), clean('0000000000000000 0100 0400 0000 0200 0100 0300 00 01 00000000000000 000000'));
  assert.equal(desc(bytes, true, 1).slice(4, 8), '0200');
  q.commitUsed();
  assert.equal(header(bytes, true), clean('0000000000000000 0100 0400 0000 0000 0100 0100 00 00 00000000000000 000000'));
  assert.equal(q.usedPosition, 0x0001);
  assert.equal(q.inFlight, 0);
  assert.throws(() => q.pushUsed(1), RangeError, 'not in flight');
});

/** The image of `packedMarked` then `pushUsed(2); prepareUsed()`: B's batch linked and positioned, not committed. */
const B_PENDING = {
  header: '0000000000000000 0100 0400 0200 0300 0300 0200 01 01 00000000000000 000000',
  descs: {
    0: '01 00 0100 0100 0200 0000000000000000 0000 8100 10000000 0080000000000000',
    1: '00 00 0200 0000 0000 0000000000000000 0100 8200 00020000 0090000001000000',
    2: '01 00 0300 0200 0100 0100000000000000 0200 8000 04000000 00a0000000000000',
    3: '00 00 0400 0000 0000 0000000000000000 0000 0000 00000000 0000000000000000',
  },
};

test('packed: a half-done batch whose first used descriptor is not in the ring is rolled back (all resubmitted)', () => {
  const bytes = image(true, 4, B_PENDING.header, B_PENDING.descs);
  // old_used_idx 2 reads available for wrap 1 (AVAIL, not USED); slot 3 holds a leftover used flag; slot 0 (position
  // 4, wrap 0) reads as nothing.
  const ring = fakeRing({ 2: AVAIL | VRING_DESC_F_NEXT, 3: AVAIL | USED | VRING_DESC_F_WRITE, 0: 0 });
  const r = new PackedInflightQueue(bytes, 4).recover({ ringSize: 4, base: 0x8000, ...ring });
  assert.equal(r.batch, 'rolled-back');
  assert.deepEqual(
    r.resubmit.map((c) => [c.id, c.entry]),
    [
      [1, 0],
      [2, 2],
    ],
  );
  assert.deepEqual(r.resubmit[0]?.descriptors, [
    { ...COPY_A0, addr: 0x8000n },
    { ...COPY_A1, addr: 0x1_0000_9000n },
  ]);
  assert.equal(r.usedPosition, 0x8002);
  assert.equal(r.availPosition, 0x0001, 'used + 3 slots: position 5 = index 1, wrap 0');
  assert.deepEqual([r.discarded, r.anomalies], [0, {}]);
  // The leftover used flag at slot 3 and slot 0 (lap 0: USED bit) read available again.
  assert.deepEqual(ring.writes, [
    [3, AVAIL | VRING_DESC_F_WRITE],
    [0, USED],
  ]);
  assert.equal(r.ringSlotsReset, 2);
  // Positions back to old_*, free list rebuilt from entry 3.
  assert.equal(header(bytes, true), clean('0000000000000000 0100 0400 0300 0300 0200 0200 01 01 00000000000000 000000'));
});

test('packed: a half-done batch whose first used descriptor is in the ring is committed (not resubmitted)', () => {
  const bytes = image(true, 4, B_PENDING.header, B_PENDING.descs);
  const ring = fakeRing({ 2: AVAIL | USED, 3: AVAIL, 0: USED });
  const q = new PackedInflightQueue(bytes, 4);
  const r = q.recover({ ringSize: 4, base: 0x8000, ...ring });
  assert.equal(r.batch, 'committed');
  assert.deepEqual(
    r.resubmit.map((c) => c.id),
    [1],
  );
  assert.deepEqual([r.usedPosition, r.availPosition, r.discarded], [0x8003, 0x0001, 1]);
  assert.equal(ring.reads[0], 2, 'the decision read old_used_idx');
  // old_* = current; free list: entries 2, 3.
  assert.equal(header(bytes, true), clean('0000000000000000 0100 0400 0200 0200 0300 0300 01 01 00000000000000 000000'));
  assert.equal(desc(bytes, true, 2), clean('00 00 0300 0200 0100 0100000000000000 0200 8000 04000000 00a0000000000000'));
  assert.equal(q.counter, 1, 'after the resubmitted chain (counter 0)');
  assert.equal(q.markChain([{ addr: 1, len: 1, id: 2, flags: AVAIL }]), 2, 'the next mark takes the first free entry');
});

test('packed: a commit torn between old_used_idx and its wrap counter is finished without reading the ring', () => {
  // After A's batch: commitUsed stored old_free_head (0) and old_used_wrap_counter (0) but not old_used_idx (3).
  const bytes = image(true, 4, '0000000000000000 0100 0400 0000 0000 0100 0300 00 00 00000000000000 000000', {
    0: '00 00 0100 0100 0200 0000000000000000 0000 8100 10000000 0080000000000000',
    1: '00 00 0200 0000 0000 0000000000000000 0100 8200 00020000 0090000001000000',
    2: '00 00 0300 0200 0100 0100000000000000 0200 8000 04000000 00a0000000000000',
    3: '00 00 0400 0000 0000 0000000000000000 0000 0000 00000000 0000000000000000',
  });
  const ring = fakeRing({ 3: AVAIL }); // read as "available" at the torn (3, wrap 0): a ring check would roll back
  const r = new PackedInflightQueue(bytes, 4).recover({ ringSize: 4, base: 0x8000, ...ring });
  assert.deepEqual([r.batch, r.resubmit, r.usedPosition, r.availPosition], ['committed', [], 0x0001, 0x0001]);
  assert.deepEqual(ring.reads, []);
  assert.equal(header(bytes, true), clean('0000000000000000 0100 0400 0000 0000 0100 0100 00 00 00000000000000 000000'));
});

test('packed: a mark that did not reach its commit (old_free_head) is discarded, not resubmitted', () => {
  // Chain B was being marked: inflight set, free_head stored, old_free_head not: it is still on the free list.
  const bytes = image(true, 4, '0000000000000000 0100 0400 0300 0200 0200 0200 01 01 00000000000000 000000', {
    0: B_PENDING.descs[0],
    1: B_PENDING.descs[1],
    2: B_PENDING.descs[2],
    3: B_PENDING.descs[3],
  });
  const r = new PackedInflightQueue(bytes, 4).recover({ ringSize: 4, base: 0x8000, ...fakeRing({ 2: AVAIL, 3: AVAIL }) });
  // used 2 + A's 2 slots = position 4 of a 4-slot ring: index 0, wrap 0.
  assert.deepEqual([r.batch, r.discarded, r.resubmit.map((c) => c.id), r.availPosition], ['none', 1, [1], 0x0000]);
});

// Hostile packed regions.

function packedRecover(h: string, descs: Record<number, string>, ringSize = 4, flags: Record<number, number> = {}): PackedRecovery {
  const bytes = image(true, 4, h, descs);
  return new PackedInflightQueue(bytes, 4).recover({ ringSize, base: 0x8001, ...fakeRing(flags) });
}

/** A chain head state: inflight 1, next, last, num, counter, and a copy with `id`. */
function head(next: number, last: number, num: number, counter: number, id: number): string {
  const u16 = (v: number): string => toHex(new Uint8Array(new Uint16Array([v]).buffer));
  const u64 = (v: number): string => toHex(new Uint8Array(new BigUint64Array([BigInt(v)]).buffer));
  return `01 00 ${u16(next)} ${u16(last)} ${u16(num)} ${u64(counter)} ${u16(id)} 8000 10000000 0080000000000000`;
}
function member(next: number, id: number): string {
  const u16 = (v: number): string => toHex(new Uint8Array(new Uint16Array([v]).buffer));
  return `00 00 ${u16(next)} 0000 0000 0000000000000000 ${u16(id)} 8000 10000000 0090000000000000`;
}
/** Steady header: free_head = old_free_head = `free`, positions (0, wrap 1). */
const steady = (free: number): string =>
  `0000000000000000 0100 0400 ${toHex(new Uint8Array(new Uint16Array([free]).buffer))}` +
  ` ${toHex(new Uint8Array(new Uint16Array([free]).buffer))} 0000 0000 01 01 00000000000000 000000`;

test('hostile packed: old_used_idx or a wrap counter out of range resets the queue region', () => {
  const bad = packedRecover('0000000000000000 0100 0400 0000 0000 0000 0900 01 01 00000000000000 000000', { 0: head(4, 0, 1, 0, 0) });
  assert.deepEqual([bad.fresh, bad.resubmit, bad.usedPosition, bad.anomalies], [true, [], 0x8001, { 'bad-header': 1 }]);
  const wrap = packedRecover('0000000000000000 0100 0400 0000 0000 0000 0000 01 02 00000000000000 000000', {});
  assert.deepEqual([wrap.fresh, wrap.anomalies], [true, { 'bad-header': 1 }]);
  const version = packedRecover('0000000000000000 0200 0400 0000 0000 0000 0000 01 01 00000000000000 000000', {});
  assert.deepEqual([version.fresh, version.anomalies], [true, { 'unknown-version': 1 }]);
});

test('hostile packed: a free list that loops stops at the loop', () => {
  const r = packedRecover(steady(2), { 2: member(3, 0), 3: member(2, 0), 0: head(1, 1, 2, 0, 0), 1: member(2, 1) });
  assert.deepEqual([r.resubmit.map((c) => c.id), r.anomalies], [[1], { 'free-list-loop': 1 }]);
});

test('hostile packed: chains with num 0, num > ring, or more slots in all than the ring are skipped', () => {
  const zero = packedRecover(steady(4), { 0: head(4, 0, 0, 0, 0) });
  assert.deepEqual([zero.resubmit, zero.anomalies], [[], { 'chain-bad-length': 1 }]);
  const long = packedRecover(steady(4), { 0: head(1, 3, 5, 0, 0) });
  assert.deepEqual([long.resubmit, long.anomalies], [[], { 'chain-bad-length': 1 }]);
  const many = packedRecover(steady(4), { 0: head(1, 2, 3, 0, 0), 1: member(2, 0), 2: member(4, 2), 3: head(4, 3, 2, 1, 3) });
  assert.deepEqual([many.resubmit.map((c) => c.id), many.anomalies], [[2], { 'too-many-slots': 1 }]);
});

test('hostile packed: a chain whose next leaves the array, or whose last is wrong, is skipped', () => {
  const out = packedRecover(steady(4), { 0: head(9, 1, 2, 0, 0) });
  assert.deepEqual([out.resubmit, out.anomalies], [[], { 'chain-index-out-of-range': 1 }]);
  const last = packedRecover(steady(4), { 0: head(1, 2, 2, 0, 0), 1: member(4, 0) });
  assert.deepEqual([last.resubmit, last.anomalies], [[], { 'chain-bad-last': 1 }]);
});

test('hostile packed: chains sharing an entry with the free list, another chain or themselves are skipped', () => {
  // Free list 3 -> 1; chain 0 -> 1 uses entry 1.
  const free = packedRecover(steady(3), { 3: member(1, 0), 1: member(4, 1), 0: head(1, 1, 2, 0, 0) });
  assert.deepEqual([free.resubmit, free.anomalies], [[], { 'chain-overlap': 1 }]);
  // Chains 0 -> 2 (older) and 1 -> 2.
  const shared = packedRecover(steady(4), { 0: head(2, 2, 2, 0, 0), 2: member(4, 1), 1: head(2, 2, 2, 1, 0) });
  assert.deepEqual([shared.resubmit.map((c) => c.entry), shared.anomalies], [[0], { 'chain-overlap': 1 }]);
  // A chain looping onto itself.
  const self = packedRecover(steady(4), { 0: head(0, 0, 2, 0, 0) });
  assert.deepEqual([self.resubmit, self.anomalies], [[], { 'chain-overlap': 1 }]);
});

test('hostile packed: buffer ids out of range or repeated, counters repeated or too large, bad inflight bytes', () => {
  const id = packedRecover(steady(4), { 0: head(4, 0, 1, 0, 4) });
  assert.deepEqual([id.resubmit, id.anomalies], [[], { 'bad-buffer-id': 1 }]);
  const dupId = packedRecover(steady(4), { 0: head(4, 0, 1, 0, 1), 1: head(4, 1, 1, 1, 1) });
  assert.deepEqual([dupId.resubmit.map((c) => c.entry), dupId.anomalies], [[0], { 'duplicate-buffer-id': 1 }]);
  const dupCounter = packedRecover(steady(4), { 0: head(4, 0, 1, 7, 0), 1: head(4, 1, 1, 7, 1) });
  assert.deepEqual([dupCounter.resubmit.map((c) => c.entry), dupCounter.anomalies], [[0], { 'duplicate-counter': 1 }]);
  const big = packedRecover(steady(4), { 0: head(4, 0, 1, 2 ** 53, 0) });
  assert.deepEqual([big.resubmit, big.anomalies], [[], { 'counter-out-of-range': 1 }]);
  const flag = packedRecover(steady(4), { 0: '05' + head(4, 0, 1, 0, 0).slice(2) });
  assert.deepEqual([flag.resubmit, flag.anomalies], [[], { 'bad-inflight-value': 1 }]);
});

test('hostile packed: a ring that cannot be read rolls the half-done batch back', () => {
  const bytes = image(true, 4, B_PENDING.header, B_PENDING.descs);
  const r = new PackedInflightQueue(bytes, 4).recover({
    ringSize: 4,
    base: 0x8000,
    ringFlagsAt: () => {
      throw new VirtioError('GUEST_MEMORY_UNMAPPED', 'gone');
    },
    setRingFlags: () => undefined,
  });
  assert.equal(r.batch, 'rolled-back');
  assert.equal(r.resubmit.length, 2);
  assert.deepEqual(r.anomalies, { 'ring-unreadable': 2 });
});

test('packed: a VM reset (zeroed region) drops all resubmit state', () => {
  const { bytes, q } = packedMarked();
  const again = q.recover({ ringSize: 4, base: 0x8000, ...fakeRing({}) });
  assert.deepEqual(
    again.resubmit.map((c) => c.id),
    [1, 2],
  );
  bytes.fill(0);
  const reset = q.recover({ ringSize: 4, base: 0x8000, ...fakeRing({}) });
  assert.deepEqual([reset.fresh, reset.resubmit], [true, []]);
  assert.equal(q.markChain([COPY_A1]), 0);
});

test('packed: a driver that holds more descriptors in flight than the ring gets VIRTIO_INFLIGHT_EXHAUSTED', () => {
  const q = new PackedInflightQueue(image(true, 2, FRESH_PACKED), 2);
  q.recover({ ringSize: 2, base: 0x8000, ...fakeRing({}) });
  q.markChain([{ addr: 0, len: 1, id: 0, flags: 0 }]);
  q.markChain([{ addr: 0, len: 1, id: 1, flags: 0 }]);
  assert.throws(
    () => q.markChain([{ addr: 0, len: 1, id: 0, flags: 0 }]),
    (err: unknown) => err instanceof VirtioError && err.code === 'VIRTIO_INFLIGHT_EXHAUSTED',
  );
  q.pushUsed(1);
  q.prepareUsed();
  q.commitUsed();
  assert.equal(q.markChain([{ addr: 0, len: 1, id: 1, flags: 0 }]), 1);
});

// ---------------------------------------------------------------------------------------------------------------
// Random regions: recovery never throws, never resubmits what it cannot bound, and is idempotent.

test('any split region image: recover does not throw, resubmits distinct heads below the ring size, and is idempotent', () => {
  const descNum = 8;
  const size = inflightQueueRegionSize(descNum, false);
  fc.assert(
    fc.property(
      fc.uint8Array({ minLength: size, maxLength: size }),
      fc.integer({ min: 0, max: 0xffff }),
      fc.integer({ min: 1, max: descNum }),
      fc.boolean(),
      (raw, usedIdx, ringSize, v1) => {
        const bytes = new Uint8Array(new SharedArrayBuffer(size));
        bytes.set(raw);
        if (v1) bytes[SplitRegion.VERSION] = 1; // mostly version 1, to reach the rules
        if (v1) bytes[SplitRegion.VERSION + 1] = 0;
        const q = new SplitInflightQueue(bytes, descNum);
        const r = q.recover(usedIdx, ringSize);
        assert.ok(r.resubmit.every((h) => Number.isInteger(h) && h >= 0 && h < ringSize));
        assert.equal(new Set(r.resubmit).size, r.resubmit.length);
        assert.equal(r.lastAvailIdx, (usedIdx + r.resubmit.length) & 0xffff);
        const again = new SplitInflightQueue(bytes, descNum).recover(usedIdx, ringSize);
        assert.deepEqual([again.resubmit, again.repaired, again.anomalies, again.fresh], [r.resubmit, 0, {}, false]);
      },
    ),
    { numRuns: 300 },
  );
});

test('any packed region image: recover does not throw, resubmits bounded chains, and is idempotent', () => {
  const descNum = 6;
  const size = inflightQueueRegionSize(descNum, true);
  fc.assert(
    fc.property(
      fc.uint8Array({ minLength: size, maxLength: size }),
      fc.integer({ min: 1, max: descNum }),
      fc.array(fc.integer({ min: 0, max: 0xffff }), { minLength: descNum, maxLength: descNum }),
      fc.boolean(),
      (raw, ringSize, ringFlags, tame) => {
        const bytes = new Uint8Array(new SharedArrayBuffer(size));
        bytes.set(raw);
        if (tame) {
          // Mostly-plausible headers, to get past the header checks into the chain rules.
          const u16 = new Uint16Array(bytes.buffer, 0, 16);
          u16[4] = 1;
          u16[8] = (u16[8] ?? 0) % ringSize;
          u16[9] = (u16[9] ?? 0) % ringSize;
          u16[6] = (u16[6] ?? 0) % (descNum + 1);
          u16[7] = (u16[7] ?? 0) % (descNum + 1);
          bytes[20] = (bytes[20] ?? 0) & 1;
          bytes[21] = (bytes[21] ?? 0) & 1;
          for (let e = 0; e < descNum; e++) {
            const at = PackedRegion.DESC + PackedRegion.DESC_SIZE * e;
            bytes[at] = (bytes[at] ?? 0) & 1;
            const w = new Uint16Array(bytes.buffer, at, 16);
            w[1] = (w[1] ?? 0) % (descNum + 1);
            w[2] = (w[2] ?? 0) % descNum;
            w[3] = (w[3] ?? 0) % 4;
            w[8] = (w[8] ?? 0) % ringSize;
            bytes[at + 12] = 0; // counter < 2^53
            bytes[at + 13] = 0;
            bytes[at + 14] = 0;
            bytes[at + 15] = 0;
          }
        }
        const flags = Object.fromEntries(ringFlags.map((f, i) => [i, f]));
        const base = 0x8000;
        const q = new PackedInflightQueue(bytes, descNum);
        const r = q.recover({ ringSize, base, ...fakeRing(flags) });
        let slots = 0;
        const ids = new Set<number>();
        for (const c of r.resubmit) {
          assert.ok(c.id < ringSize && !ids.has(c.id));
          ids.add(c.id);
          assert.ok(c.descriptors.length >= 1);
          slots += c.descriptors.length;
        }
        assert.ok(slots <= ringSize);
        const lin = (p: number): number => ((p & 0x8000) !== 0 ? p & 0x7fff : (p & 0x7fff) + ringSize);
        assert.ok((r.usedPosition & 0x7fff) < ringSize && (r.availPosition & 0x7fff) < ringSize);
        assert.equal((lin(r.usedPosition) + slots) % (2 * ringSize), lin(r.availPosition));
        const again = new PackedInflightQueue(bytes, descNum).recover({ ringSize, base, ...fakeRing(flags) });
        assert.deepEqual(
          [again.resubmit, again.usedPosition, again.availPosition, again.batch, again.discarded, again.ringSlotsReset, again.anomalies],
          [r.resubmit, r.usedPosition, r.availPosition, 'none', 0, 0, {}],
        );
      },
    ),
    { numRuns: 300 },
  );
});

// ---------------------------------------------------------------------------------------------------------------
// Crashes: real queues (SplitQueue / PackedQueue and their drivers), the backend "killed" before any one store.

/** Thrown by the store hook in place of the store it was asked to crash at. */
class Crash extends Error {}
const CRASHED = Symbol('crashed');

/**
 * Counts every `Atomics.store` made while `run` executes (the device: queue, tracker and recovery; the driver runs
 * outside) and throws `Crash` instead of performing the stores whose numbers are in `crashAt`: what the region and
 * guest memory hold then is exactly their state after the previous store, as after a SIGKILL.
 */
class StoreHook {
  count = 0;
  readonly crashAt: ReadonlySet<number>;

  constructor(crashAt: Iterable<number> = []) {
    this.crashAt = new Set(crashAt);
  }

  run<T>(fn: () => T): T | typeof CRASHED {
    const original = Atomics.store;
    const hook = (...args: unknown[]): unknown => {
      if (this.crashAt.has(this.count++)) throw new Crash('crash');
      return Reflect.apply(original, Atomics, args);
    };
    Object.defineProperty(Atomics, 'store', { value: hook, writable: true, configurable: true });
    try {
      return fn();
    } catch (err) {
      if (err instanceof Crash) return CRASHED;
      throw err;
    } finally {
      Object.defineProperty(Atomics, 'store', { value: original, writable: true, configurable: true });
    }
  }
}

/**
 * The model, independent of the tracker: tokens the driver made available and the device has not taken (marked),
 * tokens marked and not published (in mark order), tokens published. Updated only once the store that makes a
 * step durable has happened (the mark's last store, the ring's publication store).
 */
class Model {
  readonly pending: number[] = [];
  readonly marked: number[] = [];
  readonly offered: number[] = [];
  readonly completed: number[] = [];
  crashes = 0;

  offer(token: number): void {
    this.pending.push(token);
    this.offered.push(token);
  }

  took(token: number): void {
    assert.equal(token, this.pending[0], 'the device takes the oldest chain not yet marked');
    this.pending.shift();
    this.marked.push(token);
  }

  published(tokens: readonly number[]): void {
    for (const t of tokens) {
      const i = this.marked.indexOf(t);
      assert.ok(i >= 0, `token ${t} published but not marked`);
      this.marked.splice(i, 1);
    }
  }

  /** Every chain offered was completed exactly once (the drivers throw on a second completion). */
  checkExactlyOnce(): void {
    assert.deepEqual([...this.completed].sort((a, b) => a - b), [...this.offered].sort((a, b) => a - b));
  }
}

type Op =
  | { readonly t: 'offer'; readonly n: number; readonly lens: readonly number[] }
  | { readonly t: 'pop'; readonly n: number }
  | { readonly t: 'complete'; readonly picks: readonly number[]; readonly popBetween: number }
  | { readonly t: 'poll' }
  | { readonly t: 'restart' };

interface Harness {
  readonly model: Model;
  readonly hook: StoreHook;
  apply(op: Op): void;
  finish(): void;
}

function noAnomalies(a: InflightAnomalies): void {
  assert.deepEqual(a, {}, 'a region written by this backend never has anomalies');
}

const SPLIT_SIZE = 8;

class SplitHarness implements Harness {
  readonly model = new Model();
  readonly hook: StoreHook;
  readonly mem: TestMemory = standardMemory();
  readonly layout = SplitQueueDriver.layout(SPLIT_SIZE, RING_BASE);
  readonly driver = new SplitQueueDriver<number>(this.mem, { size: SPLIT_SIZE, ...this.layout, eventIdx: false });
  readonly geometry = inflightGeometry(1, SPLIT_SIZE, false);
  readonly regionBytes = new Uint8Array(new SharedArrayBuffer(this.geometry.mmapSize));
  readonly tokenOfHead = new Map<number, number>();
  nextToken = 0;
  // Device state: lost at every crash.
  queue!: SplitQueue;
  tracker!: SplitInflightQueue;
  chain!: DescriptorChain;
  inflight: number[] = [];

  constructor(crashAt: Iterable<number>) {
    this.hook = new StoreHook(crashAt);
    this.restart();
  }

  /** While the backend is down the guest carries on: it collects what was published and adds requests. */
  #guestWhileDown(): void {
    this.apply({ t: 'poll' });
    this.apply({ t: 'offer', n: 2, lens: [1, 1] });
  }

  /** The device (re)starts: recovery, then whatever was in flight is in flight again. Crashes may hit it too. */
  restart(): void {
    for (;;) {
      this.#guestWhileDown();
      const r = this.hook.run(() => {
        this.inflight = [];
        this.queue = new SplitQueue({ size: SPLIT_SIZE, ...this.layout, eventIdx: false, indirect: true });
        this.queue.attach(this.mem);
        this.chain = this.queue.createChain();
        this.tracker = new InflightRegion(this.regionBytes, this.geometry).splitQueue(0);
        const rec = this.tracker.recover(this.queue.ringUsedIdx(), SPLIT_SIZE);
        noAnomalies(rec.anomalies);
        assert.deepEqual(
          rec.resubmit.map((h) => this.tokenOfHead.get(h)),
          this.model.marked,
          'resubmitted: exactly the marked, unpublished requests, oldest first',
        );
        this.queue.setBase(rec.lastAvailIdx, rec.usedIdx);
        this.inflight = [...rec.resubmit];
      });
      if (r !== CRASHED) return;
      this.model.crashes++;
    }
  }

  #device(fn: () => void): void {
    if (this.hook.run(fn) === CRASHED) {
      this.model.crashes++;
      this.restart();
    }
  }

  #pop(n: number): void {
    for (let i = 0; i < n; i++) {
      if (!this.queue.popChain(this.mem, this.chain)) return;
      const head = this.chain.head;
      assert.ok(this.tracker.markInflight(head));
      this.model.took(this.tokenOfHead.get(head) as number);
      this.inflight.push(head);
    }
  }

  apply(op: Op): void {
    switch (op.t) {
      case 'offer':
        for (let i = 0; i < op.n && this.driver.freeCount > 0; i++) {
          const token = this.nextToken++;
          const head = this.driver.addChain([{ addr: BUF_BASE + 0x40 * (token % 64), len: 0x40, writable: true }], token);
          this.tokenOfHead.set(head, token);
          this.model.offer(token);
        }
        this.driver.publish();
        return;
      case 'pop':
        this.#device(() => this.#pop(op.n));
        return;
      case 'complete':
        this.#device(() => {
          const batch: number[] = [];
          for (const p of op.picks) {
            if (this.inflight.length === 0) break;
            const [head] = this.inflight.splice(p % this.inflight.length, 1) as [number];
            this.queue.pushUsed(head, 0);
            this.tracker.pushUsed(head);
            batch.push(head);
          }
          this.#pop(op.popBetween); // the worker pops on while a batch is being collected
          this.tracker.prepareUsed();
          this.queue.publishUsed();
          this.model.published(batch.map((h) => this.tokenOfHead.get(h) as number));
          this.tracker.commitUsed();
          assert.equal(this.tracker.usedIdx, this.queue.usedIdx);
        });
        return;
      case 'poll':
        this.driver.pollUsed((token) => this.model.completed.push(token));
        return;
      case 'restart':
        this.model.crashes++;
        this.restart();
        return;
    }
  }

  /** No more crashes: complete everything, take everything left, and let the driver collect. */
  finish(): void {
    for (let round = 0; round < 100; round++) {
      this.apply({ t: 'poll' });
      this.apply({ t: 'complete', picks: this.inflight.map(() => 0), popBetween: 0 });
      this.apply({ t: 'pop', n: SPLIT_SIZE });
      if (this.inflight.length === 0 && this.driver.inFlight === 0) break;
    }
    assert.equal(this.driver.inFlight, 0);
    assert.deepEqual(this.model.marked, []);
    this.model.checkExactlyOnce();
  }
}

const PACKED_SIZE = 5; // not a power of two: packed rings need not be
const STALE_BASE = 0x8000; // QEMU 7.2 sends the ring's first base again after a crash

class PackedHarness implements Harness {
  readonly model = new Model();
  readonly hook: StoreHook;
  readonly mem: TestMemory = standardMemory();
  readonly layout = PackedQueueDriver.layout(PACKED_SIZE, RING_BASE);
  readonly driver = new PackedQueueDriver<number>(this.mem, { size: PACKED_SIZE, ...this.layout, eventIdx: false });
  readonly geometry = inflightGeometry(1, PACKED_SIZE, true);
  readonly regionBytes = new Uint8Array(new SharedArrayBuffer(this.geometry.mmapSize));
  readonly ringBytes: Uint8Array;
  readonly ringU16: Uint16Array;
  readonly tokenOfId = new Map<number, number>();
  nextToken = 0;
  // Device state: lost at every crash.
  queue!: PackedQueue;
  tracker!: PackedInflightQueue;
  chain!: DescriptorChain;
  inflight: number[] = [];

  constructor(crashAt: Iterable<number>) {
    this.hook = new StoreHook(crashAt);
    this.ringBytes = this.mem.view(this.layout.descAddr, 16 * PACKED_SIZE);
    this.ringU16 = new Uint16Array(this.ringBytes.buffer, this.ringBytes.byteOffset, 8 * PACKED_SIZE);
    this.restart();
  }

  static addrOf(token: number): number {
    return BUF_BASE + 0x100 * (token % 32);
  }

  /** While the backend is down the guest carries on: it collects what was published and adds requests. */
  #guestWhileDown(): void {
    this.apply({ t: 'poll' });
    this.apply({ t: 'offer', n: 2, lens: [1, 2] });
  }

  restart(): void {
    for (;;) {
      this.#guestWhileDown();
      const r = this.hook.run(() => this.#start());
      if (r !== CRASHED) return;
      this.model.crashes++;
    }
  }

  #start(): void {
    this.inflight = [];
    this.queue = new PackedQueue({ size: PACKED_SIZE, ...this.layout, eventIdx: false, indirect: true });
    this.queue.attach(this.mem);
    this.chain = this.queue.createChain();
    this.tracker = new InflightRegion(this.regionBytes, this.geometry).packedQueue(0);
    const rec = this.tracker.recover({
      ringSize: PACKED_SIZE,
      base: STALE_BASE,
      ringFlagsAt: (slot) => Atomics.load(this.ringU16, 8 * slot + 7),
      setRingFlags: (slot, flags) => Atomics.store(this.ringU16, 8 * slot + 7, flags),
    });
    noAnomalies(rec.anomalies);
    const tokens = rec.resubmit.map((c) => this.tokenOfId.get(c.id) as number);
    assert.deepEqual(tokens, this.model.marked, 'resubmitted: exactly the marked, unpublished chains, oldest first');
    rec.resubmit.forEach((c, i) => {
      assert.equal(c.descriptors[0]?.addr, BigInt(PackedHarness.addrOf(tokens[i] as number)), 'the saved copy');
    });
    // The worker would process them first; PackedQueue cannot take chains in flight, so they complete here, in one
    // batch written as PackedQueue does (ids and lengths, later flags, the first flags last).
    if (rec.resubmit.length > 0) {
      for (const c of rec.resubmit) this.tracker.pushUsed(c.id);
      this.tracker.prepareUsed();
      this.#writeUsed(rec.usedPosition, rec.resubmit);
      this.model.published(tokens);
      this.tracker.commitUsed();
    }
    assert.equal(this.tracker.usedPosition, rec.availPosition);
    this.queue.resume(rec.availPosition);
  }

  #writeUsed(position: number, chains: readonly { readonly id: number; readonly descriptors: readonly unknown[] }[]): void {
    const dv = new DataView(this.ringBytes.buffer, this.ringBytes.byteOffset, this.ringBytes.length);
    let l = (position & 0x8000) !== 0 ? position & 0x7fff : (position & 0x7fff) + PACKED_SIZE;
    let first = -1;
    let firstFlags = 0;
    for (const c of chains) {
      const wrap = l < PACKED_SIZE;
      const slot = wrap ? l : l - PACKED_SIZE;
      dv.setUint32(16 * slot + 8, 0, true);
      dv.setUint16(16 * slot + 12, c.id, true);
      const flags = wrap ? AVAIL | USED : 0;
      if (first < 0) {
        first = slot;
        firstFlags = flags;
      } else {
        Atomics.store(this.ringU16, 8 * slot + 7, flags);
      }
      l = (l + c.descriptors.length) % (2 * PACKED_SIZE);
    }
    Atomics.store(this.ringU16, 8 * first + 7, firstFlags);
  }

  #device(fn: () => void): void {
    if (this.hook.run(fn) === CRASHED) {
      this.model.crashes++;
      this.restart();
    }
  }

  #pop(n: number): void {
    const lin = (p: number): number => ((p & 0x8000) !== 0 ? p & 0x7fff : (p & 0x7fff) + PACKED_SIZE);
    for (let i = 0; i < n; i++) {
      const before = lin(this.queue.getBase());
      if (!this.queue.popChain(this.mem, this.chain)) return;
      const slots = (lin(this.queue.getBase()) - before + 2 * PACKED_SIZE) % (2 * PACKED_SIZE);
      const descs: PackedDescriptorValue[] = [];
      for (let k = 0; k < slots; k++) descs.push(this.driver.readDescriptor((before + k) % PACKED_SIZE));
      this.tracker.markChain(descs);
      this.model.took(this.tokenOfId.get(this.chain.head) as number);
      this.inflight.push(this.chain.head);
    }
  }

  apply(op: Op): void {
    switch (op.t) {
      case 'offer':
        for (let i = 0; i < op.n; i++) {
          const n = op.lens[i] ?? 1;
          if (this.driver.freeCount < n) break;
          const token = this.nextToken++;
          const segs = Array.from({ length: n }, (_, k) => ({
            addr: PackedHarness.addrOf(token) + 0x10 * k,
            len: 0x10,
            writable: k === n - 1,
          }));
          const id = this.driver.addChain(segs, token);
          assert.ok(id >= 0);
          this.tokenOfId.set(id, token);
          this.model.offer(token);
        }
        this.driver.publish();
        return;
      case 'pop':
        this.#device(() => this.#pop(op.n));
        return;
      case 'complete':
        this.#device(() => {
          const batch: number[] = [];
          for (const p of op.picks) {
            if (this.inflight.length === 0) break;
            const [id] = this.inflight.splice(p % this.inflight.length, 1) as [number];
            this.queue.pushUsed(id, 0);
            this.tracker.pushUsed(id);
            batch.push(id);
          }
          this.#pop(op.popBetween);
          this.tracker.prepareUsed();
          const tokens = batch.map((id) => this.tokenOfId.get(id) as number);
          this.queue.publishUsed();
          if (batch.length > 0) this.model.published(tokens);
          this.tracker.commitUsed();
          assert.equal(this.tracker.usedPosition, this.queue.usedPosition);
        });
        return;
      case 'poll':
        this.driver.pollUsed((token) => this.model.completed.push(token));
        return;
      case 'restart':
        this.model.crashes++;
        this.restart();
        return;
    }
  }

  finish(): void {
    for (let round = 0; round < 100; round++) {
      this.apply({ t: 'poll' });
      this.apply({ t: 'complete', picks: this.inflight.map(() => 0), popBetween: 0 });
      this.apply({ t: 'pop', n: PACKED_SIZE });
      if (this.inflight.length === 0 && this.driver.inFlight === 0) break;
    }
    assert.equal(this.driver.inFlight, 0);
    assert.deepEqual(this.model.marked, []);
    this.model.checkExactlyOnce();
  }
}

/**
 * Out-of-order completion, batches, pops while a batch is collected, and the ring wrapping (packed: 5 slots, chains
 * of 1-3 descriptors). Both layouts run the same script.
 */
const SCRIPT: readonly Op[] = [
  { t: 'offer', n: 4, lens: [2, 1, 1, 1] },
  { t: 'pop', n: 3 },
  { t: 'complete', picks: [2, 0], popBetween: 1 }, // completes the 3rd and the 1st, takes the 4th meanwhile
  { t: 'poll' },
  { t: 'offer', n: 2, lens: [1, 2] },
  { t: 'pop', n: 1 },
  { t: 'complete', picks: [1, 0], popBetween: 1 },
  { t: 'complete', picks: [0], popBetween: 0 },
  { t: 'poll' },
  { t: 'offer', n: 3, lens: [3, 1, 1] },
  { t: 'pop', n: 2 },
  { t: 'complete', picks: [1], popBetween: 1 },
];

function runScript(make: (crashAt: number[]) => Harness, script: readonly Op[]): { stores: number; crashPoints: number } {
  // The stores of the uninterrupted run, to know how many crash points there are.
  const clean = make([]);
  for (const op of script) clean.apply(op);
  const stores = clean.hook.count;
  clean.finish();
  assert.equal(clean.model.crashes, 0);
  let crashPoints = 0;
  for (let k = 0; k < stores; k++) {
    const h = make([k]);
    for (const op of script) h.apply(op);
    assert.equal(h.model.crashes, 1, `crash at store ${k}`);
    h.finish();
    crashPoints++;
  }
  return { stores, crashPoints };
}

test('split, a crash at every store of the script (queue, tracker, recovery): each request completes exactly once', () => {
  const { stores, crashPoints } = runScript((c) => new SplitHarness(c), SCRIPT);
  // The crash points are the Atomics.stores; the plain stores of the tracker (descriptor copies, counters, links)
  // all come before the Atomics.store that commits them, so a crash among them equals a crash at that store.
  assert.ok(stores > 25, `${stores} stores`);
  assert.equal(crashPoints, stores);
});

test('packed, a crash at every store of the script (queue, tracker, recovery): each chain completes exactly once', () => {
  const { stores, crashPoints } = runScript((c) => new PackedHarness(c), SCRIPT);
  assert.ok(stores > 60, `${stores} stores`);
  assert.equal(crashPoints, stores);
});

test('split: killed between a batch\'s used-ring writes and its used.idx store, the batch is redone; just after, it is not', () => {
  for (const published of [false, true]) {
    const mem = standardMemory();
    const layout = SplitQueueDriver.layout(8, RING_BASE);
    const driver = new SplitQueueDriver<string>(mem, { size: 8, ...layout, eventIdx: false });
    const g = inflightGeometry(1, 8, false);
    const bytes = new Uint8Array(new SharedArrayBuffer(g.mmapSize));
    const queue = new SplitQueue({ size: 8, ...layout, eventIdx: false, indirect: true });
    queue.attach(mem);
    const tracker = new InflightRegion(bytes, g).splitQueue(0);
    tracker.recover(queue.ringUsedIdx(), 8);
    const heads = ['a', 'b', 'c'].map((t, i) => driver.addChain([{ addr: BUF_BASE + 0x100 * i, len: 0x10, writable: true }], t));
    driver.publish();
    const chain = queue.createChain();
    for (let i = 0; i < 3; i++) {
      assert.ok(queue.popChain(mem, chain));
      tracker.markInflight(chain.head);
    }
    const [a, b, c] = heads as [number, number, number];
    for (const h of [c, a]) {
      queue.pushUsed(h, 0);
      tracker.pushUsed(h);
    }
    tracker.prepareUsed();
    if (published) queue.publishUsed(); // and killed before commitUsed
    // The restarted backend: new queue and tracker over the same memory.
    const q2 = new SplitQueue({ size: 8, ...layout, eventIdx: false, indirect: true });
    q2.attach(mem);
    const r = new InflightRegion(bytes, g).splitQueue(0).recover(q2.ringUsedIdx(), 8);
    if (published) {
      assert.deepEqual([r.resubmit, r.repaired, r.usedIdx, r.lastAvailIdx], [[b], 2, 2, 3]);
      const got: string[] = [];
      driver.pollUsed((t) => got.push(t));
      assert.deepEqual(got, ['c', 'a']);
    } else {
      assert.deepEqual([r.resubmit, r.repaired, r.usedIdx, r.lastAvailIdx], [[a, b, c], 0, 0, 3]);
      assert.equal(driver.pollUsed(() => assert.fail('nothing was published')), 0);
    }
  }
});

test('packed: killed between a batch\'s used descriptors and the first one\'s flags, the batch is redone; just after, it is not', () => {
  for (const published of [false, true]) {
    const mem = standardMemory();
    const size = 6;
    const layout = PackedQueueDriver.layout(size, RING_BASE);
    const driver = new PackedQueueDriver<string>(mem, { size, ...layout, eventIdx: false });
    const g = inflightGeometry(1, size, true);
    const bytes = new Uint8Array(new SharedArrayBuffer(g.mmapSize));
    const ringBytes = mem.view(layout.descAddr, 16 * size);
    const ringU16 = new Uint16Array(ringBytes.buffer, ringBytes.byteOffset, 8 * size);
    const ring = {
      ringFlagsAt: (slot: number): number => Atomics.load(ringU16, 8 * slot + 7),
      setRingFlags: (slot: number, f: number): void => void Atomics.store(ringU16, 8 * slot + 7, f),
    };
    const queue = new PackedQueue({ size, ...layout, eventIdx: false, indirect: true });
    queue.attach(mem);
    const tracker = new InflightRegion(bytes, g).packedQueue(0);
    tracker.recover({ ringSize: size, base: 0x8000, ...ring });
    const ids = ['a', 'b', 'c'].map((t, i) =>
      driver.addChain(
        [
          { addr: BUF_BASE + 0x100 * i, len: 0x10, writable: false },
          { addr: BUF_BASE + 0x100 * i + 0x10, len: 0x10, writable: true },
        ],
        t,
      ),
    );
    driver.publish();
    const chain = queue.createChain();
    for (let i = 0; i < 3; i++) {
      assert.ok(queue.popChain(mem, chain));
      tracker.markChain([driver.readDescriptor(2 * i), driver.readDescriptor(2 * i + 1)]);
    }
    const [a, b, c] = ids as [number, number, number];
    for (const id of [c, a]) {
      queue.pushUsed(id, 0); // a's used descriptor (the batch's second) gets its flags now, c's (the first) not
      tracker.pushUsed(id);
    }
    tracker.prepareUsed();
    if (published) queue.publishUsed();
    const r = new InflightRegion(bytes, g).packedQueue(0).recover({ ringSize: size, base: 0x8000, ...ring });
    if (published) {
      assert.deepEqual([r.batch, r.resubmit.map((x) => x.id), r.usedPosition, r.availPosition], ['committed', [b], 0x8004, 0x0000]);
      const got: string[] = [];
      driver.pollUsed((t) => got.push(t));
      assert.deepEqual(got, ['c', 'a']);
    } else {
      assert.deepEqual([r.batch, r.resubmit.map((x) => x.id), r.usedPosition, r.availPosition], ['rolled-back', [a, b, c], 0x8000, 0x0000]);
      // a's leftover used flags at slot 2 read "available" again.
      assert.equal(r.ringSlotsReset, 1);
      assert.equal(driver.pollUsed(() => assert.fail('nothing was published')), 0);
    }
  }
});

// ---------------------------------------------------------------------------------------------------------------
// Properties: random traffic, random crash points (several per run, in recovery too), against the model.

const opArb: fc.Arbitrary<Op> = fc.oneof(
  {
    weight: 3,
    arbitrary: fc
      .record({ n: fc.integer({ min: 1, max: 4 }), lens: fc.array(fc.integer({ min: 1, max: 3 }), { minLength: 4, maxLength: 4 }) })
      .map(({ n, lens }): Op => ({ t: 'offer', n, lens })),
  },
  { weight: 3, arbitrary: fc.integer({ min: 1, max: 4 }).map((n): Op => ({ t: 'pop', n })) },
  {
    weight: 3,
    arbitrary: fc
      .record({ picks: fc.array(fc.nat({ max: 7 }), { minLength: 1, maxLength: 4 }), popBetween: fc.nat({ max: 2 }) })
      .map(({ picks, popBetween }): Op => ({ t: 'complete', picks, popBetween })),
  },
  { weight: 2, arbitrary: fc.constant<Op>({ t: 'poll' }) },
  { weight: 1, arbitrary: fc.constant<Op>({ t: 'restart' }) },
);

/** Runs of up to 60 operations make about `maxStore` stores: crash points are drawn below that. */
function property(make: (crashAt: number[]) => Harness, maxStore: number): void {
  fc.assert(
    fc.property(fc.array(opArb, { minLength: 1, maxLength: 60 }), fc.uniqueArray(fc.nat({ max: maxStore }), { maxLength: 10 }), (ops, crashAt) => {
      const h = make(crashAt);
      for (const op of ops) h.apply(op);
      h.finish();
    }),
    { numRuns: 250 },
  );
}

test('split property: any traffic, any crashes: resubmitted = marked and unpublished in order, exactly once overall', () => {
  property((c) => new SplitHarness(c), 120);
});

test('packed property: any traffic, any crashes: resubmitted = marked and unpublished in order, exactly once overall', () => {
  property((c) => new PackedHarness(c), 300);
});

test('the region version is 1', () => {
  assert.equal(INFLIGHT_VERSION, 1);
});

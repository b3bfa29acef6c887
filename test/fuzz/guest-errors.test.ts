// A guest error stops that queue and nothing else: random malformed chains (loops, indices out of range, avail.idx
// jumps, nested / misaligned / huge / unmapped indirect tables, addresses past 2^53, lengths near 2^32, requests
// whose header or status byte is unmapped, ...) on queue 0 of a real backend. Every time: the device reports
// NEEDS_RESET (GET_STATUS 0x40), queue 0's err eventfd fires and the log names a VIRTIO_ / GUEST_MEMORY_ code;
// queue 1 on the same worker and a second device keep completing requests and queue 1's err eventfd stays quiet.
// Then RESET_DEVICE and a fresh start bring the device back, and at the end every fd and mapping is released.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import type { GuestRam } from '../../src/frontend/guest-ram.js';
import { VirtioFeature, featureBit } from '../../src/protocol/constants.js';
import type { SplitQueueDriver } from '../../src/queue/split-queue-driver.js';
import { BlkRequestType } from '../../src/devices/blk/constants.js';
import { GuestErrorRig, leftOver, settledBaseline } from './backend-harness.js';
import { baseSeed, budgetMs, timeBoxedAssertAsync } from './config.js';
import { splitDriver } from '../helpers/split-driver.js';

const SIZE = 16;
const RAM = 8 * 1024 * 1024;
/** Guest addresses used by the malformed chains: a scratch area in RAM, a hole right after RAM. */
const SCRATCH = 0x40_0000;
const HOLE = RAM + 0x1000;
const TWO_53 = 2n ** 53n;

type Malformation =
  | { kind: 'head-out-of-range'; head: number }
  | { kind: 'next-out-of-range'; next: number }
  | { kind: 'loop'; length: number }
  | { kind: 'avail-jump'; by: number }
  | { kind: 'indirect-nested' }
  | { kind: 'indirect-bad-length'; len: number }
  | { kind: 'indirect-with-next' }
  | { kind: 'indirect-unmapped' }
  | { kind: 'indirect-huge-loop'; entries: number }
  | { kind: 'address-past-2^53'; addr: bigint; len: number }
  | { kind: 'too-many-bytes' }
  | { kind: 'writable-before-readable' }
  | { kind: 'status-unmapped' }
  | { kind: 'header-unmapped' }
  | { kind: 'no-status' }
  | { kind: 'short-header'; len: number };

const malformationArb: fc.Arbitrary<Malformation> = fc.oneof(
  fc.record({ kind: fc.constant('head-out-of-range' as const), head: fc.integer({ min: SIZE, max: 0xffff }) }),
  fc.record({ kind: fc.constant('next-out-of-range' as const), next: fc.integer({ min: SIZE, max: 0xffff }) }),
  fc.record({ kind: fc.constant('loop' as const), length: fc.integer({ min: 1, max: SIZE }) }),
  fc.record({ kind: fc.constant('avail-jump' as const), by: fc.integer({ min: SIZE + 1, max: 0xffff }) }),
  fc.constant({ kind: 'indirect-nested' as const }),
  fc.record({ kind: fc.constant('indirect-bad-length' as const), len: fc.constantFrom(0, 8, 17, 16 * 65537) }),
  fc.constant({ kind: 'indirect-with-next' as const }),
  fc.constant({ kind: 'indirect-unmapped' as const }),
  fc.record({ kind: fc.constant('indirect-huge-loop' as const), entries: fc.constantFrom(1025, 4096, 65536) }),
  fc.record({
    kind: fc.constant('address-past-2^53' as const),
    addr: fc.constantFrom(TWO_53, TWO_53 - 16n, 2n ** 64n - 1n, 2n ** 63n),
    len: fc.constantFrom(17, 0xffff_ffff),
  }),
  fc.constant({ kind: 'too-many-bytes' as const }),
  fc.constant({ kind: 'writable-before-readable' as const }),
  fc.constant({ kind: 'status-unmapped' as const }),
  fc.constant({ kind: 'header-unmapped' as const }),
  fc.constant({ kind: 'no-status' as const }),
  fc.record({ kind: fc.constant('short-header' as const), len: fc.integer({ min: 0, max: 15 }) }),
);

const NEXT = 1;
const WRITE = 2;
const INDIRECT = 4;

/** Writes the malformed request into queue 0 (raw descriptors from index 0) and makes it available. */
function plant(ram: GuestRam, d: SplitQueueDriver<number>, m: Malformation): void {
  const hdr = SCRATCH;
  const status = SCRATCH + 0x100;
  const table = SCRATCH + 0x1000;
  const header = ram.bytes(hdr, 16);
  header.fill(0);
  header[0] = BlkRequestType.FLUSH;
  const w = (i: number, addr: number | bigint, len: number, flags: number, next = 0): void => d.writeDescriptor(i, { addr, len, flags, next });
  const wt = (i: number, addr: number | bigint, len: number, flags: number, next = 0): void => {
    const b = ram.bytes(table + 16 * i, 16);
    const v = new DataView(b.buffer, b.byteOffset, 16);
    v.setBigUint64(0, BigInt.asUintN(64, BigInt(addr)), true);
    v.setUint32(8, len >>> 0, true);
    v.setUint16(12, flags, true);
    v.setUint16(14, next, true);
  };
  let head = 0;
  switch (m.kind) {
    case 'head-out-of-range':
      head = m.head;
      break;
    case 'next-out-of-range':
      w(0, hdr, 16, NEXT, m.next);
      break;
    case 'loop':
      for (let i = 0; i < m.length; i++) w(i, hdr, 16, NEXT, (i + 1) % m.length);
      break;
    case 'avail-jump':
      w(0, hdr, 16, NEXT, 1);
      w(1, status, 1, WRITE);
      d.pushAvailRaw(0);
      d.setAvailIdx((d.availPosition + m.by - 1) & 0xffff);
      return;
    case 'indirect-nested':
      wt(0, hdr, 16, NEXT, 1);
      wt(1, table, 32, INDIRECT);
      w(0, table, 32, INDIRECT);
      break;
    case 'indirect-bad-length':
      w(0, table, m.len, INDIRECT);
      break;
    case 'indirect-with-next':
      w(0, table, 32, INDIRECT | NEXT, 1);
      w(1, status, 1, WRITE);
      break;
    case 'indirect-unmapped':
      w(0, HOLE, 32, INDIRECT);
      break;
    case 'indirect-huge-loop': {
      // A table of `entries` descriptors that all chain on (the last back to the first): the budget of 1024
      // descriptors per chain (or the loop check) must stop the walk.
      const big = SCRATCH + 0x2000;
      const bytes = ram.bytes(big, 16 * m.entries);
      const v = new DataView(bytes.buffer, bytes.byteOffset, bytes.length);
      for (let i = 0; i < m.entries; i++) {
        v.setBigUint64(16 * i, BigInt(hdr), true);
        v.setUint32(16 * i + 8, 16, true);
        v.setUint16(16 * i + 12, NEXT, true);
        v.setUint16(16 * i + 14, (i + 1) % m.entries, true);
      }
      w(0, big, 16 * m.entries, INDIRECT);
      break;
    }
    case 'address-past-2^53':
      w(0, hdr, 16, NEXT, 1);
      w(1, m.addr, m.len, WRITE);
      break;
    case 'too-many-bytes':
      w(0, hdr, 0xffff_ffff, NEXT, 1);
      w(1, status, 0xffff_ffff, WRITE);
      break;
    case 'writable-before-readable':
      w(0, status, 1, WRITE | NEXT, 1);
      w(1, hdr, 16, 0);
      break;
    case 'status-unmapped':
      w(0, hdr, 16, NEXT, 1);
      w(1, HOLE, 1, WRITE);
      break;
    case 'header-unmapped':
      w(0, HOLE, 16, NEXT, 1);
      w(1, status, 1, WRITE);
      break;
    case 'no-status':
      w(0, hdr, 16, 0);
      break;
    case 'short-header':
      w(0, hdr, m.len, NEXT, 1);
      w(1, status, 1, WRITE);
      break;
  }
  d.pushAvailRaw(head);
  d.publish();
}

/** Error codes the log may name for each malformation (the queue's own, or the blk device's). */
const EXPECTED: Record<Malformation['kind'], RegExp> = {
  'head-out-of-range': /^VIRTIO_DESC_INDEX_OUT_OF_RANGE$/,
  'next-out-of-range': /^VIRTIO_DESC_INDEX_OUT_OF_RANGE$/,
  loop: /^VIRTIO_DESC_LOOP$/,
  'avail-jump': /^VIRTIO_AVAIL_INDEX_INVALID$/,
  'indirect-nested': /^VIRTIO_INDIRECT_NESTED$/,
  'indirect-bad-length': /^VIRTIO_INDIRECT_BAD_LENGTH$/,
  'indirect-with-next': /^VIRTIO_INDIRECT_WITH_NEXT$/,
  'indirect-unmapped': /^GUEST_MEMORY_UNMAPPED$/,
  'indirect-huge-loop': /^VIRTIO_(CHAIN_TOO_LONG|DESC_LOOP)$/,
  'address-past-2^53': /^VIRTIO_DESC_ADDRESS_INVALID$/,
  'too-many-bytes': /^VIRTIO_CHAIN_TOO_LONG$/,
  'writable-before-readable': /^VIRTIO_WRITABLE_BEFORE_READABLE$/,
  'status-unmapped': /^GUEST_MEMORY_UNMAPPED$/,
  'header-unmapped': /^GUEST_MEMORY_UNMAPPED$/,
  'no-status': /^VIRTIO_BLK_NO_STATUS$/,
  'short-header': /^VIRTIO_BLK_SHORT_HEADER$/,
};

test('malformed chains on one queue: that queue stops with NEEDS_RESET and its err eventfd; the rest keeps working', { timeout: 300_000 }, async (t) => {
  const baseline = await settledBaseline();
  t.diagnostic(await malformedChains());
  // Checked once malformedChains() has returned: the guest RAM's buffers are garbage only then.
  assert.equal(await leftOver(baseline), undefined, 'fds or mappings leaked');
});

async function malformedChains(): Promise<string> {
  const rig = await GuestErrorRig.open({ ramSize: RAM, reserve: SCRATCH + 0x20_0000 }); // scratch area out of the allocator's way
  const features = featureBit(VirtioFeature.VERSION_1) | featureBit(VirtioFeature.RING_INDIRECT_DESC);
  const startA = (): Promise<void> => rig.startA({ features, queues: [{ index: 0, size: SIZE }, { index: 1, size: SIZE }] });
  let cases = 0;
  const byKind = new Map<string, number>();
  const seed = baseSeed();
  try {
    await startA();
    await rig.startB({ features, queues: [{ index: 0, size: SIZE }] });
    await timeBoxedAssertAsync(
      fc.asyncProperty(malformationArb, async (m) => {
        cases++;
        byKind.set(m.kind, (byKind.get(m.kind) ?? 0) + 1);
        const logStart = rig.beginCase();
        plant(rig.ramA, splitDriver(rig.fa.queue(0)), m);
        rig.fa.queue(0).kick();
        await rig.expectStopped(m.kind, logStart, EXPECTED[m.kind]);
        // Reset and start again with fresh rings.
        await rig.resetA();
        await startA();
      }),
      { ms: Math.max(1000, budgetMs('guestErrors')), seed },
    );
  } finally {
    await rig.close();
  }
  return `guest errors: seed=${seed} ${cases} malformed requests (${[...byKind].map(([k, n]) => `${k}=${n}`).join(' ')})`;
}

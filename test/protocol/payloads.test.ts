// Payload codecs (spec "Payload"): wire bytes, round trips and length checks for each type.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import {
  type Codec,
  ConfigFlag,
  IotlbPerm,
  IotlbType,
  type MemoryRegion,
  TransferDirection,
  TransferPhase,
  VringAddrFlag,
  deviceConfigPayload,
  deviceStateTransferPayload,
  emptyPayload,
  encodePackedVringBase,
  featureBit,
  inflightPayload,
  iotlbPayload,
  logPayload,
  memoryRegionPayload,
  memoryTablePayload,
  memoryTableRegionCount,
  packedVringBase,
  sharedObjectPayload,
  singleMemoryRegionPayload,
  splitVringBase,
  statusPayload,
  u64Payload,
  vringAddrPayload,
  vringAreaPayload,
  vringFilePayload,
  vringStatePayload,
} from '../../src/protocol/index.js';
import { concat, hex, protocolError, toHex } from './helpers.js';

const BAD_PAYLOAD = protocolError('VHOST_PROTOCOL_BAD_PAYLOAD');

/** Asserts that `value` encodes to `wire` and `wire` decodes to `value`. */
function roundTrip<T>(codec: Codec<T>, value: T, wire: string): void {
  const bytes = codec.encode(value);
  assert.equal(toHex(bytes), wire.replace(/\s+/g, ''), `${codec.name}: encode`);
  assert.equal(codec.size(value), bytes.length);
  assert.deepEqual(codec.decode(hex(wire)), value, `${codec.name}: decode`);
}

/** Asserts that a payload one byte shorter and one byte longer than `wire` are rejected. */
function rejectsOtherLengths<T>(codec: Codec<T>, wire: string): void {
  const bytes = hex(wire);
  assert.throws(() => codec.decode(bytes.subarray(0, bytes.length - 1)), BAD_PAYLOAD, `${codec.name}: truncated`);
  assert.throws(() => codec.decode(concat(bytes, hex('00'))), BAD_PAYLOAD, `${codec.name}: too long`);
  assert.throws(() => codec.decode(new Uint8Array(0)), BAD_PAYLOAD, `${codec.name}: empty`);
}

test('no payload: size 0 only', () => {
  assert.equal(emptyPayload.encode(undefined).length, 0);
  assert.equal(emptyPayload.decode(new Uint8Array(0)), undefined);
  assert.throws(() => emptyPayload.decode(hex('00')), BAD_PAYLOAD);
});

test('u64: SET_FEATURES with VERSION_1 | PROTOCOL_FEATURES', () => {
  roundTrip(u64Payload, featureBit(32) | featureBit(30), '00000040 01000000');
  roundTrip(u64Payload, 0n, '0000000000000000');
  roundTrip(u64Payload, 0xffff_ffff_ffff_ffffn, 'ffffffffffffffff');
  rejectsOtherLengths(u64Payload, '00000040 01000000');
  assert.throws(() => u64Payload.encode(-1n), RangeError);
  assert.throws(() => u64Payload.encode(1n << 64n), RangeError);
});

test('device status: a u64 holding the status byte', () => {
  roundTrip(statusPayload, 0x0f, '0f00000000000000');
  assert.throws(() => statusPayload.decode(hex('0001000000000000')), BAD_PAYLOAD);
  assert.throws(() => statusPayload.decode(hex('0f00000000000080')), BAD_PAYLOAD);
  rejectsOtherLengths(statusPayload, '0f00000000000000');
  assert.throws(() => statusPayload.encode(256), RangeError);
});

test('vring state description: index u32, num u32', () => {
  roundTrip(vringStatePayload, { index: 1, num: 256 }, '01000000 00010000');
  roundTrip(vringStatePayload, { index: 0xffff_ffff, num: 0x8000_0000 }, 'ffffffff 00000080');
  rejectsOtherLengths(vringStatePayload, '01000000 00010000');
  assert.throws(() => vringStatePayload.encode({ index: -1, num: 0 }), RangeError);
});

test('vring descriptor index for split virtqueues: bits 16-31 reserved', () => {
  assert.equal(splitVringBase(0xffff), 0xffff);
  assert.equal(splitVringBase(0), 0);
  assert.throws(() => splitVringBase(0x1_0000), BAD_PAYLOAD);
});

test('vring descriptor indices for packed virtqueues', () => {
  const base = { availIndex: 0x1234, availWrapCounter: true, usedIndex: 0x7fff, usedWrapCounter: true };
  const num = encodePackedVringBase(base);
  assert.equal(num, 0xffff_9234);
  assert.deepEqual(packedVringBase(num), base);
  assert.deepEqual(packedVringBase(0), {
    availIndex: 0,
    availWrapCounter: false,
    usedIndex: 0,
    usedWrapCounter: false,
  });
  assert.throws(() => encodePackedVringBase({ ...base, usedIndex: 0x8000 }), RangeError);
});

test('vring address description: index, flags, desc, used, avail, log', () => {
  roundTrip(
    vringAddrPayload,
    { index: 1, flags: VringAddrFlag.LOG, desc: 0x7f00_0000_1000n, used: 0x2000n, avail: 0x3000n, log: 0x4000n },
    '01000000 01000000 00100000007f0000 0020000000000000 0030000000000000 0040000000000000',
  );
  rejectsOtherLengths(vringAddrPayload, '01000000 01000000' + '00'.repeat(32));
});

test('kick/call/err u64: bits 0-7 index, bit 8 no fd, nothing else', () => {
  roundTrip(vringFilePayload, { index: 2, noFd: false }, '0200000000000000');
  roundTrip(vringFilePayload, { index: 0, noFd: true }, '0001000000000000');
  roundTrip(vringFilePayload, { index: 255, noFd: true }, 'ff01000000000000');
  assert.throws(() => vringFilePayload.decode(hex('0002000000000000')), BAD_PAYLOAD);
  assert.throws(() => vringFilePayload.decode(hex('0000000000000080')), BAD_PAYLOAD);
  rejectsOtherLengths(vringFilePayload, '0200000000000000');
  assert.throws(() => vringFilePayload.encode({ index: 256, noFd: false }), RangeError);
});

test('vring area description: u64 index and flags, size, offset', () => {
  roundTrip(
    vringAreaPayload,
    { index: 3, noFd: false, size: 0x1000n, offset: 0x3000n },
    '0300000000000000 0010000000000000 0030000000000000',
  );
  roundTrip(vringAreaPayload, { index: 3, noFd: true, size: 0n, offset: 0n }, '0301000000000000' + '00'.repeat(16));
  assert.throws(() => vringAreaPayload.decode(hex('0304000000000000' + '00'.repeat(16))), BAD_PAYLOAD);
  rejectsOtherLengths(vringAreaPayload, '03000000000000000010000000000000' + '0030000000000000');
});

const REGION_A: MemoryRegion = {
  guestPhysAddr: 0n,
  memorySize: 0x4000_0000n,
  userspaceAddr: 0x7f00_0000_0000n,
  mmapOffset: 0n,
};
const REGION_A_HEX = '0000000000000000 0000004000000000 00000000007f0000 0000000000000000';
const REGION_B: MemoryRegion = {
  guestPhysAddr: 0x1_0000_0000n,
  memorySize: 0x8000_0000n,
  userspaceAddr: 0x7f00_4000_0000n,
  mmapOffset: 0x4000_0000n,
};
const REGION_B_HEX = '0000000001000000 0000008000000000 00000040007f0000 0000004000000000';

test('memory region description: guest address, size, user address, mmap offset', () => {
  roundTrip(memoryRegionPayload, REGION_A, REGION_A_HEX);
  rejectsOtherLengths(memoryRegionPayload, REGION_A_HEX);
});

test('single memory region description: u64 padding, then a region', () => {
  roundTrip(singleMemoryRegionPayload, REGION_B, '0000000000000000 ' + REGION_B_HEX);
  // The padding is ignored on decode.
  assert.deepEqual(singleMemoryRegionPayload.decode(hex('ffffffffffffffff ' + REGION_B_HEX)), REGION_B);
  rejectsOtherLengths(singleMemoryRegionPayload, '0000000000000000 ' + REGION_B_HEX);
});

test('multiple memory regions description: nregions, padding, regions', () => {
  roundTrip(memoryTablePayload, { regions: [REGION_A] }, '01000000 00000000 ' + REGION_A_HEX);
  roundTrip(memoryTablePayload, { regions: [REGION_A, REGION_B] }, '02000000 00000000 ' + REGION_A_HEX + REGION_B_HEX);
});

test('memory table: a payload padded to the full 8 regions is accepted', () => {
  const padded = concat(hex('02000000 00000000 ' + REGION_A_HEX + REGION_B_HEX), new Uint8Array(6 * 32));
  assert.equal(padded.length, 8 + 8 * 32);
  assert.deepEqual(memoryTablePayload.decode(padded), { regions: [REGION_A, REGION_B] });
  assert.equal(memoryTableRegionCount(padded), 2);
});

test('memory table: wrong nregions or length is rejected', () => {
  // nregions 0
  assert.throws(() => memoryTablePayload.decode(hex('00000000 00000000')), BAD_PAYLOAD);
  // nregions 9 (with 9 regions of bytes)
  assert.throws(() => memoryTablePayload.decode(concat(hex('09000000 00000000'), new Uint8Array(9 * 32))), BAD_PAYLOAD);
  assert.throws(() => memoryTableRegionCount(concat(hex('09000000 00000000'), new Uint8Array(9 * 32))), BAD_PAYLOAD);
  // nregions 2 but one region of bytes
  assert.throws(() => memoryTablePayload.decode(hex('02000000 00000000 ' + REGION_A_HEX)), BAD_PAYLOAD);
  // a truncated region
  assert.throws(() => memoryTablePayload.decode(hex('01000000 00000000 ' + REGION_A_HEX).subarray(0, 39)), BAD_PAYLOAD);
  // shorter than the prefix
  assert.throws(() => memoryTablePayload.decode(hex('01000000')), BAD_PAYLOAD);
  assert.throws(() => memoryTablePayload.encode({ regions: [] }), RangeError);
  assert.throws(() => memoryTablePayload.encode({ regions: Array.from({ length: 9 }, () => REGION_A) }), RangeError);
});

test('memory table: nregions 0 takes no fds (structural count) but does not decode', () => {
  assert.equal(memoryTableRegionCount(hex('00000000 00000000')), 0);
});

test('memory table round trip for any 1-8 regions', () => {
  const u64 = fc.bigInt({ min: 0n, max: (1n << 64n) - 1n });
  // fc.record builds null-prototype objects; spread them into plain ones for deepStrictEqual.
  const region = fc
    .record({ guestPhysAddr: u64, memorySize: u64, userspaceAddr: u64, mmapOffset: u64 })
    .map((r): MemoryRegion => ({ ...r }));
  fc.assert(
    fc.property(fc.array(region, { minLength: 1, maxLength: 8 }), (regions) => {
      const bytes = memoryTablePayload.encode({ regions });
      assert.equal(bytes.length, 8 + 32 * regions.length);
      assert.deepEqual(memoryTablePayload.decode(bytes), { regions });
    }),
  );
});

test('log description: mmap size, mmap offset', () => {
  roundTrip(logPayload, { mmapSize: 0x2_0000n, mmapOffset: 0x1000n }, '0000020000000000 0010000000000000');
  rejectsOtherLengths(logPayload, '0000020000000000 0010000000000000');
});

test('virtio device config space: offset, size, flags, then size bytes', () => {
  const config = { offset: 0x14, size: 4, flags: ConfigFlag.WRITABLE, data: hex('deadbeef') };
  roundTrip(deviceConfigPayload, config, '14000000 04000000 00000000 deadbeef');
  const empty = { offset: 0, size: 0, flags: ConfigFlag.MIGRATION, data: new Uint8Array(0) };
  roundTrip(deviceConfigPayload, empty, '00000000 00000000 01000000');
  const full = { offset: 0, size: 256, flags: 0, data: new Uint8Array(256).fill(7) };
  assert.deepEqual(deviceConfigPayload.decode(deviceConfigPayload.encode(full)), full);
});

test('virtio device config space: size must match the bytes that follow and be at most 256', () => {
  assert.throws(() => deviceConfigPayload.decode(hex('14000000 04000000 00000000 deadbe')), BAD_PAYLOAD);
  assert.throws(() => deviceConfigPayload.decode(hex('14000000 04000000 00000000 deadbeef00')), BAD_PAYLOAD);
  assert.throws(() => deviceConfigPayload.decode(hex('14000000 04000000 000000')), BAD_PAYLOAD);
  const big = concat(hex('00000000 01010000 00000000'), new Uint8Array(257));
  assert.throws(() => deviceConfigPayload.decode(big), BAD_PAYLOAD);
  assert.throws(() => deviceConfigPayload.encode({ offset: 0, size: 3, flags: 0, data: hex('0102') }), RangeError);
  const tooBig = { offset: 0, size: 257, flags: 0, data: new Uint8Array(257) };
  assert.throws(() => deviceConfigPayload.encode(tooBig), RangeError);
});

test('virtio device config space: decoded data is a copy', () => {
  const wire = hex('14000000 04000000 00000000 deadbeef');
  const config = deviceConfigPayload.decode(wire);
  wire.fill(0);
  assert.equal(toHex(config.data), 'deadbeef');
});

test('inflight description: 24 bytes as QEMU sends it, 20 accepted', () => {
  const inflight = { mmapSize: 0x2000n, mmapOffset: 0n, numQueues: 2, queueSize: 256 };
  roundTrip(inflightPayload, inflight, '0020000000000000 0000000000000000 0200 0001 00000000');
  assert.deepEqual(inflightPayload.decode(hex('0020000000000000 0000000000000000 0200 0001')), inflight);
  for (const length of [0, 16, 19, 21, 23, 25]) {
    assert.throws(() => inflightPayload.decode(new Uint8Array(length)), BAD_PAYLOAD, `length ${length}`);
  }
  assert.throws(() => inflightPayload.encode({ ...inflight, queueSize: 0x1_0000 }), RangeError);
});

test('inflight description: QEMU 7.2 GET_INFLIGHT_FD request, our reply, SET_INFLIGHT_FD; tail padding ignored', () => {
  // vhost_user_get_inflight_fd: num_queues = nvqs, queue_size = the queue-size property, the rest zero.
  assert.deepEqual(inflightPayload.decode(hex('0000000000000000 0000000000000000 0100 8000 00000000')), {
    mmapSize: 0n,
    mmapOffset: 0n,
    numQueues: 1,
    queueSize: 128,
  });
  // The reply: one split queue region of 128 descriptors (0x840 bytes) at offset 0; QEMU wants exactly 24 bytes.
  const reply = inflightPayload.encode({ mmapSize: 0x840n, mmapOffset: 0n, numQueues: 1, queueSize: 128 });
  assert.equal(toHex(reply), '4008000000000000' + '0000000000000000' + '0100' + '8000' + '00000000');
  // SET_INFLIGHT_FD after a reconnect carries the same values back; whatever the 4 padding bytes hold is ignored.
  assert.deepEqual(inflightPayload.decode(hex('4008000000000000 0000000000000000 0100 8000 deadbeef')), {
    mmapSize: 0x840n,
    mmapOffset: 0n,
    numQueues: 1,
    queueSize: 128,
  });
  // Full u64 ranges survive (the back-end validates them, not the codec).
  roundTrip(
    inflightPayload,
    { mmapSize: 0xffff_ffff_ffff_ffffn, mmapOffset: 0x1_0000_0000n, numQueues: 0xffff, queueSize: 0 },
    'ffffffffffffffff 0000000001000000 ffff 0000 00000000',
  );
});

test('IOTLB message: iova, size, user address, perm, type (32 bytes, 26 accepted)', () => {
  const msg = {
    iova: 0x1000n,
    size: 0x2000n,
    uaddr: 0x7f00_0000_1000n,
    perm: IotlbPerm.READ_WRITE,
    type: IotlbType.UPDATE,
  };
  roundTrip(iotlbPayload, msg, '0010000000000000 0020000000000000 00100000007f0000 03 02 000000000000');
  assert.deepEqual(iotlbPayload.decode(hex('0010000000000000 0020000000000000 00100000007f0000 03 02')), msg);
  for (const length of [25, 27, 31, 33]) {
    assert.throws(() => iotlbPayload.decode(new Uint8Array(length)), BAD_PAYLOAD, `length ${length}`);
  }
});

test('device state transfer parameters: direction, phase', () => {
  roundTrip(
    deviceStateTransferPayload,
    { direction: TransferDirection.LOAD, phase: TransferPhase.STOPPED },
    '01000000 00000000',
  );
  rejectsOtherLengths(deviceStateTransferPayload, '01000000 00000000');
});

test('VhostUserShared: a 16-byte UUID', () => {
  const uuid = hex('00112233445566778899aabbccddeeff');
  roundTrip(sharedObjectPayload, { uuid }, '00112233445566778899aabbccddeeff');
  rejectsOtherLengths(sharedObjectPayload, '00112233445566778899aabbccddeeff');
  assert.throws(() => sharedObjectPayload.encode({ uuid: new Uint8Array(15) }), RangeError);
});

test('encodeInto writes at an offset and refuses a target that is too small', () => {
  const target = new Uint8Array(12).fill(0xee);
  assert.equal(vringStatePayload.encodeInto({ index: 1, num: 2 }, target, 2), 10);
  assert.equal(toHex(target), 'eeee' + '01000000' + '02000000' + 'eeee');
  assert.throws(() => vringStatePayload.encodeInto({ index: 1, num: 2 }, target, 5), RangeError);
  assert.throws(() => vringStatePayload.encodeInto({ index: 1, num: 2 }, target, -1), RangeError);
});

test('decoders accept views into a larger buffer', () => {
  const big = hex('ffff 01000000 00010000 ffff');
  assert.deepEqual(vringStatePayload.decode(big.subarray(2, 10)), { index: 1, num: 256 });
});

// virtio-net offloads in software (src/devices/net/offload.ts): the virtio-net header, its validation against what the
// driver negotiated (VIRTIO 1.2 §5.1.6.2), the RFC 1071 checksum, checksum completion for NEEDS_CSUM frames, frame
// parsing and TCP segmentation (GSO TCPV4/TCPV6) for a receiver that did not negotiate the offloads (§5.1.6.4).
//
// Every checksum here is checked by `refSum` below: a plain byte-pair loop with end-around carry at each step, written
// from RFC 1071 and sharing nothing with the implementation. Frames are built field by field by `buildFrame`, which
// also knows where each header is, so the segment checks do not rely on parseFrame either.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import {
  MAX_GSO_HEADER_LEN,
  MAX_OFFLOAD_FRAME,
  OffloadCap,
  OffloadError,
  VNET_HDR_F_DATA_VALID,
  VNET_HDR_F_NEEDS_CSUM,
  VNET_HDR_GSO_ECN,
  VNET_HDR_GSO_NONE,
  VNET_HDR_GSO_TCPV4,
  VNET_HDR_GSO_TCPV6,
  VNET_HDR_GSO_UDP,
  clearVnetHeader,
  completeChecksum,
  foldChecksum,
  maxSegments,
  newFrameLayout,
  newVnetHeader,
  onesSum,
  parseFrame,
  readVnetHeader,
  segmentScratchSize,
  segmentTcp,
  validateOffload,
  writeVnetHeader,
  type FrameLayout,
  type VnetHeader,
} from '../../src/devices/net/offload.js';

const RUNS = 200;

// ---- bytes ----------------------------------------------------------------------------------------------------------

function hex(b: Uint8Array): string {
  return Buffer.from(b.buffer, b.byteOffset, b.byteLength).toString('hex').replace(/(..)(?!$)/g, '$1 ');
}

function fromHex(s: string): Uint8Array {
  return Uint8Array.from(Buffer.from(s.replace(/\s+/g, ''), 'hex'));
}

function u16(b: Uint8Array, at: number): number {
  return ((b[at] as number) << 8) | (b[at + 1] as number);
}

function u32(b: Uint8Array, at: number): number {
  return (((b[at] as number) << 24) | ((b[at + 1] as number) << 16) | ((b[at + 2] as number) << 8) | (b[at + 3] as number)) >>> 0;
}

/** A copy of `bytes` at index `at` of a larger array (ArrayBuffer or SharedArrayBuffer), garbage around it. */
function placed(bytes: Uint8Array, at: number, shared: boolean, after = 13): Uint8Array {
  const size = at + bytes.length + after;
  const big = new Uint8Array(shared ? new SharedArrayBuffer(size) : new ArrayBuffer(size));
  big.fill(0xa5);
  big.set(bytes, at);
  return big;
}

// ---- reference checksum (RFC 1071, the slow obvious way) -----------------------------------------------------------

/** Ones-complement sum of the big-endian 16-bit words of bytes[start, end) (odd tail padded with 0) plus `seed`. */
function refSum(bytes: Uint8Array, start: number, end: number, seed = 0): number {
  let s = seed;
  while (s > 0xffff) s = (s & 0xffff) + (s >>> 16);
  for (let i = start; i < end; i += 2) {
    const hi = bytes[i] as number;
    const lo = i + 1 < end ? (bytes[i + 1] as number) : 0;
    s += (hi << 8) | lo;
    s = (s & 0xffff) + (s >>> 16); // end-around carry at every step
  }
  return s;
}

/** Pseudo-header sum: RFC 793 §3.1 / RFC 768 for IPv4, RFC 8200 §8.1 for IPv6 (no routing header here). */
function pseudoSum(f: Uint8Array, l3: number, ip: 4 | 6, proto: number, l4Len: number): number {
  const addrs = ip === 4 ? refSum(f, l3 + 12, l3 + 20) : refSum(f, l3 + 8, l3 + 40);
  return refSum(new Uint8Array(0), 0, 0, addrs + proto + (l4Len >>> 16) + (l4Len & 0xffff));
}

/** Does the L4 checksum of f[l4, end) verify (the receiver's check: the whole sum is 0xffff)? */
function l4Verifies(f: Uint8Array, l3: number, ip: 4 | 6, l4: number, proto: number, end = f.length): boolean {
  return refSum(f, l4, end, pseudoSum(f, l3, ip, proto, end - l4)) === 0xffff;
}

function ipv4HeaderVerifies(f: Uint8Array, l3: number): boolean {
  const ihl = ((f[l3] as number) & 0x0f) * 4;
  return refSum(f, l3, l3 + ihl) === 0xffff;
}

// ---- frames ---------------------------------------------------------------------------------------------------------

const TCP = 6;
const UDP = 17;
const FIN = 0x01;
const PSH = 0x08;
const ACK = 0x10;
const ECE = 0x40;
const CWR = 0x80;

interface FrameSpec {
  vlans?: 0 | 1 | 2;
  ip: 4 | 6;
  proto?: number;
  /** IPv4 options bytes (multiple of 4, ≤ 40). */
  ipOptions?: number;
  /** IPv6 extension headers, raw (each one's first byte is overwritten with the right next header). */
  ext?: readonly Uint8Array[];
  /** TCP options bytes (multiple of 4, ≤ 40). */
  tcpOptions?: number;
  payload: Uint8Array;
  tcpFlags?: number;
  seq?: number;
  ipId?: number;
  /** Value of the L4 checksum field; 'partial': the pseudo-header sum, as Linux leaves it for CHECKSUM_PARTIAL. */
  l4Check?: number | 'partial';
  /** IPv4 flags + fragment offset field (default DF). */
  fragField?: number;
}

interface Built {
  frame: Uint8Array;
  l3: number;
  l4: number;
  /** Offset of the L4 payload (= length of all headers). */
  hdrs: number;
}

function buildFrame(spec: FrameSpec): Built {
  const vlans = spec.vlans ?? 0;
  const proto = spec.proto ?? TCP;
  const ipOptions = spec.ipOptions ?? 0;
  const ext = spec.ext ?? [];
  const extLen = ext.reduce((n, e) => n + e.length, 0);
  const tcpOptions = spec.tcpOptions ?? 0;
  const l4HdrLen = proto === TCP ? 20 + tcpOptions : 8; // UDP, or 8 bytes of another protocol (ICMP)
  const l3 = 14 + 4 * vlans;
  const l3HdrLen = spec.ip === 4 ? 20 + ipOptions : 40 + extLen;
  const l4 = l3 + l3HdrLen;
  const hdrs = l4 + l4HdrLen;
  const f = new Uint8Array(hdrs + spec.payload.length);
  const v = new DataView(f.buffer);
  f.set([0x52, 0x54, 0x00, 0x00, 0x00, 0x0b, 0x52, 0x54, 0x00, 0x00, 0x00, 0x0a], 0);
  let p = 12;
  if (vlans === 2) {
    v.setUint16(p, 0x88a8); // 802.1ad outer tag (S-TAG), VID 100
    v.setUint16(p + 2, 100);
    p += 4;
  }
  if (vlans >= 1) {
    v.setUint16(p, 0x8100); // 802.1Q tag (C-TAG), PCP 5, VID 42
    v.setUint16(p + 2, (5 << 13) | 42);
    p += 4;
  }
  v.setUint16(p, spec.ip === 4 ? 0x0800 : 0x86dd);
  const l4Len = f.length - l4;
  if (spec.ip === 4) {
    f[l3] = 0x40 | (l3HdrLen / 4);
    v.setUint16(l3 + 2, f.length - l3);
    v.setUint16(l3 + 4, spec.ipId ?? 0x1c46);
    v.setUint16(l3 + 6, spec.fragField ?? 0x4000);
    f[l3 + 8] = 64;
    f[l3 + 9] = proto;
    f.set([10, 0, 0, 1, 10, 0, 0, 2], l3 + 12);
    // Options: a Router Alert (RFC 2113, 4 bytes) and NOPs.
    for (let i = 0; i < ipOptions; i++) f[l3 + 20 + i] = 1;
    if (ipOptions >= 4) f.set([0x94, 0x04, 0x00, 0x00], l3 + 20);
    v.setUint16(l3 + 10, ~refSum(f, l3, l4) & 0xffff);
  } else {
    v.setUint32(l3, 0x6000_0000 | (0x2e << 20) | 0xbeef); // traffic class, flow label
    v.setUint16(l3 + 4, f.length - l3 - 40);
    f[l3 + 7] = 64;
    f.set(fromHex('20010db8000000000000000000000001 20010db8000000000000000000000002'), l3 + 8);
    let at = l3 + 40;
    for (const e of ext) {
      f.set(e, at);
      at += e.length;
    }
    // Chain the next-header bytes: IPv6 header -> ext[0]'s type, ext[k] -> ext[k + 1]'s type, the last -> proto.
    const types = ext.map((e) => extType.get(e) ?? 60);
    f[l3 + 6] = types[0] ?? proto;
    at = l3 + 40;
    for (let k = 0; k < ext.length; k++) {
      f[at] = types[k + 1] ?? proto;
      at += (ext[k] as Uint8Array).length;
    }
  }
  if (proto === TCP) {
    v.setUint16(l4, 40000);
    v.setUint16(l4 + 2, 80);
    v.setUint32(l4 + 4, spec.seq ?? 0x1000_0000);
    v.setUint32(l4 + 8, 1);
    f[l4 + 12] = ((20 + tcpOptions) / 4) << 4;
    f[l4 + 13] = spec.tcpFlags ?? ACK;
    v.setUint16(l4 + 14, 0xffff);
    for (let i = 0; i < tcpOptions; i++) f[l4 + 20 + i] = 1; // NOP
    if (tcpOptions >= 4) f.set([2, 4, 0x05, 0xb4], l4 + 20); // MSS 1460
  } else if (proto === UDP) {
    v.setUint16(l4, 5353);
    v.setUint16(l4 + 2, 5353);
    v.setUint16(l4 + 4, l4Len);
  }
  f.set(spec.payload, hdrs);
  const checkAt = proto === TCP ? l4 + 16 : l4 + 6;
  const check = spec.l4Check ?? 'partial';
  if (check === 'partial') v.setUint16(checkAt, pseudoSum(f, l3, spec.ip, proto, l4Len));
  else v.setUint16(checkAt, check);
  return { frame: f, l3, l4, hdrs };
}

/** IPv6 extension headers with their type (the first byte, next header, is filled in by buildFrame). */
const extType = new Map<Uint8Array, number>();
function extHeader(type: number, length: number, fill = 0): Uint8Array {
  const e = new Uint8Array(length).fill(fill);
  e[1] = length / 8 - 1;
  extType.set(e, type);
  return e;
}
function routingHeader(segmentsLeft: number): Uint8Array {
  const e = extHeader(43, 24);
  e[2] = 2; // type 2 (RFC 6275), one address
  e[3] = segmentsLeft;
  e.set(fromHex('20010db8000000000000000000000099'), 8);
  return e;
}

/** Deterministic pseudo-random bytes (xorshift32), for payloads. */
function pattern(length: number, seed = 0x9e3779b9): Uint8Array {
  const b = new Uint8Array(length);
  let x = seed >>> 0 || 1;
  for (let i = 0; i < length; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    b[i] = x & 0xff;
  }
  return b;
}

const POOL = pattern(70_000);

function header(fields: Partial<VnetHeader>): VnetHeader {
  return { ...newVnetHeader(), ...fields };
}

// ---- virtio-net header ------------------------------------------------------------------------------------------------

test('header: the 10 bytes of struct virtio_net_hdr, u16 fields little-endian; round trip; num_buffers untouched', () => {
  const h = header({
    flags: VNET_HDR_F_NEEDS_CSUM,
    gsoType: VNET_HDR_GSO_TCPV4 | VNET_HDR_GSO_ECN,
    hdrLen: 66,
    gsoSize: 1448,
    csumStart: 34,
    csumOffset: 16,
  });
  const buf = new Uint8Array(16).fill(0xee);
  writeVnetHeader(buf, 3, h);
  //                          flags gso  hdr_len  gso_size csum_start csum_offset | num_buffers: not written
  assert.equal(hex(buf), 'ee ee ee 01 81 42 00 a8 05 22 00 10 00 ee ee ee');

  const back = newVnetHeader();
  assert.deepEqual(back, { flags: 0, gsoType: 0, hdrLen: 0, gsoSize: 0, csumStart: 0, csumOffset: 0 });
  readVnetHeader(buf, 3, back);
  assert.deepEqual(back, h);

  // Values using both bytes of every u16.
  const big = fromHex('02 04 34 12 ff ff 01 80 fe 7f');
  readVnetHeader(big, 0, back);
  assert.deepEqual(back, { flags: 2, gsoType: 4, hdrLen: 0x1234, gsoSize: 0xffff, csumStart: 0x8001, csumOffset: 0x7ffe });
  const again = new Uint8Array(10);
  writeVnetHeader(again, 0, back);
  assert.equal(hex(again), hex(big));

  clearVnetHeader(back);
  assert.deepEqual(back, newVnetHeader());
});

// ---- validateOffload --------------------------------------------------------------------------------------------------

test('validateOffload: fine headers, and every refusal with its code', () => {
  const ALL = OffloadCap.CSUM | OffloadCap.TSO4 | OffloadCap.TSO6 | OffloadCap.ECN;
  // A TSO4 frame: Ethernet + IPv4 + TCP (54 bytes) + 3000 bytes, checksum field at 34 + 16.
  const tso4 = { flags: VNET_HDR_F_NEEDS_CSUM, gsoType: VNET_HDR_GSO_TCPV4, hdrLen: 54, gsoSize: 1448, csumStart: 34, csumOffset: 16 };
  const len = 3054;
  const cases: [string, Partial<VnetHeader>, number, number, number][] = [
    // name, header fields, frame length, negotiated, expected
    ['no offload, nothing negotiated', {}, 60, 0, OffloadError.OK],
    ['checksum only', { flags: VNET_HDR_F_NEEDS_CSUM, csumStart: 34, csumOffset: 6 }, 60, OffloadCap.CSUM, OffloadError.OK],
    ['TSO4', tso4, len, ALL, OffloadError.OK],
    ['TSO4 with only CSUM|TSO4', tso4, len, OffloadCap.CSUM | OffloadCap.TSO4, OffloadError.OK],
    ['TSO6', { ...tso4, gsoType: VNET_HDR_GSO_TCPV6, csumStart: 54 }, len, OffloadCap.CSUM | OffloadCap.TSO6, OffloadError.OK],
    ['TSO4 + ECN', { ...tso4, gsoType: VNET_HDR_GSO_TCPV4 | VNET_HDR_GSO_ECN }, len, ALL, OffloadError.OK],
    ['checksum field ends exactly at the frame end', { flags: VNET_HDR_F_NEEDS_CSUM, csumStart: 50, csumOffset: 8 }, 60, ALL, OffloadError.OK],
    ['hdr_len is not looked at', { ...tso4, hdrLen: 0xffff }, len, ALL, OffloadError.OK],
    ['DATA_VALID (receive-only) is ignored', { flags: VNET_HDR_F_DATA_VALID }, 60, 0, OffloadError.OK],
    ['csum_start/offset ignored without NEEDS_CSUM', { csumStart: 0xffff, csumOffset: 0xffff }, 60, 0, OffloadError.OK],
    ['frame of MAX_OFFLOAD_FRAME', tso4, MAX_OFFLOAD_FRAME, ALL, OffloadError.OK],

    ['gso_size 0 with TCPV4', { ...tso4, gsoSize: 0 }, len, ALL, OffloadError.GSO_SIZE_ZERO],
    ['GSO without NEEDS_CSUM', { ...tso4, flags: 0 }, len, ALL, OffloadError.GSO_WITHOUT_CSUM],
    ['csum_start beyond the frame', { ...tso4, csumStart: 3100 }, len, ALL, OffloadError.CSUM_OUT_OF_FRAME],
    ['csum_start + csum_offset beyond the frame', { ...tso4, csumStart: 34, csumOffset: 3020 }, len, ALL, OffloadError.CSUM_OUT_OF_FRAME],
    ['the 2-byte field straddles the end', { flags: VNET_HDR_F_NEEDS_CSUM, csumStart: 50, csumOffset: 9 }, 60, ALL, OffloadError.CSUM_OUT_OF_FRAME],
    ['NEEDS_CSUM without CSUM', { flags: VNET_HDR_F_NEEDS_CSUM, csumStart: 34, csumOffset: 6 }, 60, OffloadCap.TSO4, OffloadError.CSUM_NOT_NEGOTIATED],
    ['TCPV4 without TSO4', tso4, len, OffloadCap.CSUM | OffloadCap.TSO6, OffloadError.GSO_NOT_NEGOTIATED],
    ['TCPV6 without TSO6', { ...tso4, gsoType: VNET_HDR_GSO_TCPV6 }, len, OffloadCap.CSUM | OffloadCap.TSO4, OffloadError.GSO_NOT_NEGOTIATED],
    ['ECN bit without ECN', { ...tso4, gsoType: VNET_HDR_GSO_TCPV4 | VNET_HDR_GSO_ECN }, len, OffloadCap.CSUM | OffloadCap.TSO4, OffloadError.ECN_NOT_NEGOTIATED],
    ['UDP (UFO) is not offered', { ...tso4, gsoType: VNET_HDR_GSO_UDP }, len, ALL, OffloadError.GSO_TYPE_UNKNOWN],
    ['UDP_L4 (USO, 5) is not offered', { ...tso4, gsoType: 5 }, len, ALL, OffloadError.GSO_TYPE_UNKNOWN],
    ['the ECN bit alone', { ...tso4, gsoType: VNET_HDR_GSO_ECN }, len, ALL, OffloadError.GSO_TYPE_UNKNOWN],
    ['unknown type 2', { ...tso4, gsoType: 2 }, len, ALL, OffloadError.GSO_TYPE_UNKNOWN],
    ['frame over MAX_OFFLOAD_FRAME', tso4, MAX_OFFLOAD_FRAME + 1, ALL, OffloadError.FRAME_TOO_LONG],
    ['frame over MAX_OFFLOAD_FRAME, no offload either', {}, MAX_OFFLOAD_FRAME + 1, ALL, OffloadError.FRAME_TOO_LONG],
  ];
  assert.equal(MAX_OFFLOAD_FRAME, 65553);
  for (const [name, fields, frameLen, allowed, expected] of cases) {
    assert.equal(validateOffload(header(fields), frameLen, allowed), expected, name);
  }
  // Codes are distinct, and OK is 0.
  const codes = Object.values(OffloadError);
  assert.equal(new Set(codes).size, codes.length);
  assert.equal(OffloadError.OK, 0);
});

// ---- RFC 1071 sum -----------------------------------------------------------------------------------------------------

test('onesSum/foldChecksum: RFC 1071 §3 example at every alignment, over ArrayBuffer and SharedArrayBuffer', () => {
  const example = fromHex('00 01 f2 03 f4 f5 f6 f7');
  assert.equal(refSum(example, 0, 8), 0xddf2, 'the reference itself');
  for (const shared of [false, true]) {
    for (let at = 0; at < 8; at++) {
      const big = placed(example, at, shared);
      assert.equal(onesSum(big, at, 8, 0), 0xddf2, `at ${at}`);
      assert.equal(foldChecksum(onesSum(big, at, 8, 0)), 0x220d);
      // The same bytes through a view that does not start at its buffer's start.
      const view = big.subarray(at);
      assert.equal(onesSum(view, 0, 8, 0), 0xddf2);
      // Seeded: the sum continues.
      assert.equal(onesSum(big, at + 4, 4, onesSum(big, at, 4, 0)), 0xddf2);
    }
  }
  // Odd length: the last byte is the high byte of a word padded with zero.
  assert.equal(onesSum(fromHex('00 01 f2'), 0, 3, 0), 0x0001 + 0xf200);
  assert.equal(onesSum(fromHex('ff'), 0, 1, 0), 0xff00);
  assert.equal(onesSum(new Uint8Array(0), 0, 0, 0), 0);
  assert.equal(onesSum(new Uint8Array(0), 0, 0, 0x1_2345), 0x2346, 'a seed above 16 bits is folded');

  assert.equal(foldChecksum(0xddf2), 0x220d);
  assert.equal(foldChecksum(0), 0xffff);
  assert.equal(foldChecksum(0xffff), 0);
  assert.equal(foldChecksum(0x1_fffe), 0, '0xfffe + 1 = 0xffff');
  assert.equal(foldChecksum(0x1_0000_0000), 0xfffe, '2^32 ≡ 1');
  assert.equal(foldChecksum(2 ** 52 + 5), 0xffff - 21, '2^52 = (2^16)^3 * 16 ≡ 16');

  assert.throws(() => onesSum(example, 4, 5, 0), RangeError);
  assert.throws(() => onesSum(example.subarray(2), 0, 7, 0), RangeError, 'bounds are the view, not the buffer');
});

test('onesSum: every length 0..70 at every alignment equals the byte-pair reference', () => {
  const data = pattern(80, 7);
  for (const shared of [false, true]) {
    for (let at = 0; at < 8; at++) {
      const big = placed(data, at, shared);
      for (let len = 0; len <= 70; len++) {
        for (const seed of [0, 1, 0xffff, 0x3_0002]) {
          assert.equal(onesSum(big, at + 3, len, seed), refSum(big, at + 3, at + 3 + len, seed), `at ${at} len ${len} seed ${seed}`);
        }
      }
    }
  }
});

test('onesSum: alternating between several buffers (the cached views follow the buffer)', () => {
  const arrays = [0, 1, 2, 3, 4].map((k) => placed(pattern(200, k + 1), k, k % 2 === 0));
  for (let round = 0; round < 3; round++) {
    for (const order of [
      [0, 1, 2, 3, 4],
      [4, 0, 4, 1, 4, 2],
      [2, 2, 3, 2, 3, 0],
    ]) {
      for (const k of order) {
        const a = arrays[k] as Uint8Array;
        assert.equal(onesSum(a, k, 200, 0), refSum(a, k, k + 200), `array ${k}`);
      }
    }
  }
});

test('onesSum: random bytes, offsets and lengths (property)', () => {
  fc.assert(
    fc.property(
      fc.uint8Array({ minLength: 0, maxLength: 3000 }),
      fc.nat({ max: 15 }),
      fc.nat(),
      fc.nat(),
      fc.boolean(),
      (data, at, a, b, shared) => {
        const big = placed(data, at, shared);
        const start = at + (data.length === 0 ? 0 : a % data.length);
        const end = start + (b % (at + data.length - start + 1));
        assert.equal(onesSum(big, start, end - start, 0), refSum(big, start, end));
      },
    ),
    { numRuns: RUNS },
  );
  // All 0xff bytes: a sum that needs many carries.
  const ones = new Uint8Array(65_536).fill(0xff);
  assert.equal(onesSum(ones, 0, ones.length, 0), 0xffff);
  assert.equal(onesSum(ones, 1, 65_535, 0), refSum(ones, 1, 65_536));
});

// ---- completeChecksum ---------------------------------------------------------------------------------------------------

test('completeChecksum: IPv4/TCP, IPv4/UDP, IPv6/TCP, IPv6/UDP frames with the pseudo-header sum in the field (CHECKSUM_PARTIAL)', () => {
  for (const [ip, proto] of [
    [4, TCP],
    [4, UDP],
    [6, TCP],
    [6, UDP],
  ] as const) {
    for (const len of [0, 1, 2, 17, 1400, 1473]) {
      const { frame, l3, l4 } = buildFrame({ ip, proto, payload: pattern(len, len + 1), tcpOptions: proto === TCP ? 12 : 0 });
      const before = frame.slice();
      const field = proto === TCP ? 16 : 6;
      assert.ok(!l4Verifies(frame, l3, ip, l4, proto), 'the partial checksum does not verify yet');
      assert.equal(completeChecksum(frame, 0, frame.length, l4, field), OffloadError.OK);
      assert.ok(l4Verifies(frame, l3, ip, l4, proto), `IPv${ip} ${proto === TCP ? 'TCP' : 'UDP'} payload ${len}`);
      // Only the two bytes of the field changed.
      for (let i = 0; i < frame.length; i++) {
        if (i !== l4 + field && i !== l4 + field + 1) assert.equal(frame[i], before[i], `byte ${i}`);
      }
    }
  }
});

test('completeChecksum: a computed 0 is stored as 0xffff (RFC 768), and it still verifies', () => {
  for (const proto of [UDP, TCP]) {
    // Choose the last two payload bytes so that the whole sum (pseudo-header + L4) is 0xffff: the checksum is then 0.
    const { frame, l3, l4 } = buildFrame({ ip: 4, proto, payload: pattern(100, 3) });
    const field = proto === TCP ? 16 : 6;
    const v = new DataView(frame.buffer);
    v.setUint16(frame.length - 2, 0);
    const rest = refSum(frame, l4, frame.length); // the field holds the pseudo-header sum
    v.setUint16(frame.length - 2, 0xffff - rest);
    assert.equal(refSum(frame, l4, frame.length), 0xffff);
    assert.equal(completeChecksum(frame, 0, frame.length, l4, field), OffloadError.OK);
    assert.equal(u16(frame, l4 + field), 0xffff, 'never 0, which means "no checksum" for UDP');
    assert.ok(l4Verifies(frame, l3, 4, l4, proto));
  }
});

test('completeChecksum: a field outside the frame or a frame outside the array is refused, nothing written', () => {
  const { frame, l4 } = buildFrame({ ip: 4, proto: UDP, payload: pattern(20) });
  const before = frame.slice();
  assert.equal(completeChecksum(frame, 0, frame.length, l4, frame.length - l4 - 1), OffloadError.CSUM_OUT_OF_FRAME);
  assert.equal(completeChecksum(frame, 0, frame.length, frame.length, 0), OffloadError.CSUM_OUT_OF_FRAME);
  assert.equal(completeChecksum(frame, 0, 30, l4, 6), OffloadError.CSUM_OUT_OF_FRAME, 'the field past frameLen');
  assert.equal(completeChecksum(frame, 1, frame.length, l4, 6), OffloadError.OUT_OF_BUFFER);
  assert.equal(completeChecksum(frame.subarray(0, 40), 0, frame.length, l4, 6), OffloadError.OUT_OF_BUFFER);
  assert.deepEqual(frame, before);
});

test('completeChecksum: random TCP/UDP frames anywhere in a larger ArrayBuffer or SharedArrayBuffer (property)', () => {
  fc.assert(
    fc.property(
      fc.constantFrom<4 | 6>(4, 6),
      fc.constantFrom(TCP, UDP),
      fc.constantFrom<0 | 1 | 2>(0, 1, 2),
      fc.nat({ max: 2000 }),
      fc.nat({ max: POOL.length - 2000 }),
      fc.nat({ max: 10 }).map((k) => 4 * k),
      fc.nat({ max: 11 }),
      fc.boolean(),
      (ip, proto, vlans, len, from, opts, at, shared) => {
        const { frame, l3, l4 } = buildFrame({
          ip,
          proto,
          vlans,
          payload: POOL.subarray(from, from + len),
          ipOptions: ip === 4 ? opts : 0,
          tcpOptions: proto === TCP ? opts : 0,
        });
        const big = placed(frame, at, shared);
        const before = big.slice();
        const field = proto === TCP ? 16 : 6;
        assert.equal(completeChecksum(big, at, frame.length, l4, field), OffloadError.OK);
        const done = big.slice(at, at + frame.length);
        assert.ok(l4Verifies(done, l3, ip, l4, proto));
        if (proto === UDP) assert.notEqual(u16(done, l4 + field), 0);
        for (let i = 0; i < big.length; i++) {
          if (i !== at + l4 + field && i !== at + l4 + field + 1) assert.equal(big[i], before[i]);
        }
      },
    ),
    { numRuns: RUNS },
  );
});

// ---- parseFrame -----------------------------------------------------------------------------------------------------

function layoutOf(f: Uint8Array, len = f.length, at = 0): FrameLayout | false {
  const out = newFrameLayout();
  return parseFrame(f, at, len, out) ? out : false;
}

test('parseFrame: IPv4 with options, IPv6, UDP, one and two VLAN tags, IPv6 extension headers', () => {
  const payload = pattern(10);
  // IPv4, 8 bytes of options, TCP with 12 bytes of options.
  let b = buildFrame({ ip: 4, ipOptions: 8, tcpOptions: 12, payload });
  assert.deepEqual(layoutOf(b.frame), { l3: 14, ipVersion: 4, l4: 42, l4Proto: TCP, payload: 74 });
  // A short IPv4/UDP frame, written out: Ethernet, IPv4 (IHL 5), UDP, 2 bytes of payload.
  const udp = fromHex(
    '52 54 00 00 00 0b 52 54 00 00 00 0a 08 00' +
      '45 00 00 1e 00 00 40 00 40 11 00 00 0a 00 00 01 0a 00 00 02' +
      '14 e9 14 e9 00 0a 00 00 ab cd',
  );
  assert.deepEqual(layoutOf(udp), { l3: 14, ipVersion: 4, l4: 34, l4Proto: UDP, payload: 42 });
  b = buildFrame({ ip: 6, payload });
  assert.deepEqual(layoutOf(b.frame), { l3: 14, ipVersion: 6, l4: 54, l4Proto: TCP, payload: 74 });
  b = buildFrame({ ip: 6, proto: UDP, payload, vlans: 1 });
  assert.deepEqual(layoutOf(b.frame), { l3: 18, ipVersion: 6, l4: 58, l4Proto: UDP, payload: 66 });
  b = buildFrame({ ip: 4, payload, vlans: 2 });
  assert.equal(hex(b.frame.subarray(12, 24)), '88 a8 00 64 81 00 a0 2a 08 00 45 00');
  assert.deepEqual(layoutOf(b.frame), { l3: 22, ipVersion: 4, l4: 42, l4Proto: TCP, payload: 62 });
  // Hop-by-Hop (8), Destination Options (16), Routing (24, segments left 0) before TCP.
  b = buildFrame({ ip: 6, payload, ext: [extHeader(0, 8), extHeader(60, 16, 1), routingHeader(0)] });
  assert.deepEqual(layoutOf(b.frame), { l3: 14, ipVersion: 6, l4: 102, l4Proto: TCP, payload: 122 });
  // Inside a larger array, at an odd index.
  const big = placed(b.frame, 5, true);
  assert.deepEqual(layoutOf(big, b.frame.length, 5), { l3: 14, ipVersion: 6, l4: 102, l4Proto: TCP, payload: 122 });
});

test('parseFrame: truncated frames, fragments, three tags, other protocols, bad lengths -> false', () => {
  const payload = pattern(10);
  for (const spec of [
    { ip: 4, ipOptions: 8, tcpOptions: 12, vlans: 2 },
    { ip: 6, vlans: 1, ext: [extHeader(0, 8)] },
    { ip: 4, proto: UDP },
  ] as Omit<FrameSpec, 'payload'>[]) {
    const b = buildFrame({ ...spec, payload });
    // Every cut inside the headers fails; a frame that ends right after them parses (empty payload).
    for (let len = 0; len < b.hdrs; len++) assert.equal(layoutOf(b.frame, len), false, `cut at ${len}`);
    const l = layoutOf(b.frame, b.hdrs);
    assert.ok(l !== false && l.payload === b.hdrs);
    // The out object is zeroed on failure.
    const out = newFrameLayout();
    assert.ok(parseFrame(b.frame, 0, b.frame.length, out));
    assert.equal(parseFrame(b.frame, 0, 20, out), false);
    assert.deepEqual(out, newFrameLayout());
  }

  const frag = (fragField: number): Uint8Array => buildFrame({ ip: 4, payload, fragField }).frame;
  assert.equal(layoutOf(frag(0x2000)), false, 'IPv4 MF');
  assert.equal(layoutOf(frag(0x0001)), false, 'IPv4 fragment offset');
  assert.notEqual(layoutOf(frag(0x4000)), false, 'DF alone is fine');
  assert.notEqual(layoutOf(frag(0x0000)), false);
  assert.equal(layoutOf(buildFrame({ ip: 6, payload, ext: [extHeader(44, 8)] }).frame), false, 'IPv6 Fragment header');
  assert.equal(layoutOf(buildFrame({ ip: 4, proto: 1, payload }).frame), false, 'ICMP');
  assert.equal(layoutOf(buildFrame({ ip: 6, proto: 58, payload }).frame), false, 'ICMPv6');

  let f = buildFrame({ ip: 4, payload, vlans: 2 }).frame;
  const three = new Uint8Array(f.length + 4);
  three.set(f.subarray(0, 16));
  three.set([0x81, 0x00, 0x00, 0x07], 16); // a third tag
  three.set(f.subarray(16), 20);
  assert.equal(layoutOf(three), false, 'three tags');

  f = buildFrame({ ip: 4, payload }).frame;
  f[12] = 0x08;
  f[13] = 0x06;
  assert.equal(layoutOf(f), false, 'ARP');
  f = buildFrame({ ip: 4, payload }).frame;
  f[14] = 0x44;
  assert.equal(layoutOf(f), false, 'IHL 4');
  f[14] = 0x65;
  assert.equal(layoutOf(f), false, 'version 6 in an IPv4 ethertype');
  f = buildFrame({ ip: 4, payload }).frame;
  f[14] = 0x4f;
  assert.equal(layoutOf(f), false, 'IHL 15 runs into the payload end');
  f = buildFrame({ ip: 6, payload }).frame;
  f[14] = 0x40;
  assert.equal(layoutOf(f), false, 'version 4 in an IPv6 ethertype');
  f = buildFrame({ ip: 4, payload }).frame;
  f[34 + 12] = 0x40;
  assert.equal(layoutOf(f), false, 'TCP data offset 4');
  f[34 + 12] = 0xf0;
  assert.equal(layoutOf(f), false, 'TCP data offset 15: 60 bytes, past the frame');
  assert.equal(layoutOf(f, 10, f.length), false, 'range outside the array');
});

// ---- segmentTcp -----------------------------------------------------------------------------------------------------

interface Segmented {
  count: number;
  segments: Uint8Array[];
}

function segment(buf: Uint8Array, offset: number, frameLen: number, h: VnetHeader, outShift = 0): Segmented {
  const scratch = new Uint8Array(segmentScratchSize(frameLen, h.gsoSize) + outShift).subarray(outShift);
  const n = maxSegments(frameLen, h.gsoSize);
  const offs = new Uint32Array(n);
  const lens = new Uint32Array(n);
  const count = segmentTcp(buf, offset, frameLen, h, scratch, offs, lens);
  const segments: Uint8Array[] = [];
  let expectAt = 0;
  for (let i = 0; i < count; i++) {
    assert.equal(offs[i], expectAt, 'segments back to back');
    segments.push(scratch.slice(offs[i], (offs[i] as number) + (lens[i] as number)));
    expectAt += lens[i] as number;
  }
  return { count, segments };
}

function tsoHeader(ip: 4 | 6, mss: number, hdrs = 0, csumStart = 0): VnetHeader {
  return header({
    flags: VNET_HDR_F_NEEDS_CSUM,
    gsoType: ip === 4 ? VNET_HDR_GSO_TCPV4 : VNET_HDR_GSO_TCPV6,
    hdrLen: hdrs,
    gsoSize: mss,
    csumStart,
    csumOffset: 16,
  });
}

/**
 * Checks the segments of a built super-frame: count, lengths, headers equal to the original except the fields that
 * change (and those are what RFC 791/8200/793 and Linux's tcp_gso_segment make them), payloads concatenated equal
 * the original, every IPv4 header checksum and TCP checksum verifies.
 */
function checkSegments(b: Built, ip: 4 | 6, mss: number, r: Segmented): void {
  const { frame, l3, l4, hdrs } = b;
  const payloadLen = frame.length - hdrs;
  const n = Math.ceil(payloadLen / mss);
  assert.equal(r.count, n, 'ceil(payload / mss) segments');
  const seq0 = u32(frame, l4 + 4);
  const id0 = u16(frame, l3 + 4);
  const flags0 = frame[l4 + 13] as number;
  const changed = new Set<number>(
    ip === 4 ? [l3 + 2, l3 + 3, l3 + 4, l3 + 5, l3 + 10, l3 + 11] : [l3 + 4, l3 + 5],
  );
  for (const k of [4, 5, 6, 7, 13, 16, 17]) changed.add(l4 + k);
  let joined = 0;
  for (let i = 0; i < n; i++) {
    const s = r.segments[i] as Uint8Array;
    const segPayload = Math.min(mss, payloadLen - i * mss);
    assert.equal(s.length, hdrs + segPayload, `segment ${i} length`);
    assert.ok(s.length <= hdrs + mss);
    for (let k = 0; k < hdrs; k++) {
      if (!changed.has(k) && s[k] !== frame[k]) assert.fail(`segment ${i}: header byte ${k} changed`);
    }
    for (let k = 0; k < segPayload; k++) {
      if (s[hdrs + k] !== frame[hdrs + joined + k]) assert.fail(`segment ${i}: payload byte ${k} differs`);
    }
    joined += segPayload;
    if (ip === 4) {
      assert.equal(u16(s, l3 + 2), s.length - l3, 'IPv4 total length');
      assert.equal(u16(s, l3 + 4), (id0 + i) & 0xffff, 'IPv4 identification');
      assert.ok(ipv4HeaderVerifies(s, l3), `segment ${i}: IPv4 header checksum`);
    } else {
      assert.equal(u16(s, l3 + 4), s.length - l3 - 40, 'IPv6 payload length');
    }
    assert.equal(u32(s, l4 + 4), (seq0 + i * mss) % 2 ** 32, `segment ${i}: sequence number`);
    let flags = flags0;
    if (i < n - 1) flags &= ~(FIN | PSH);
    if (i > 0) flags &= ~CWR;
    assert.equal(s[l4 + 13], flags, `segment ${i}: flags`);
    assert.ok(l4Verifies(s, l3, ip, l4, TCP), `segment ${i}: TCP checksum`);
  }
  assert.equal(joined, payloadLen, 'the payloads concatenated are the original payload');
}

test('segmentTcp: 3000 bytes of IPv4/TCP payload, MSS 1448 -> 3 segments (reference frame)', () => {
  // Ethernet | IPv4: length 3040, id 0xffff (wraps), DF, TTL 64, TCP, checksum left 0 | TCP 40000 -> 80,
  // seq 0xfffffa00 (wraps in the last segment), ack 1, flags CWR ECE ACK PSH FIN, window 0xffff, checksum 0x1234
  // (garbage: not trusted).
  const headers = fromHex(
    '52 54 00 00 00 0b 52 54 00 00 00 0a 08 00' +
      '45 00 0b e0 ff ff 40 00 40 06 00 00 0a 00 00 01 0a 00 00 02' +
      '9c 40 00 50 ff ff fa 00 00 00 00 01 50 d9 ff ff 12 34 00 00',
  );
  const frame = new Uint8Array(54 + 3000);
  frame.set(headers);
  frame.set(pattern(3000, 42), 54);
  const h = tsoHeader(4, 1448, 54, 34);
  assert.equal(validateOffload(h, frame.length, OffloadCap.CSUM | OffloadCap.TSO4), OffloadError.OK);
  const before = frame.slice();
  const r = segment(frame, 0, frame.length, h);
  assert.deepEqual(frame, before, 'the input is not modified');
  assert.equal(r.count, 3);
  assert.deepEqual(
    r.segments.map((s) => s.length),
    [54 + 1448, 54 + 1448, 54 + 104],
  );
  assert.deepEqual(
    r.segments.map((s) => u16(s, 14 + 2)),
    [1488, 1488, 144],
    'IPv4 total lengths',
  );
  assert.deepEqual(
    r.segments.map((s) => u16(s, 14 + 4)),
    [0xffff, 0x0000, 0x0001],
    'IPv4 ids',
  );
  assert.deepEqual(
    r.segments.map((s) => u32(s, 34 + 4)),
    [0xfffffa00, 0xffffffa8, 0x00000550],
    'sequence numbers',
  );
  assert.deepEqual(
    r.segments.map((s) => s[34 + 13]),
    [CWR | ECE | ACK, ECE | ACK, ECE | ACK | PSH | FIN],
    'FIN/PSH on the last only, CWR on the first only',
  );
  for (const s of r.segments) {
    assert.ok(ipv4HeaderVerifies(s, 14));
    assert.ok(l4Verifies(s, 14, 4, 34, TCP));
  }
  checkSegments({ frame, l3: 14, l4: 34, hdrs: 54 }, 4, 1448, r);
  assert.equal(maxSegments(frame.length, 1448), 3);
});

test('segmentTcp: the scratch may be another part of the SharedArrayBuffer holding the frame', () => {
  const b = buildFrame({ ip: 4, vlans: 1, payload: pattern(4000, 9), tcpFlags: ACK | PSH });
  const h = tsoHeader(4, 1460);
  const sab = new SharedArrayBuffer(8192 + segmentScratchSize(b.frame.length, 1460));
  const memory = new Uint8Array(sab, 16);
  memory.set(b.frame, 3);
  const out = new Uint8Array(sab, 8192 + 1);
  const offs = new Uint32Array(maxSegments(b.frame.length, 1460));
  const lens = new Uint32Array(offs.length);
  const count = segmentTcp(memory, 3, b.frame.length, h, out, offs, lens);
  assert.equal(count, 3);
  const segments = [0, 1, 2].map((i) => out.slice(offs[i], (offs[i] as number) + (lens[i] as number)));
  checkSegments(b, 4, 1460, { count, segments });
  assert.deepEqual(memory.slice(3, 3 + b.frame.length), b.frame, 'the frame is untouched');
});

test('segmentTcp: IPv6 with extension headers and VLAN tags; a payload of one MSS or less is one segment', () => {
  const ext = [extHeader(0, 8), extHeader(60, 16, 1), routingHeader(0)];
  const b = buildFrame({ ip: 6, vlans: 2, ext, tcpOptions: 12, payload: pattern(5000, 5), tcpFlags: ACK | PSH, l4Check: 0xbad });
  checkSegments(b, 6, 1400, segment(b.frame, 0, b.frame.length, tsoHeader(6, 1400)));
  for (const mss of [1000, 999, 1200]) {
    const one = buildFrame({ ip: 4, payload: pattern(1000, mss), tcpFlags: ACK | FIN | CWR });
    const r = segment(one.frame, 0, one.frame.length, tsoHeader(4, mss));
    checkSegments(one, 4, mss, r);
    if (mss >= 1000) {
      assert.equal(r.count, 1);
      assert.equal(r.segments[0]?.[one.l4 + 13], ACK | FIN | CWR, 'a single segment keeps every flag');
    }
  }
});

test('segmentTcp: frames it cannot segment -> negative codes, nothing else', () => {
  const payload = pattern(3000);
  const v4 = buildFrame({ ip: 4, payload }).frame;
  const run = (buf: Uint8Array, h: VnetHeader, len = buf.length, offset = 0, scratch?: number, slots?: number): number =>
    segmentTcp(
      buf,
      offset,
      len,
      h,
      new Uint8Array(scratch ?? Math.max(0, segmentScratchSize(len, h.gsoSize))),
      new Uint32Array(slots ?? maxSegments(len, h.gsoSize)),
      new Uint32Array(slots ?? maxSegments(len, h.gsoSize)),
    );
  assert.equal(run(v4.subarray(0, 40), tsoHeader(4, 1448)), -OffloadError.GSO_NOT_PARSABLE, 'too short for IPv4 + TCP');
  assert.equal(run(v4, tsoHeader(4, 1448), 53), -OffloadError.GSO_NOT_PARSABLE, 'TCP header cut');
  assert.equal(run(v4, tsoHeader(4, 1448), 54), -OffloadError.GSO_NO_PAYLOAD, 'headers only');
  assert.equal(run(buildFrame({ ip: 4, proto: UDP, payload }).frame, tsoHeader(4, 1448)), -OffloadError.GSO_NOT_TCP);
  assert.equal(run(buildFrame({ ip: 6, payload }).frame, tsoHeader(4, 1448)), -OffloadError.GSO_IP_VERSION, 'TCPV4 on IPv6');
  assert.equal(run(v4, tsoHeader(6, 1448)), -OffloadError.GSO_IP_VERSION, 'TCPV6 on IPv4');
  assert.equal(run(buildFrame({ ip: 4, payload, fragField: 0x2000 }).frame, tsoHeader(4, 1448)), -OffloadError.GSO_NOT_PARSABLE, 'fragment');
  assert.equal(run(v4, { ...tsoHeader(4, 1448), gsoType: VNET_HDR_GSO_UDP }), -OffloadError.GSO_TYPE_UNKNOWN);
  assert.equal(run(v4, { ...tsoHeader(4, 1448), gsoType: VNET_HDR_GSO_NONE }), -OffloadError.GSO_TYPE_UNKNOWN);
  assert.equal(run(v4, tsoHeader(4, 0), v4.length, 0, 100_000, 100), -OffloadError.GSO_SIZE_ZERO);
  assert.equal(run(v4, tsoHeader(4, 1448), v4.length + 1), -OffloadError.OUT_OF_BUFFER);
  assert.equal(run(v4, tsoHeader(4, 1448), v4.length, 1), -OffloadError.OUT_OF_BUFFER);
  assert.equal(run(v4, tsoHeader(4, 1448), v4.length, 0, v4.length + 54), -OffloadError.SCRATCH_TOO_SMALL, 'scratch');
  assert.equal(run(v4, tsoHeader(4, 1448), v4.length, 0, undefined, 2), -OffloadError.SCRATCH_TOO_SMALL, 'slots');
  const routed = buildFrame({ ip: 6, payload, ext: [routingHeader(1)] }).frame;
  assert.equal(run(routed, tsoHeader(6, 1448)), -OffloadError.GSO_IPV6_ROUTING);
  const longExt = buildFrame({ ip: 6, payload, ext: [extHeader(60, 200, 1)] }).frame; // 14 + 40 + 200 + 20 > 256
  assert.ok(14 + 40 + 200 + 20 > MAX_GSO_HEADER_LEN);
  assert.equal(run(longExt, tsoHeader(6, 1448)), -OffloadError.GSO_HEADERS_TOO_LONG);
  // The largest frame is fine cut at 1448, but as one segment its IPv4 total length (65539) does not fit 16 bits.
  const huge = buildFrame({ ip: 4, payload: POOL.subarray(0, MAX_OFFLOAD_FRAME - 54) }).frame;
  assert.equal(huge.length, MAX_OFFLOAD_FRAME);
  assert.equal(run(huge, tsoHeader(4, 0xffff)), -OffloadError.FRAME_TOO_LONG);
  assert.equal(run(huge, tsoHeader(4, 1448)), Math.ceil((MAX_OFFLOAD_FRAME - 54) / 1448));
});

test('maxSegments/segmentScratchSize: bounds for the shortest headers and the longest', () => {
  assert.equal(maxSegments(54, 1448), 0, 'no room for payload');
  assert.equal(maxSegments(55, 1448), 1);
  assert.equal(maxSegments(54 + 1448, 1448), 1);
  assert.equal(maxSegments(54 + 1449, 1448), 2);
  assert.equal(maxSegments(MAX_OFFLOAD_FRAME, 1448), 46);
  assert.equal(maxSegments(3000, 0), 0);
  assert.equal(segmentScratchSize(54, 1448), 0);
  assert.equal(segmentScratchSize(3054, 1448), 3054 + 2 * MAX_GSO_HEADER_LEN);
  assert.equal(segmentScratchSize(100, 1), 100 + 45 * 100, 'headers never longer than the frame');
});

test('segmentTcp: random IPv4/IPv6 super-frames, VLAN tags, options, flags, MSS (property)', () => {
  fc.assert(
    fc.property(
      fc.constantFrom<4 | 6>(4, 6),
      fc.constantFrom<0 | 1 | 2>(0, 1, 2),
      fc.nat({ max: 10 }).map((k) => 4 * k),
      fc.nat({ max: 10 }).map((k) => 4 * k),
      fc.integer({ min: 1, max: 65_000 }),
      fc.integer({ min: 1, max: 9000 }),
      fc.nat({ max: 255 }),
      fc.nat({ max: 0xffff_ffff }),
      fc.nat({ max: 0xffff }),
      fc.record({ at: fc.nat({ max: 9 }), outShift: fc.nat({ max: 7 }), shared: fc.boolean(), from: fc.nat({ max: 4000 }) }),
      (ip, vlans, ipOptions, tcpOptions, payloadWanted, mss, tcpFlags, seq, ipId, place) => {
        const hdrs = 14 + 4 * vlans + (ip === 4 ? 20 + ipOptions : 40) + 20 + tcpOptions;
        const payloadLen = Math.max(1, Math.min(payloadWanted, 65_000 - hdrs));
        const b = buildFrame({
          ip,
          vlans,
          ipOptions: ip === 4 ? ipOptions : 0,
          tcpOptions,
          payload: POOL.subarray(place.from, place.from + payloadLen),
          tcpFlags,
          seq,
          ipId,
          l4Check: seq & 0xffff, // anything: not trusted
        });
        assert.equal(b.hdrs, hdrs);
        const h = tsoHeader(ip, mss, hdrs, b.l4);
        const caps = OffloadCap.CSUM | OffloadCap.TSO4 | OffloadCap.TSO6;
        assert.equal(validateOffload(h, b.frame.length, caps), OffloadError.OK);
        const big = placed(b.frame, place.at, place.shared);
        const before = big.slice();
        const r = segment(big, place.at, b.frame.length, h, place.outShift);
        assert.deepEqual(big, before, 'the input is not modified');
        assert.ok(r.count <= maxSegments(b.frame.length, mss));
        const total = r.segments.reduce((n, s) => n + s.length, 0);
        assert.ok(total <= segmentScratchSize(b.frame.length, mss));
        checkSegments(b, ip, mss, r);
      },
    ),
    { numRuns: RUNS },
  );
});

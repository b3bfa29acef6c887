/**
 * virtio-net offloads done in software: checksum completion (VIRTIO_NET_HDR_F_NEEDS_CSUM) and TCP segmentation
 * (VIRTIO_NET_HDR_GSO_TCPV4 / TCPV6), for a backend or switch that forwards a frame from a driver that negotiated
 * VIRTIO_NET_F_CSUM / HOST_TSO4 / HOST_TSO6 to a receiver that did not negotiate the matching GUEST_* feature.
 *
 * Why this is needed: on transmit (VIRTIO 1.2 §5.1.6.2) a driver that negotiated VIRTIO_NET_F_CSUM may hand the device
 * a frame whose L4 checksum field only holds the pseudo-header sum, with csum_start/csum_offset telling where the
 * checksum goes; with HOST_TSO4/6 it may hand over one TCP "super-frame" of up to 64 KiB and gso_size (the MSS). On
 * receive (§5.1.6.4) the device may only pass such a frame on as it is if the receiving driver negotiated
 * GUEST_CSUM / GUEST_TSO4 / GUEST_TSO6; otherwise it must deliver complete, checksummed, MTU-sized frames (flags 0,
 * gso_type NONE). This module produces those frames.
 *
 * Hot-path rules followed throughout: no allocation per call (no subarray(), no temporary arrays or closures), no
 * exceptions for bad input (a frame comes from a guest: every problem is an `OffloadError` code the caller counts),
 * no BigInt. Bytes are read through a DataView over the frame's whole ArrayBuffer / SharedArrayBuffer, created when a
 * buffer is first seen and then reused (see `viewOf`): DataView reads any alignment, big-endian, with no copy.
 *
 * Positions: `offset` arguments are indices into the given Uint8Array (not into its buffer); offsets inside a frame
 * (csum_start, FrameLayout fields) are from the first byte of the Ethernet header. A frame is the Ethernet frame
 * without the virtio-net header and without FCS; its end is what the caller says (`frameLen`), not what the IP length
 * fields say: as in Linux's bridge/tap path, the device sums and segments the bytes the driver gave it.
 */

import { MAX_TX_FRAME } from './constants.js';

// ---- struct virtio_net_hdr -------------------------------------------------------------------------------------------

/** The fields of struct virtio_net_hdr (§5.1.6), parsed once per frame into a reusable object. */
export interface VnetHeader {
  flags: number;
  gsoType: number;
  hdrLen: number;
  gsoSize: number;
  csumStart: number;
  csumOffset: number;
}

export const VNET_HDR_F_NEEDS_CSUM = 1;
/** Receive only (§5.1.6.4): the device checked the checksum. A driver must not set it on transmit (§5.1.6.2.1). */
export const VNET_HDR_F_DATA_VALID = 2;

export const VNET_HDR_GSO_NONE = 0;
export const VNET_HDR_GSO_TCPV4 = 1;
/** UFO (IPv4 UDP fragmentation offload): not offered by this module; refused as GSO_TYPE_UNKNOWN. */
export const VNET_HDR_GSO_UDP = 3;
export const VNET_HDR_GSO_TCPV6 = 4;
/** Or-ed into gso_type: the TCP super-frame has CWR set (needs VIRTIO_NET_F_HOST_ECN, §5.1.6.2.1). */
export const VNET_HDR_GSO_ECN = 0x80;

/** Bytes of struct virtio_net_hdr without num_buffers: the fields this module reads and writes. */
export const VNET_HDR_LEN = 10;

export function newVnetHeader(): VnetHeader {
  return { flags: 0, gsoType: 0, hdrLen: 0, gsoSize: 0, csumStart: 0, csumOffset: 0 };
}

export function clearVnetHeader(h: VnetHeader): void {
  h.flags = 0;
  h.gsoType = 0;
  h.hdrLen = 0;
  h.gsoSize = 0;
  h.csumStart = 0;
  h.csumOffset = 0;
}

/**
 * Reads the 10 header bytes at buf[at]: flags u8, gso_type u8, then hdr_len, gso_size, csum_start, csum_offset as
 * little-endian u16 (VERSION_1 fields are little-endian; a legacy driver on a little-endian host writes the same
 * bytes). The caller ensures at + 10 <= buf.length.
 */
export function readVnetHeader(buf: Uint8Array, at: number, out: VnetHeader): void {
  out.flags = buf[at] as number;
  out.gsoType = buf[at + 1] as number;
  out.hdrLen = (buf[at + 2] as number) | ((buf[at + 3] as number) << 8);
  out.gsoSize = (buf[at + 4] as number) | ((buf[at + 5] as number) << 8);
  out.csumStart = (buf[at + 6] as number) | ((buf[at + 7] as number) << 8);
  out.csumOffset = (buf[at + 8] as number) | ((buf[at + 9] as number) << 8);
}

/** Writes the 10 header bytes at buf[at] (num_buffers, bytes 10-11 when present, is left alone). */
export function writeVnetHeader(buf: Uint8Array, at: number, h: VnetHeader): void {
  buf[at] = h.flags;
  buf[at + 1] = h.gsoType;
  buf[at + 2] = h.hdrLen;
  buf[at + 3] = h.hdrLen >>> 8;
  buf[at + 4] = h.gsoSize;
  buf[at + 5] = h.gsoSize >>> 8;
  buf[at + 6] = h.csumStart;
  buf[at + 7] = h.csumStart >>> 8;
  buf[at + 8] = h.csumOffset;
  buf[at + 9] = h.csumOffset >>> 8;
}

// ---- validation ------------------------------------------------------------------------------------------------------

/** Why a header or frame is refused (0 = fine). Stable numbers, for counters and tests; functions return them negated
 * where a non-negative result means something else (segmentTcp's segment count). */
export const OffloadError = {
  OK: 0,
  /** A GSO type with gso_size 0: no MSS to cut at. */
  GSO_SIZE_ZERO: 1,
  /** A GSO type without NEEDS_CSUM: Linux never sends one, and the checksum fields would be meaningless. */
  GSO_WITHOUT_CSUM: 2,
  /** csum_start + csum_offset + 2 beyond the frame (or beyond the caller's buffer). */
  CSUM_OUT_OF_FRAME: 3,
  /** gso_type not TCPV4/TCPV6 (UFO, USO, an ECN bit alone, unknown values). */
  GSO_TYPE_UNKNOWN: 4,
  /** segmentTcp: the Ethernet/IP/TCP headers cannot be parsed (truncated, IPv4 fragment, unknown ethertype, ...). */
  GSO_NOT_PARSABLE: 5,
  /** Longer than MAX_OFFLOAD_FRAME, or a segment whose IP length field would not fit 16 bits. */
  FRAME_TOO_LONG: 6,
  /** NEEDS_CSUM without VIRTIO_NET_F_CSUM (OffloadCap.CSUM). */
  CSUM_NOT_NEGOTIATED: 7,
  /** TCPV4 without HOST_TSO4 or TCPV6 without HOST_TSO6. */
  GSO_NOT_NEGOTIATED: 8,
  /** The ECN bit without HOST_ECN. */
  ECN_NOT_NEGOTIATED: 9,
  /** segmentTcp: the L4 protocol is not TCP. */
  GSO_NOT_TCP: 10,
  /** segmentTcp: TCPV4 on an IPv6 packet or TCPV6 on an IPv4 one. */
  GSO_IP_VERSION: 11,
  /** segmentTcp: no TCP payload to segment. */
  GSO_NO_PAYLOAD: 12,
  /** segmentTcp: L2+L3+L4 headers longer than MAX_GSO_HEADER_LEN (the bound segmentScratchSize relies on). */
  GSO_HEADERS_TOO_LONG: 13,
  /** segmentTcp: `out`, `segOffsets` or `segLengths` too small for the segments (a caller bug, not the guest's). */
  SCRATCH_TOO_SMALL: 14,
  /** The frame range [offset, offset + frameLen) is not inside the Uint8Array (a caller bug). */
  OUT_OF_BUFFER: 15,
  /**
   * segmentTcp: IPv6 with a Routing header that still has segments left. The TCP pseudo-header must then use the final
   * destination (RFC 8200 §8.1), which sits inside the routing header in a type-specific place; rather than guess,
   * such frames are refused.
   */
  GSO_IPV6_ROUTING: 16,
} as const;
export type OffloadError = (typeof OffloadError)[keyof typeof OffloadError];

/** What the transmitting driver negotiated: VIRTIO_NET_F_CSUM, HOST_TSO4, HOST_TSO6, HOST_ECN (§5.1.3). */
export const OffloadCap = { CSUM: 1, TSO4: 2, TSO6: 4, ECN: 8 } as const;

/** Largest frame accepted with offloads: a 64 KiB IP packet plus an Ethernet header and one VLAN tag. */
export const MAX_OFFLOAD_FRAME = MAX_TX_FRAME;

/**
 * Checks a transmitted frame's header against its length and what the driver negotiated (`allowed`: OffloadCap
 * bits), before any byte of the frame is trusted. Returns an OffloadError (OK = 0).
 *
 * - NEEDS_CSUM needs CSUM, and the 2-byte field at csum_start + csum_offset must lie inside the frame
 *   (§5.1.6.2.2: the device must not trust the driver beyond what it can check).
 * - gso_type without the ECN bit must be TCPV4 or TCPV6 with TSO4 / TSO6 negotiated; the ECN bit needs ECN
 *   (§5.1.6.2.1); gso_size must be > 0 and NEEDS_CSUM set (§5.1.6.2.1: a driver asking for segmentation also asks
 *   for the checksum; Linux's virtio_net_hdr_from_skb always does).
 * - hdr_len is not looked at: §5.1.6.2.2 lets the device use it only as a hint, and segmentTcp parses the headers.
 * - Flag bits other than NEEDS_CSUM are ignored (§5.1.6.2.2: the device must ignore flag bits it does not recognize;
 *   DATA_VALID has no meaning on transmit).
 */
export function validateOffload(h: VnetHeader, frameLen: number, allowed: number): number {
  if (frameLen > MAX_OFFLOAD_FRAME) return OffloadError.FRAME_TOO_LONG;
  const needsCsum = (h.flags & VNET_HDR_F_NEEDS_CSUM) !== 0;
  if (needsCsum) {
    if ((allowed & OffloadCap.CSUM) === 0) return OffloadError.CSUM_NOT_NEGOTIATED;
    if (h.csumStart + h.csumOffset + 2 > frameLen) return OffloadError.CSUM_OUT_OF_FRAME;
  }
  const gso = h.gsoType;
  if (gso === VNET_HDR_GSO_NONE) return OffloadError.OK;
  const base = gso & ~VNET_HDR_GSO_ECN;
  // An ECN bit with no type (0x80) is refused here too, as Linux's virtio_net_hdr_to_skb does.
  if (base === VNET_HDR_GSO_TCPV4) {
    if ((allowed & OffloadCap.TSO4) === 0) return OffloadError.GSO_NOT_NEGOTIATED;
  } else if (base === VNET_HDR_GSO_TCPV6) {
    if ((allowed & OffloadCap.TSO6) === 0) return OffloadError.GSO_NOT_NEGOTIATED;
  } else {
    return OffloadError.GSO_TYPE_UNKNOWN;
  }
  if ((gso & VNET_HDR_GSO_ECN) !== 0 && (allowed & OffloadCap.ECN) === 0) return OffloadError.ECN_NOT_NEGOTIATED;
  if (h.gsoSize === 0) return OffloadError.GSO_SIZE_ZERO;
  if (!needsCsum) return OffloadError.GSO_WITHOUT_CSUM;
  return OffloadError.OK;
}

// ---- DataView cache --------------------------------------------------------------------------------------------------

// Two DataViews, least recently used replaced: segmentTcp reads one buffer (guest memory) and writes another (the
// scratch), and a steady stream of frames keeps hitting the same two, so the hot path allocates nothing. The views
// hold their buffers alive until replaced; dropCachedViews() lets go (e.g. after a memory table change).
const EMPTY_VIEW: DataView = new DataView(new ArrayBuffer(0));
let cachedBuffer0: ArrayBufferLike | null = null;
let cachedView0: DataView = EMPTY_VIEW;
let cachedBuffer1: ArrayBufferLike | null = null;
let cachedView1: DataView = EMPTY_VIEW;
/** Which slot a miss replaces: the one not used last. */
let replaceSlot = 0;

function viewOf(b: Uint8Array): DataView {
  const ab = b.buffer;
  if (ab === cachedBuffer0) {
    replaceSlot = 1;
    return cachedView0;
  }
  if (ab === cachedBuffer1) {
    replaceSlot = 0;
    return cachedView1;
  }
  const v = new DataView(ab);
  if (replaceSlot === 0) {
    cachedBuffer0 = ab;
    cachedView0 = v;
    replaceSlot = 1;
  } else {
    cachedBuffer1 = ab;
    cachedView1 = v;
    replaceSlot = 0;
  }
  return v;
}

/** Forgets the cached DataViews (and so the references to their buffers, e.g. unmapped guest memory). */
export function dropCachedViews(): void {
  cachedBuffer0 = null;
  cachedView0 = EMPTY_VIEW;
  cachedBuffer1 = null;
  cachedView1 = EMPTY_VIEW;
  replaceSlot = 0;
}

// ---- RFC 1071 checksum -----------------------------------------------------------------------------------------------

/**
 * Folds a non-negative integer sum (< 2^53) of 16-bit words into 16 bits with end-around carry (RFC 1071 §1 and
 * §2(C), "deferred carries": the carries are added back in at the end): 2^16 ≡ 1 modulo 0xffff, so adding the high part to the low part keeps the ones-complement value. Returns 0 only
 * for 0, otherwise 1..0xffff. Doubles, not `>>>`, since the sum may exceed 32 bits.
 */
function fold16(s: number): number {
  while (s > 0xffff) s = (s % 0x10000) + Math.floor(s / 0x10000);
  return s;
}

/**
 * Sum of the big-endian 16-bit words of [pos, pos + length) of `v` (absolute positions), odd tail padded with a zero
 * byte (RFC 1071 §4.1, RFC 793 §3.1). Reads 32-bit words: a 32-bit word hi·2^16 + lo ≡ hi + lo (mod 0xffff), so
 * summing them and folding once at the end gives the same ones-complement sum (RFC 1071 §2(B) parallel summation,
 * §2(C) deferred carries). Two accumulators break the add dependency chain. The result is unfolded and exact while
 * below 2^53: callers pass at most SUM_CHUNK bytes (2^18 words < 2^32 each); sumRange cuts longer ranges.
 */
function sumView(v: DataView, pos: number, length: number): number {
  let s0 = 0;
  let s1 = 0;
  let i = pos;
  const end = pos + length;
  const end16 = end - 16;
  while (i <= end16) {
    s0 += v.getUint32(i) + v.getUint32(i + 4);
    s1 += v.getUint32(i + 8) + v.getUint32(i + 12);
    i += 16;
  }
  while (i + 4 <= end) {
    s0 += v.getUint32(i);
    i += 4;
  }
  if (i + 2 <= end) {
    s1 += v.getUint16(i);
    i += 2;
  }
  if (i < end) s0 += v.getUint8(i) << 8;
  return s0 + s1;
}

/**
 * Copies [src, src + length) of `sv` to `dv` at `dst` (absolute positions; different buffers or non-overlapping) and
 * returns the unfolded 16-bit word sum of the bytes copied, as sumView: one pass over the payload instead of a copy
 * and a checksum pass. Whatever a racing guest changes in the source, the sum is of the bytes written.
 */
function copySum(sv: DataView, src: number, dv: DataView, dst: number, length: number): number {
  let s0 = 0;
  let s1 = 0;
  let i = src;
  let d = dst;
  const end = src + length;
  const end16 = end - 16;
  while (i <= end16) {
    const a = sv.getUint32(i);
    const b = sv.getUint32(i + 4);
    const c = sv.getUint32(i + 8);
    const e = sv.getUint32(i + 12);
    dv.setUint32(d, a);
    dv.setUint32(d + 4, b);
    dv.setUint32(d + 8, c);
    dv.setUint32(d + 12, e);
    s0 += a + b;
    s1 += c + e;
    i += 16;
    d += 16;
  }
  while (i + 4 <= end) {
    const a = sv.getUint32(i);
    dv.setUint32(d, a);
    s0 += a;
    i += 4;
    d += 4;
  }
  if (i + 2 <= end) {
    const a = sv.getUint16(i);
    dv.setUint16(d, a);
    s1 += a;
    i += 2;
    d += 2;
  }
  if (i < end) {
    const a = sv.getUint8(i);
    dv.setUint8(d, a);
    s0 += a << 8;
  }
  return s0 + s1;
}

/** Bytes per sumView call in sumRange: 2^18 32-bit words of < 2^32 each stay far below 2^53. */
const SUM_CHUNK = 1 << 20;

/** sumView of a range of any length plus `seed`, folded to 16 bits (not complemented). */
function sumRange(v: DataView, pos: number, length: number, seed: number): number {
  let s = seed;
  while (length > SUM_CHUNK) {
    // An even chunk size keeps the word boundaries; folding between chunks keeps the double exact.
    s = fold16(s + sumView(v, pos, SUM_CHUNK));
    pos += SUM_CHUNK;
    length -= SUM_CHUNK;
  }
  return fold16(s + sumView(v, pos, length));
}

/**
 * RFC 1071 ones-complement sum of the 16-bit big-endian words of buf[offset, offset + length) (words counted from
 * `offset`, an odd length padded with a zero byte), added to `seed`. The result is folded to 16 bits with end-around
 * carry but NOT complemented: 0..0xffff, usable as the seed of a further call (e.g. pseudo-header, then L4 header,
 * then payload) and given to foldChecksum for the value to store. For RFC 1071's example bytes 00 01 f2 03 f4 f5 f6 f7
 * it returns 0xddf2. `seed`: a non-negative integer below 2^48 (a previous result, or a sum of a few 16-bit words).
 *
 * The range is the caller's choice, so a range outside `buf` is a programming error and throws RangeError (the
 * DataView spans the whole buffer and would otherwise read bytes outside the view).
 */
export function onesSum(buf: Uint8Array, offset: number, length: number, seed: number): number {
  if (offset < 0 || length < 0 || offset + length > buf.length) {
    throw new RangeError(`onesSum: [${offset}, ${offset + length}) is outside a ${buf.length}-byte array`);
  }
  return sumRange(viewOf(buf), buf.byteOffset + offset, length, seed);
}

/** Folds a sum (e.g. onesSum's result, or several added; < 2^53) to 16 bits and complements it: the checksum field. */
export function foldChecksum(sum: number): number {
  return ~fold16(sum) & 0xffff;
}

/**
 * Completes a NEEDS_CSUM frame in place (§5.1.6.2: the device computes the ones-complement checksum from csum_start
 * to the end of the frame and stores it at csum_start + csum_offset). The field holds the pseudo-header sum the
 * driver put there (Linux: CHECKSUM_PARTIAL, e.g. `th->check = ~tcp_v4_check(len, saddr, daddr, 0)`), so summing it
 * along with the L4 header and payload gives the full sum; its complement is stored big-endian. A result of 0 is
 * stored as 0xffff, as Linux's skb_checksum_help does (CSUM_MANGLED_0): for UDP, 0 means "no checksum" (RFC 768), and
 * for TCP and the rest the two are the same ones-complement zero (RFC 1071), so no protocol check is needed. Real
 * offsets are even (TCP 16, UDP 6); an odd one is handled the same way, as Linux does.
 *
 * `frameOffset`: index of the frame in `buf`. Returns OffloadError.OK, or CSUM_OUT_OF_FRAME / OUT_OF_BUFFER (nothing
 * written) if the field or the frame is not inside `buf`: validateOffload should have refused it already, but the
 * check is a few compares and the DataView would otherwise reach outside the view.
 */
export function completeChecksum(
  buf: Uint8Array,
  frameOffset: number,
  frameLen: number,
  csumStart: number,
  csumOffset: number,
): number {
  if (frameOffset < 0 || frameLen < 0 || frameOffset + frameLen > buf.length) return OffloadError.OUT_OF_BUFFER;
  if (csumStart < 0 || csumOffset < 0 || csumStart + csumOffset + 2 > frameLen) return OffloadError.CSUM_OUT_OF_FRAME;
  const v = viewOf(buf);
  const start = buf.byteOffset + frameOffset + csumStart;
  const c = foldChecksum(sumRange(v, start, frameLen - csumStart, 0));
  v.setUint16(start + csumOffset, c === 0 ? 0xffff : c);
  return OffloadError.OK;
}

// ---- frame parsing ---------------------------------------------------------------------------------------------------

/** Offsets of a frame's headers, from the frame's first byte (a reusable object). */
export interface FrameLayout {
  /** Offset of the IP header. */
  l3: number;
  ipVersion: 4 | 6 | 0;
  /** Offset of the TCP or UDP header. */
  l4: number;
  /** 6 TCP, 17 UDP. */
  l4Proto: number;
  /** Offset of the L4 payload: after the TCP header with its options, or after the 8-byte UDP header. */
  payload: number;
}

export function newFrameLayout(): FrameLayout {
  return { l3: 0, ipVersion: 0, l4: 0, l4Proto: 0, payload: 0 };
}

const ETH_HLEN = 14;
const VLAN_HLEN = 4;
const ETH_P_IP = 0x0800;
const ETH_P_IPV6 = 0x86dd;
const ETH_P_8021Q = 0x8100;
const ETH_P_8021AD = 0x88a8;
const IPPROTO_HOPOPTS = 0;
const IPPROTO_TCP = 6;
const IPPROTO_UDP = 17;
const IPPROTO_ROUTING = 43;
const IPPROTO_DSTOPTS = 60;
const IPV6_HLEN = 40;
const TCP_MIN_HLEN = 20;
const UDP_HLEN = 8;
/** Smallest L2+L3+L4 headers of a TCP frame: Ethernet, IPv4 without options, TCP without options. */
const MIN_TCP_HEADERS = ETH_HLEN + 20 + TCP_MIN_HLEN;

/** parseLayout results. */
const PARSE_FAILED = 0;
const PARSE_OK = 1;
/** Parsed, but an IPv6 Routing header has segments left (the pseudo-header destination is elsewhere). */
const PARSE_ROUTED = 2;

function failParse(out: FrameLayout): number {
  out.l3 = 0;
  out.ipVersion = 0;
  out.l4 = 0;
  out.l4Proto = 0;
  out.payload = 0;
  return PARSE_FAILED;
}

/**
 * parseFrame's work; `base` is the absolute position of the frame in `v`, already checked to lie inside the caller's
 * array together with frameLen. Every header is checked to end within frameLen before a byte of it is read.
 */
function parseLayout(v: DataView, base: number, frameLen: number, out: FrameLayout): number {
  if (frameLen < ETH_HLEN) return failParse(out);
  let p = ETH_HLEN;
  let type = v.getUint16(base + 12);
  // Up to two tags: 802.1Q, or 802.1ad (QinQ) outer + 802.1Q inner. The type after the 4-byte tag is the next one.
  for (let tags = 0; tags < 2 && (type === ETH_P_8021Q || type === ETH_P_8021AD); tags++) {
    if (p + VLAN_HLEN > frameLen) return failParse(out);
    type = v.getUint16(base + p + 2);
    p += VLAN_HLEN;
  }
  let proto: number;
  let result = PARSE_OK;
  const l3 = p;
  if (type === ETH_P_IP) {
    // RFC 791 §3.1: version 4, IHL in 32-bit words (≥ 5), flags+fragment offset at byte 6, protocol at byte 9.
    if (p + 20 > frameLen) return failParse(out);
    const vihl = v.getUint8(base + p);
    const ihl = (vihl & 0x0f) * 4;
    if (vihl >> 4 !== 4 || ihl < 20 || p + ihl > frameLen) return failParse(out);
    // A fragment (MF set or offset ≠ 0) has no complete L4 segment to checksum or cut.
    if ((v.getUint16(base + p + 6) & 0x3fff) !== 0) return failParse(out);
    proto = v.getUint8(base + p + 9);
    out.ipVersion = 4;
    p += ihl;
  } else if (type === ETH_P_IPV6) {
    // RFC 8200 §3: fixed 40-byte header, next header at byte 6; then extension headers (§4) until the upper layer.
    if (p + IPV6_HLEN > frameLen || v.getUint8(base + p) >> 4 !== 6) return failParse(out);
    proto = v.getUint8(base + p + 6);
    p += IPV6_HLEN;
    // Hop-by-Hop, Routing and Destination Options share the layout next header u8, length u8 in 8-octet units not
    // counting the first 8 (§4.3-4.6), so they can be skipped. A Fragment header (44) means a fragment: refused, as
    // are AH/ESP and anything else that is not TCP/UDP. Each step consumes ≥ 8 bytes, so the loop ends.
    while (proto === IPPROTO_HOPOPTS || proto === IPPROTO_ROUTING || proto === IPPROTO_DSTOPTS) {
      if (p + 8 > frameLen) return failParse(out);
      const extLen = (v.getUint8(base + p + 1) + 1) * 8;
      if (p + extLen > frameLen) return failParse(out);
      // Routing header: segments left at byte 3 (§4.4). If > 0, this hop's destination is not the final one.
      if (proto === IPPROTO_ROUTING && v.getUint8(base + p + 3) !== 0) result = PARSE_ROUTED;
      proto = v.getUint8(base + p);
      p += extLen;
    }
    out.ipVersion = 6;
  } else {
    return failParse(out);
  }
  const l4 = p;
  if (proto === IPPROTO_TCP) {
    // RFC 793 §3.1: data offset (header length in 32-bit words, ≥ 5) in the high nibble of byte 12.
    if (p + TCP_MIN_HLEN > frameLen) return failParse(out);
    const doff = (v.getUint8(base + p + 12) >> 4) * 4;
    if (doff < TCP_MIN_HLEN || p + doff > frameLen) return failParse(out);
    p += doff;
  } else if (proto === IPPROTO_UDP) {
    // RFC 768: 8-byte header.
    if (p + UDP_HLEN > frameLen) return failParse(out);
    p += UDP_HLEN;
  } else {
    return failParse(out);
  }
  out.l3 = l3;
  out.l4 = l4;
  out.l4Proto = proto;
  out.payload = p;
  return result;
}

/**
 * Parses the frame at buf[offset, offset + frameLen): Ethernet with up to two 802.1Q/802.1ad tags; IPv4 with options
 * (fragments refused) or IPv6 with Hop-by-Hop / Routing / Destination Options extension headers (a Fragment header
 * refused); then TCP (with options) or UDP. Returns false, with `out` zeroed, for anything else, for a header that
 * runs past frameLen, or for a range outside `buf`. IP length fields are not compared with frameLen (see the module
 * comment).
 */
export function parseFrame(buf: Uint8Array, offset: number, frameLen: number, out: FrameLayout): boolean {
  if (offset < 0 || frameLen < 0 || offset + frameLen > buf.length) {
    failParse(out);
    return false;
  }
  return parseLayout(viewOf(buf), buf.byteOffset + offset, frameLen, out) !== PARSE_FAILED;
}

// ---- TCP segmentation ------------------------------------------------------------------------------------------------

/**
 * Longest L2+L3+L4 headers segmentTcp takes: two VLAN tags (8), IPv4 with 40 bytes of options (60) and TCP with 40
 * (60) need 142 bytes; the rest leaves room for IPv6 extension headers. The bound keeps segmentScratchSize finite.
 */
export const MAX_GSO_HEADER_LEN = 256;

const TCP_FIN = 0x01;
const TCP_PSH = 0x08;
const TCP_CWR = 0x80;

/** Upper bound of the segments segmentTcp makes of a frame of frameLen bytes (headers at least 54 bytes). */
export function maxSegments(frameLen: number, gsoSize: number): number {
  if (gsoSize <= 0 || frameLen <= MIN_TCP_HEADERS) return 0;
  return Math.ceil((frameLen - MIN_TCP_HEADERS) / gsoSize);
}

/**
 * Bytes of `out` segmentTcp may need for a frame of frameLen bytes: every segment repeats the headers (H bytes), so
 * the total is frameLen + (n - 1)·H for n segments; n is largest with the shortest headers and H at most
 * MAX_GSO_HEADER_LEN, which bounds both factors.
 */
export function segmentScratchSize(frameLen: number, gsoSize: number): number {
  const n = maxSegments(frameLen, gsoSize);
  if (n === 0) return 0;
  return frameLen + (n - 1) * Math.min(MAX_GSO_HEADER_LEN, frameLen);
}

/** The layout segmentTcp parses into: module scratch, so a call allocates nothing. */
const gsoLayout = newFrameLayout();

/**
 * TCP segmentation offload in software (GSO TCPV4 / TCPV6, §5.1.6.2), the way Linux's tcp_gso_segment and
 * inet_gso_segment / ipv6_gso_segment cut a super-frame. The frame at buf[offset, offset + frameLen) with its header
 * `h` (validated) is cut into segments written back to back into `out` from index 0; segment i starts at
 * segOffsets[i] and is segLengths[i] bytes. Each segment is the frame's L2+L3+L4 headers (options included) followed
 * by the next ≤ gso_size payload bytes, with:
 * - IPv4: total length, identification id + i (mod 2^16), header checksum recomputed (RFC 791 §3.1);
 * - IPv6: payload length (RFC 8200 §3), extension headers copied as they are;
 * - TCP: sequence number seq + i·gso_size (mod 2^32); FIN and PSH only on the last segment, CWR only on the first
 *   (RFC 3168 §6.1.2: CWR is sent once per window reduction); the checksum computed in full over pseudo-header
 *   (RFC 793 §3.1, RFC 8200 §8.1), TCP header and payload; the input's partial value is not trusted.
 * The payload comes from the bytes up to frameLen (IP length fields of the super-frame are not trusted either). All
 * header fields of later segments are rewritten from values read once, and every checksum is of the bytes written to
 * `out`, so a guest changing the frame meanwhile cannot make the output inconsistent.
 *
 * `out` must not overlap the frame; size it with segmentScratchSize(frameLen, h.gsoSize), and segOffsets/segLengths
 * with maxSegments(frameLen, h.gsoSize). Returns the segment count (≥ 1), or a negative OffloadError: -GSO_NOT_PARSABLE,
 * -GSO_NOT_TCP, -GSO_IP_VERSION, -GSO_NO_PAYLOAD, -GSO_TYPE_UNKNOWN, -GSO_SIZE_ZERO, -GSO_HEADERS_TOO_LONG,
 * -GSO_IPV6_ROUTING, -FRAME_TOO_LONG, -SCRATCH_TOO_SMALL, -OUT_OF_BUFFER.
 */
export function segmentTcp(
  buf: Uint8Array,
  offset: number,
  frameLen: number,
  h: VnetHeader,
  out: Uint8Array,
  segOffsets: Uint32Array,
  segLengths: Uint32Array,
): number {
  if (offset < 0 || frameLen < 0 || offset + frameLen > buf.length) return -OffloadError.OUT_OF_BUFFER;
  const gso = h.gsoType & ~VNET_HDR_GSO_ECN;
  let wantVersion: number;
  if (gso === VNET_HDR_GSO_TCPV4) wantVersion = 4;
  else if (gso === VNET_HDR_GSO_TCPV6) wantVersion = 6;
  else return -OffloadError.GSO_TYPE_UNKNOWN;
  const mss = h.gsoSize;
  if (mss <= 0) return -OffloadError.GSO_SIZE_ZERO;

  const sv = viewOf(buf);
  const src = buf.byteOffset + offset;
  const L = gsoLayout;
  const parsed = parseLayout(sv, src, frameLen, L);
  if (parsed === PARSE_FAILED) return -OffloadError.GSO_NOT_PARSABLE;
  if (L.l4Proto !== IPPROTO_TCP) return -OffloadError.GSO_NOT_TCP;
  if (L.ipVersion !== wantVersion) return -OffloadError.GSO_IP_VERSION;
  if (parsed === PARSE_ROUTED) return -OffloadError.GSO_IPV6_ROUTING;
  const l3 = L.l3;
  const l4 = L.l4;
  const hdrs = L.payload;
  if (hdrs > MAX_GSO_HEADER_LEN) return -OffloadError.GSO_HEADERS_TOO_LONG;
  const payloadLen = frameLen - hdrs;
  if (payloadLen <= 0) return -OffloadError.GSO_NO_PAYLOAD;
  const v4 = wantVersion === 4;
  // The largest segment is the first: its IP length field must fit 16 bits (an IPv6 jumbogram is not made here).
  const firstPayload = payloadLen < mss ? payloadLen : mss;
  if ((v4 ? hdrs - l3 : hdrs - l3 - IPV6_HLEN) + firstPayload > 0xffff) return -OffloadError.FRAME_TOO_LONG;
  const n = Math.ceil(payloadLen / mss);
  if (n > segOffsets.length || n > segLengths.length || n * hdrs + payloadLen > out.length) {
    return -OffloadError.SCRATCH_TOO_SMALL;
  }

  const dv = viewOf(out);
  const ob = out.byteOffset;
  // Segment 0's headers are copied from the frame once; later segments copy them from segment 0 (out is ours), so all
  // segments carry the same headers whatever the guest does meanwhile. The fields rewritten per segment are read
  // here, from that copy.
  for (let k = 0; k < hdrs; k++) out[k] = buf[offset + k] as number;
  const ipId = v4 ? dv.getUint16(ob + l3 + 4) : 0;
  const seq0 = dv.getUint32(ob + l4 + 4);
  const flags0 = out[l4 + 13] as number;
  // Lengths from the parse, not from the copy: l4 - l3 is the IPv4 IHL in bytes.
  const ihl = l4 - l3;
  const tcpHdrLen = hdrs - l4;
  // Pseudo-header without the length: source and destination addresses and the protocol (RFC 793 §3.1 for IPv4:
  // src, dst, zero, PTCL, TCP length; RFC 8200 §8.1 for IPv6: src, dst, upper-layer length u32, zero, next header).
  // The length is added per segment. Addresses are at 12..20 (IPv4) or 8..40 (IPv6) of the IP header.
  const addrSum = v4 ? sumView(dv, ob + l3 + 12, 8) : sumView(dv, ob + l3 + 8, 32);
  const pseudoBase = addrSum + IPPROTO_TCP;

  let o = 0;
  let payloadPos = src + hdrs;
  for (let i = 0; i < n; i++) {
    const segPayload = i < n - 1 ? mss : payloadLen - i * mss;
    if (i > 0) out.copyWithin(o, 0, hdrs);
    const at = ob + o;
    // Payload first: copied and summed in one pass.
    const paySum = copySum(sv, payloadPos, dv, at + hdrs, segPayload);
    payloadPos += segPayload;
    if (v4) {
      dv.setUint16(at + l3 + 2, hdrs - l3 + segPayload); // total length: IP header + TCP header + payload
      dv.setUint16(at + l3 + 4, (ipId + i) & 0xffff);
      dv.setUint16(at + l3 + 10, 0);
      dv.setUint16(at + l3 + 10, foldChecksum(sumView(dv, at + l3, ihl)));
    } else {
      dv.setUint16(at + l3 + 4, hdrs - l3 - IPV6_HLEN + segPayload); // payload length: extension headers + TCP
    }
    dv.setUint32(at + l4 + 4, (seq0 + i * mss) >>> 0);
    let flags = flags0;
    if (i < n - 1) flags &= ~(TCP_FIN | TCP_PSH);
    if (i > 0) flags &= ~TCP_CWR;
    dv.setUint8(at + l4 + 13, flags);
    dv.setUint16(at + l4 + 16, 0);
    // TCP header length is a multiple of 4, so the payload's words continue the header's word alignment.
    const sum = pseudoBase + tcpHdrLen + segPayload + sumView(dv, at + l4, tcpHdrLen) + paySum;
    dv.setUint16(at + l4 + 16, foldChecksum(sum));
    segOffsets[i] = o;
    segLengths[i] = hdrs + segPayload;
    o += hdrs + segPayload;
  }
  return n;
}

/**
 * Reference TCP/IP frames for offload tests, written the slow and obvious way (independent of
 * src/devices/net/offload.ts): an Ethernet + IPv4 or IPv6 + TCP frame whose TCP checksum field holds either the full
 * checksum or, as Linux leaves it for a partial checksum (CHECKSUM_PARTIAL, VIRTIO_NET_HDR_F_NEEDS_CSUM), the
 * folded pseudo-header sum; and a checker that says whether a frame's checksums verify.
 */

export interface TcpFrameOptions {
  readonly ipv6?: boolean;
  /** TCP payload bytes: byte i is (seed + i * 13) & 0xff. */
  readonly payload: number;
  readonly seed?: number;
  /** The TCP checksum field: 'partial' (pseudo-header sum, as for NEEDS_CSUM) or 'full' (default). */
  readonly checksum?: 'partial' | 'full';
  readonly seq?: number;
  /** TCP flags (default ACK | PSH). */
  readonly tcpFlags?: number;
  readonly src?: readonly number[];
  readonly dst?: readonly number[];
}

export const ETH_LEN = 14;
export const TCP_LEN = 20;
export const TCP_CSUM_OFFSET = 16;

function sum16(bytes: Uint8Array, from: number, to: number): number {
  let s = 0;
  for (let i = from; i < to; i += 2) s += ((bytes[i] as number) << 8) | (i + 1 < to ? (bytes[i + 1] as number) : 0);
  return s;
}

function fold(s: number): number {
  while (s > 0xffff) s = (s & 0xffff) + Math.floor(s / 0x10000);
  return s;
}

/** The IP header's length for this frame. */
export function ipHeaderLength(ipv6: boolean): number {
  return ipv6 ? 40 : 20;
}

/** The pseudo-header sum (not folded) of the frame's IP header, for an L4 length. */
function pseudoSum(f: Uint8Array, l3: number, ipv6: boolean, l4Len: number): number {
  return ipv6
    ? sum16(f, l3 + 8, l3 + 40) + 6 + l4Len
    : sum16(f, l3 + 12, l3 + 20) + 6 + l4Len;
}

export function tcpFrame(o: TcpFrameOptions): Uint8Array {
  const ipv6 = o.ipv6 ?? false;
  const l3 = ETH_LEN;
  const l4 = l3 + ipHeaderLength(ipv6);
  const f = new Uint8Array(l4 + TCP_LEN + o.payload);
  f.set(o.dst ?? [0x52, 0x54, 0, 0, 0, 0x0b], 0);
  f.set(o.src ?? [0x52, 0x54, 0, 0, 0, 0x0a], 6);
  const dv = new DataView(f.buffer);
  dv.setUint16(12, ipv6 ? 0x86dd : 0x0800);
  if (ipv6) {
    dv.setUint32(l3, 0x6000_0000);
    dv.setUint16(l3 + 4, TCP_LEN + o.payload);
    f[l3 + 6] = 6;
    f[l3 + 7] = 64;
    f.set([0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1], l3 + 8);
    f.set([0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2], l3 + 24);
  } else {
    f[l3] = 0x45;
    dv.setUint16(l3 + 2, f.length - l3);
    dv.setUint16(l3 + 4, 0x1234); // id
    dv.setUint16(l3 + 6, 0x4000); // DF
    f[l3 + 8] = 64;
    f[l3 + 9] = 6;
    f.set([10, 0, 0, 1], l3 + 12);
    f.set([10, 0, 0, 2], l3 + 16);
    dv.setUint16(l3 + 10, ~fold(sum16(f, l3, l3 + 20)) & 0xffff);
  }
  dv.setUint16(l4, 40000);
  dv.setUint16(l4 + 2, 5001);
  dv.setUint32(l4 + 4, o.seq ?? 1000);
  dv.setUint32(l4 + 8, 1);
  f[l4 + 12] = (TCP_LEN / 4) << 4;
  f[l4 + 13] = o.tcpFlags ?? 0x18;
  dv.setUint16(l4 + 14, 65535);
  for (let i = 0; i < o.payload; i++) f[l4 + TCP_LEN + i] = ((o.seed ?? 0) + i * 13) & 0xff;
  const pseudo = pseudoSum(f, l3, ipv6, TCP_LEN + o.payload);
  const field = o.checksum === 'partial' ? fold(pseudo) : ~fold(pseudo + sum16(f, l4, f.length)) & 0xffff;
  dv.setUint16(l4 + TCP_CSUM_OFFSET, field);
  return f;
}

/** Whether the IPv4 header checksum (if any) and the TCP checksum of a frame made like `tcpFrame` verify. */
export function checksumsVerify(f: Uint8Array, ipv6 = false): boolean {
  const l3 = ETH_LEN;
  const l4 = l3 + ipHeaderLength(ipv6);
  if (!ipv6 && fold(sum16(f, l3, l4)) !== 0xffff) return false;
  return fold(pseudoSum(f, l3, ipv6, f.length - l4) + sum16(f, l4, f.length)) === 0xffff;
}

/** The TCP payload of a frame made like `tcpFrame`. */
export function tcpPayload(f: Uint8Array, ipv6 = false): Uint8Array {
  return f.subarray(ETH_LEN + ipHeaderLength(ipv6) + TCP_LEN);
}

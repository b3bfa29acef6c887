/**
 * The virtio-vsock packet header (VIRTIO 1.2 §5.10.6, layout in constants.ts): 44 bytes, little endian.
 *
 * CIDs are numbers. A CID is a u64 on the wire whose upper 32 bits are reserved and zero; one that has them set reads
 * as a number above 0xffffffff (not exact past 2^53, which does not matter: any CID above 0xffffffff is invalid and is
 * only compared to be rejected).
 */
import { VsockHdr } from './constants.js';

export interface VsockHeader {
  srcCid: number;
  dstCid: number;
  srcPort: number;
  dstPort: number;
  /** Payload bytes after the header. */
  len: number;
  type: number;
  op: number;
  flags: number;
  bufAlloc: number;
  fwdCnt: number;
}

const TWO_32 = 2 ** 32;

function view(bytes: Uint8Array): DataView {
  return new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
}

/** Reads a u64 CID: exact up to 2^53, above 0xffffffff whenever the upper half is not zero. */
export function readCid(dv: DataView, at: number): number {
  return dv.getUint32(at + 4, true) * TWO_32 + dv.getUint32(at, true);
}

/** The header at `offset` of `bytes` (which must hold 44 bytes from there: RangeError otherwise). */
export function readHeader(bytes: Uint8Array, offset = 0): VsockHeader {
  if (offset < 0 || bytes.length - offset < VsockHdr.size) {
    throw new RangeError(`vsock header: ${VsockHdr.size} bytes needed at offset ${offset}, ${bytes.length} in the buffer`);
  }
  const dv = view(bytes);
  return {
    srcCid: readCid(dv, offset + VsockHdr.srcCid),
    dstCid: readCid(dv, offset + VsockHdr.dstCid),
    srcPort: dv.getUint32(offset + VsockHdr.srcPort, true),
    dstPort: dv.getUint32(offset + VsockHdr.dstPort, true),
    len: dv.getUint32(offset + VsockHdr.len, true),
    type: dv.getUint16(offset + VsockHdr.type, true),
    op: dv.getUint16(offset + VsockHdr.op, true),
    flags: dv.getUint32(offset + VsockHdr.flags, true),
    bufAlloc: dv.getUint32(offset + VsockHdr.bufAlloc, true),
    fwdCnt: dv.getUint32(offset + VsockHdr.fwdCnt, true),
  };
}

/** Writes `h` as 44 bytes at `offset` of `bytes`. CIDs are integers in [0, 2^53); the 32-bit fields wrap (>>> 0). */
export function writeHeader(bytes: Uint8Array, offset: number, h: VsockHeader): void {
  if (offset < 0 || bytes.length - offset < VsockHdr.size) {
    throw new RangeError(`vsock header: ${VsockHdr.size} bytes needed at offset ${offset}, ${bytes.length} in the buffer`);
  }
  const dv = view(bytes);
  writeCid(dv, offset + VsockHdr.srcCid, h.srcCid);
  writeCid(dv, offset + VsockHdr.dstCid, h.dstCid);
  dv.setUint32(offset + VsockHdr.srcPort, h.srcPort >>> 0, true);
  dv.setUint32(offset + VsockHdr.dstPort, h.dstPort >>> 0, true);
  dv.setUint32(offset + VsockHdr.len, h.len >>> 0, true);
  dv.setUint16(offset + VsockHdr.type, h.type & 0xffff, true);
  dv.setUint16(offset + VsockHdr.op, h.op & 0xffff, true);
  dv.setUint32(offset + VsockHdr.flags, h.flags >>> 0, true);
  dv.setUint32(offset + VsockHdr.bufAlloc, h.bufAlloc >>> 0, true);
  dv.setUint32(offset + VsockHdr.fwdCnt, h.fwdCnt >>> 0, true);
}

function writeCid(dv: DataView, at: number, cid: number): void {
  if (!Number.isSafeInteger(cid) || cid < 0) throw new RangeError(`vsock header: CID ${cid} is not a u64 this codec writes`);
  dv.setUint32(at, cid % TWO_32, true);
  dv.setUint32(at + 4, Math.floor(cid / TWO_32), true);
}

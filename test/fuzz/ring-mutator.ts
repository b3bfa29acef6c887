/**
 * Worker thread for race.test.ts and packed-race.test.ts: a driver that keeps rewriting descriptors, indirect table
 * entries, avail ring entries (split) or event suppression areas (packed) and request headers while the device reads
 * them (a TOCTOU / double-fetch attack, DPDK CVE-2020-14375). Each write is a whole 16-byte descriptor from a set of
 * templates chosen so that mixing fields of two of them (what a device that fetches a field twice would see) breaks a
 * bound, or a single field (len, flags, next or id, addr). Packed descriptors (`{ addr, len, id, flags }`) get
 * AVAIL / USED bits of either wrap counter in their flags and ids in and out of range.
 * Runs until `control[0]` becomes nonzero; then stores its write count in `control[1]` and exits.
 */
import { workerData } from 'node:worker_threads';

export interface MutatorInit {
  /** Areas to scribble on: a region's buffer, the byte offset of the area in it, its length (multiple of 16). */
  readonly descAreas: readonly { buffer: SharedArrayBuffer; offset: number; length: number }[];
  /** Split rings: the avail ring entries (buffer, offset of ring[0], queue size). */
  readonly availRing?: { buffer: SharedArrayBuffer; offset: number; size: number };
  /**
   * Packed rings (instead of `availRing`): `descAreas` are rings of packed descriptors (ids mostly below `idRange`);
   * `tableArea` an indirect table whose entries toggle between valid and invalid by one field (the table entries that
   * a device fetching a field twice would let through); the event suppression areas (4 bytes each) to scribble on.
   */
  readonly packed?: {
    idRange: number;
    tableArea: { buffer: SharedArrayBuffer; offset: number; length: number };
    eventAreas: readonly { buffer: SharedArrayBuffer; offset: number }[];
  };
  /** Header slots (16 bytes each) to overwrite with random request headers. */
  readonly headers: { buffer: SharedArrayBuffer; offset: number; count: number };
  /** Guest addresses of indirect tables and buffers to use in the templates. */
  readonly tableAddr: number;
  readonly bufferAddr: number;
  readonly control: SharedArrayBuffer;
  readonly seed: number;
}

const init = workerData as MutatorInit;
const control = new Int32Array(init.control);
let x = init.seed >>> 0 || 1;
function rnd(n: number): number {
  x ^= x << 13;
  x ^= x >>> 17;
  x ^= x << 5;
  return (x >>> 0) % n;
}

const TOP = 2 ** 53;
/** [addr, len, flags, next]: valid ones and, beside each, the same with one field pushed over a bound. */
const templates: [number | bigint, number, number, number][] = [
  [init.bufferAddr, 16, 1, 1],
  [init.bufferAddr, 0xffff_ffff, 1, 1], // with another 0xffffffff: over 2^32 - 1 bytes
  [TOP - 16, 16, 2, 0], // ends exactly at 2^53
  [TOP - 16, 0xffff_ffff, 2, 0], // ends past 2^53: invalid
  [2n ** 64n - 16n, 16, 0, 0], // above 2^53: invalid
  [init.tableAddr, 64, 4, 0], // indirect, 4 entries
  [init.tableAddr, 16 * 65536, 4, 0], // indirect, 65536 entries (runs into a hole)
  [init.tableAddr, 65, 4, 0], // indirect, bad length
  [init.bufferAddr, 1, 3, 0], // writable, next 0 -> loop back to 0 with NEXT
  [init.bufferAddr, 1, 7, 2], // indirect + next + write: invalid
  [init.bufferAddr, 512, 3, 0xffff], // next out of range
];

function writeDesc(v: DataView, off: number): void {
  const t = templates[rnd(templates.length)] as [number | bigint, number, number, number];
  switch (rnd(6)) {
    case 0: // only the length
      v.setUint32(off + 8, t[1], true);
      return;
    case 1: // only flags and next
      v.setUint16(off + 12, t[2], true);
      v.setUint16(off + 14, rnd(4) === 0 ? rnd(0x10000) : rnd(8), true);
      return;
    case 2: // only the address
      v.setBigUint64(off, BigInt(t[0]), true);
      return;
    default:
      v.setBigUint64(off, BigInt(t[0]), true);
      v.setUint32(off + 8, t[1], true);
      v.setUint16(off + 12, t[2], true);
      v.setUint16(off + 14, t[3] === 1 ? rnd(8) : t[3], true);
  }
}

const AVAIL = 1 << 7;
const USED = 1 << 15;
/** Packed: [addr, len, flags without AVAIL / USED]; the same idea as `templates`. */
const packedTemplates: [number | bigint, number, number][] = [
  [init.bufferAddr, 16, 1],
  [init.bufferAddr, 0xffff_ffff, 1], // with another 0xffffffff: over 2^32 - 1 bytes
  [init.bufferAddr, 512, 3],
  [TOP - 16, 16, 2], // ends exactly at 2^53
  [TOP - 16, 0xffff_ffff, 2], // ends past 2^53: invalid
  [2n ** 64n - 16n, 16, 0], // above 2^53: invalid
  [init.tableAddr, 64, 4], // indirect, 4 entries
  [init.tableAddr, 16 * 1024, 4], // indirect, 1024 entries (the most a small queue takes)
  [init.tableAddr, 16 * 65536, 4], // indirect, 65536 entries: over the chain budget
  [init.tableAddr, 65, 4], // indirect, bad length
  [init.bufferAddr, 1, 7], // indirect + next + write: invalid
];
/**
 * Packed indirect table entries: [addr, len, flags], mostly at 2^53 - 16 so that the length alone decides whether an
 * entry is valid (a length fetched twice lets a buffer past 2^53 through).
 */
const tableTemplates: [number | bigint, number, number][] = [
  [TOP - 16, 16, 0], // ends exactly at 2^53
  [TOP - 16, 0, 0],
  [TOP - 16, 17, 0], // ends past 2^53: invalid
  [TOP - 16, 0xffff_ffff, 0], // ends past 2^53: invalid
  [init.bufferAddr, 0xffff_ffff, 0], // valid alone, over 2^32 - 1 bytes with another one
  [2n ** 64n - 16n, 16, 0], // above 2^53: invalid
  [init.bufferAddr, 1, 2], // writable
  [init.bufferAddr, 16, 4], // a nested table: invalid
];

/** AVAIL / USED bits: available in wrap 1, available in wrap 0, used (either), neither. */
const wrapBits = [AVAIL, USED, AVAIL, USED, AVAIL | USED, 0];

function packedId(idRange: number): number {
  return rnd(16) === 0 ? ([0xffff, idRange, 0x8000, rnd(0x10000)][rnd(4)] as number) : rnd(idRange);
}

function writePackedDesc(v: DataView, off: number, idRange: number): void {
  const t = packedTemplates[rnd(packedTemplates.length)] as [number | bigint, number, number];
  switch (rnd(7)) {
    case 0: // only the length
      v.setUint32(off + 8, t[1], true);
      return;
    case 1: // only the flags
      v.setUint16(off + 14, t[2] | (wrapBits[rnd(wrapBits.length)] as number), true);
      return;
    case 2: // only the address
      v.setBigUint64(off, BigInt(t[0]), true);
      return;
    case 3: // only the id
      v.setUint16(off + 12, packedId(idRange), true);
      return;
    default:
      v.setBigUint64(off, BigInt(t[0]), true);
      v.setUint32(off + 8, t[1], true);
      v.setUint16(off + 12, packedId(idRange), true);
      v.setUint16(off + 14, t[2] | (wrapBits[rnd(wrapBits.length)] as number), true);
  }
}

function writeTableEntry(v: DataView, off: number): void {
  const t = tableTemplates[rnd(tableTemplates.length)] as [number | bigint, number, number];
  switch (rnd(8)) {
    case 0:
    case 1:
    case 2:
    case 3: // only the length
      v.setUint32(off + 8, t[1], true);
      return;
    case 4: // only the address
      v.setBigUint64(off, BigInt(t[0]), true);
      return;
    case 5: // only the flags (NEXT and the id are reserved in a table)
      v.setUint16(off + 14, t[2] | (rnd(2) === 0 ? 1 : 0), true);
      return;
    default:
      v.setBigUint64(off, BigInt(t[0]), true);
      v.setUint32(off + 8, t[1], true);
      v.setUint16(off + 12, rnd(0x10000), true);
      v.setUint16(off + 14, t[2], true);
  }
}

const areas = init.descAreas.map((a) => ({ view: new DataView(a.buffer, a.offset, a.length), entries: a.length / 16 }));
const headers = new DataView(init.headers.buffer, init.headers.offset, 16 * init.headers.count);

function writeHeader(): void {
  const h = 16 * rnd(init.headers.count);
  headers.setUint32(h, [0, 1, 4, 8, 11, 13, rnd(0x10000)][rnd(7)] as number, true);
  headers.setUint32(h + 8, rnd(4) === 0 ? rnd(0x1_0000_0000) : rnd(4096), true);
}

let writes = 0;
if (init.packed === undefined) {
  const ring = init.availRing;
  if (ring === undefined) throw new Error('ring-mutator: a split ring needs availRing');
  const avail = new DataView(ring.buffer, ring.offset, 2 * ring.size);
  while (Atomics.load(control, 0) === 0) {
    for (let i = 0; i < 64; i++) {
      const what = rnd(10);
      if (what < 6) {
        const a = areas[rnd(areas.length)] as { view: DataView; entries: number };
        writeDesc(a.view, 16 * rnd(a.entries));
      } else if (what < 8) {
        avail.setUint16(2 * rnd(ring.size), rnd(16) === 0 ? rnd(0x10000) : rnd(ring.size), true);
      } else {
        writeHeader();
      }
      writes++;
    }
  }
} else {
  const { idRange, tableArea } = init.packed;
  const table = new DataView(tableArea.buffer, tableArea.offset, tableArea.length);
  const tableEntries = tableArea.length / 16;
  const events = init.packed.eventAreas.map((e) => new DataView(e.buffer, e.offset, 4));
  while (Atomics.load(control, 0) === 0) {
    for (let i = 0; i < 64; i++) {
      const what = rnd(10);
      if (what < 4) {
        const a = areas[rnd(areas.length)] as { view: DataView; entries: number };
        writePackedDesc(a.view, 16 * rnd(a.entries), idRange);
      } else if (what < 7) {
        writeTableEntry(table, 16 * rnd(tableEntries));
      } else if (what < 8 && events.length > 0) {
        const e = events[rnd(events.length)] as DataView;
        e.setUint16(0, rnd(0x10000), true); // off_wrap
        e.setUint16(2, rnd(4), true); // flags: ENABLE, DISABLE, DESC, reserved
      } else {
        writeHeader();
      }
      writes++;
    }
  }
}
Atomics.store(control, 1, Math.min(writes, 0x7fff_ffff));

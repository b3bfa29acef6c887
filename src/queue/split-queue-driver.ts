/**
 * The driver side of a split virtqueue (VIRTIO 1.2 §2.7), modelled on Linux `drivers/virtio/virtio_ring.c`: used by
 * our TypeScript frontend and by tests (the counterpart of rust-vmm's `MockSplitQueue`).
 *
 * The driver owns the descriptor table and the available ring and keeps its own bookkeeping (free list, chain
 * links, tokens) in JS memory: freeing a chain never follows links read back from guest memory, and every used
 * element the device returns is validated (`VIRTIO_USED_INDEX_INVALID`, `VIRTIO_USED_ID_INVALID`) since the device may
 * be another process.
 *
 * Raw accessors (`writeDescriptor`, `pushAvailRaw`, `setAvailIdx`, ...) bypass the bookkeeping so tests can build
 * malformed rings; do not mix them with `addChain` / `pollUsed` on the same descriptors.
 */
import { VirtioError } from '../errors.js';
import type { GuestMemory } from '../memory/guest-memory.js';
import {
  AVAIL_ALIGN,
  DESC_ALIGN,
  DESC_SIZE,
  USED_ALIGN,
  USED_ELEM_SIZE,
  VRING_AVAIL_F_NO_INTERRUPT,
  VRING_DESC_F_INDIRECT,
  VRING_DESC_F_NEXT,
  VRING_DESC_F_WRITE,
  VRING_USED_F_NO_NOTIFY,
  availRingSize,
  descTableSize,
  usedRingSize,
  vringNeedEvent,
} from './constants.js';
import { copyFromGuest, copyToGuest } from './descriptor-chain.js';
import { ADDRESS_LIMIT, le16, resolveRing } from './ring-access.js';
import type { QueueDriver } from './queue-driver.js';
import { isValidQueueSize } from './split-queue.js';

/** Where the three ring areas of a queue go (see `SplitQueueDriver.layout`). */
export interface RingLayout {
  readonly descAddr: number;
  readonly availAddr: number;
  readonly usedAddr: number;
  /** First byte after the used ring. */
  readonly end: number;
}

/** One buffer of a chain, as the driver offers it. */
export interface Segment {
  readonly addr: number;
  readonly len: number;
  /** Device write-only (VRING_DESC_F_WRITE); otherwise device read-only. */
  readonly writable: boolean;
}

/** A descriptor as stored in guest memory. Raw writes accept any 64-bit address (`bigint` for values >= 2^53). */
export interface RawDescriptor {
  readonly addr: number | bigint;
  readonly len: number;
  readonly flags: number;
  readonly next: number;
}

/** A descriptor read back from guest memory. */
export interface DescriptorValue {
  readonly addr: bigint;
  readonly len: number;
  readonly flags: number;
  readonly next: number;
}

/** Options of `SplitQueueDriver`. */
export interface SplitQueueDriverConfig {
  readonly size: number;
  readonly descAddr: number;
  readonly availAddr: number;
  readonly usedAddr: number;
  /** VIRTIO_F_EVENT_IDX negotiated (default false). */
  readonly eventIdx?: boolean;
}

/** Options of `addChain`. */
export interface AddChainOptions {
  /**
   * Put the segments in an indirect table at this guest address (at least `16 * segments.length` bytes, owned by the
   * caller until the chain completes) and use a single ring descriptor. Requires VIRTIO_F_INDIRECT_DESC.
   */
  readonly indirectAddr?: number;
}

function alignUp(x: number, a: number): number {
  return Math.ceil(x / a) * a;
}

function checkIndex(i: number, limit: number, what: string): void {
  if (!Number.isInteger(i) || i < 0 || i >= limit) throw new RangeError(`${what} ${i} is out of range 0..${limit - 1}`);
}

/** The driver side of a split virtqueue. `T` is the type of the per-chain token handed back by `pollUsed`. */
export class SplitQueueDriver<T = unknown> implements QueueDriver<T> {
  /**
   * Ring layout for a queue of `size` entries starting at `base` (rounded up to 16): the descriptor table, then the
   * available ring, then the used ring aligned to 4 (or to 4096 with `legacy`, the pre-1.0 `vring_size` layout).
   */
  static layout(size: number, base: number, options: { readonly legacy?: boolean } = {}): RingLayout {
    const descAddr = alignUp(base, DESC_ALIGN);
    const availAddr = descAddr + descTableSize(size);
    const usedAddr = alignUp(availAddr + availRingSize(size), options.legacy === true ? 4096 : USED_ALIGN);
    return { descAddr, availAddr, usedAddr, end: usedAddr + usedRingSize(size) };
  }

  /** Writes one descriptor at any guest address (e.g. an entry of an indirect table), across regions if needed. */
  static writeDescriptorAt(mem: GuestMemory, gpa: number, desc: RawDescriptor): void {
    const b = new Uint8Array(DESC_SIZE);
    encodeDescriptor(new DataView(b.buffer), 0, desc);
    copyToGuest(mem, gpa, b, 0, DESC_SIZE);
  }

  /** Reads one descriptor at any guest address. */
  static readDescriptorAt(mem: GuestMemory, gpa: number): DescriptorValue {
    const b = new Uint8Array(DESC_SIZE);
    copyFromGuest(mem, gpa, b, 0, DESC_SIZE);
    return decodeDescriptor(new DataView(b.buffer), 0);
  }

  readonly size: number;
  readonly eventIdx: boolean;
  readonly mem: GuestMemory;

  readonly #mask: number;
  readonly #desc: DataView;
  readonly #descBase: number;
  readonly #availU16: Uint16Array;
  readonly #avail: DataView;
  readonly #availBase: number;
  readonly #usedU16: Uint16Array;
  readonly #used: DataView;
  readonly #usedBase: number;

  /** Stack of free descriptor indices: `#free[0 .. #freeTop)`. */
  readonly #free: Uint16Array;
  #freeTop: number;
  /** For a descriptor in a direct chain, the next descriptor of that chain (JS copy of the links). */
  readonly #link: Uint16Array;
  /** For a head in flight, the number of ring descriptors of its chain (0 = not in flight). */
  readonly #chainDescs: Uint32Array;
  readonly #tokens: (T | undefined)[];
  #inFlight = 0;
  /** Next avail index to fill (ahead of avail.idx until `publish`). */
  #availIdx = 0;
  /** Value last stored to avail.idx. */
  #publishedAvailIdx = 0;
  /** avail.idx at the last `kickNeeded` (Linux computes it as `avail_idx_shadow - num_added`). */
  #kickedAvailIdx = 0;
  /** Next used index to consume (Linux `last_used_idx`). */
  #lastUsedIdx = 0;
  /** The value this driver last stored in avail.flags. */
  #availFlags = 0;
  readonly #scratch = new Uint8Array(DESC_SIZE);
  readonly #scratchView = new DataView(this.#scratch.buffer);

  /** Resolves the rings (each inside one region, else `VIRTIO_RING_UNMAPPED`) and zeroes them (§2.7: fresh rings). */
  constructor(mem: GuestMemory, config: SplitQueueDriverConfig) {
    const { size } = config;
    if (!isValidQueueSize(size)) {
      throw new VirtioError('VIRTIO_QUEUE_SIZE_INVALID', `queue size ${size} is not a power of two in 1..32768`);
    }
    this.size = size;
    this.eventIdx = config.eventIdx ?? false;
    this.mem = mem;
    this.#mask = size - 1;
    const d = resolveRing(mem, config.descAddr, descTableSize(size), DESC_ALIGN, 1, 'descriptor table');
    const a = resolveRing(mem, config.availAddr, availRingSize(size), AVAIL_ALIGN, 2, 'available ring');
    const u = resolveRing(mem, config.usedAddr, usedRingSize(size), USED_ALIGN, 2, 'used ring');
    d.fill(0);
    a.fill(0);
    u.fill(0);
    this.#desc = new DataView(d.buffer);
    this.#descBase = d.byteOffset;
    this.#availU16 = new Uint16Array(a.buffer, a.byteOffset, a.length >>> 1);
    this.#avail = new DataView(a.buffer);
    this.#availBase = a.byteOffset;
    this.#usedU16 = new Uint16Array(u.buffer, u.byteOffset, u.length >>> 1);
    this.#used = new DataView(u.buffer);
    this.#usedBase = u.byteOffset;
    this.#free = new Uint16Array(size);
    // Hand out low indices first (pop from the top of the stack).
    for (let i = 0; i < size; i++) this.#free[i] = size - 1 - i;
    this.#freeTop = size;
    this.#link = new Uint16Array(size);
    this.#chainDescs = new Uint32Array(size);
    this.#tokens = new Array<T | undefined>(size).fill(undefined);
  }

  /** Number of free descriptors. */
  get freeCount(): number {
    return this.#freeTop;
  }

  /** Number of chains added and not yet returned by `pollUsed`. */
  get inFlight(): number {
    return this.#inFlight;
  }

  readonly packed = false;

  /** Next avail index the driver will fill (avail.idx after the next `publish`). */
  get availPosition(): number {
    return this.#availIdx;
  }

  /** Next used index the driver will consume. */
  get lastUsedIdx(): number {
    return this.#lastUsedIdx;
  }

  /**
   * Adds a chain of `segments` (readable ones first) and makes its head the next avail ring entry; not visible to the
   * device until `publish`. Returns the head index, or -1 when there are not enough free descriptors.
   */
  addChain(segments: readonly Segment[], token: T, options: AddChainOptions = {}): number {
    const n = segments.length;
    if (n === 0) throw new RangeError('a chain needs at least one segment');
    let seenWritable = false;
    for (const s of segments) {
      if (!Number.isSafeInteger(s.addr) || s.addr < 0 || !Number.isInteger(s.len) || s.len < 0 || s.len > 0xffff_ffff) {
        throw new RangeError(`bad segment ${s.addr}+${s.len}`);
      }
      if (s.addr > ADDRESS_LIMIT - s.len) throw new RangeError(`segment ${s.addr}+${s.len} ends past 2^53`);
      if (s.writable) seenWritable = true;
      else if (seenWritable) throw new RangeError('readable segments must come before writable ones');
    }
    const indirectAddr = options.indirectAddr;
    const needed = indirectAddr === undefined ? n : 1;
    if (this.#freeTop < needed) return -1;

    let head: number;
    if (indirectAddr === undefined) {
      // Allocate all first, then write back to front so each descriptor's next is known.
      head = this.#allocate();
      let prev = head;
      this.#writeRing(head, segments[0] as Segment, n > 1 ? VRING_DESC_F_NEXT : 0, 0);
      for (let i = 1; i < n; i++) {
        const idx = this.#allocate();
        this.#link[prev] = idx;
        // Patch the previous descriptor's next field (only the next field: it is still ours, not yet published).
        this.#desc.setUint16(this.#descBase + DESC_SIZE * prev + 14, idx, true);
        this.#writeRing(idx, segments[i] as Segment, i < n - 1 ? VRING_DESC_F_NEXT : 0, 0);
        prev = idx;
      }
    } else {
      for (let i = 0; i < n; i++) {
        const s = segments[i] as Segment;
        encodeDescriptor(this.#scratchView, 0, {
          addr: s.addr,
          len: s.len,
          flags: (s.writable ? VRING_DESC_F_WRITE : 0) | (i < n - 1 ? VRING_DESC_F_NEXT : 0),
          next: i < n - 1 ? i + 1 : 0,
        });
        copyToGuest(this.mem, indirectAddr + DESC_SIZE * i, this.#scratch, 0, DESC_SIZE);
      }
      head = this.#allocate();
      encodeDescriptor(this.#desc, this.#descBase + DESC_SIZE * head, {
        addr: indirectAddr,
        len: DESC_SIZE * n,
        flags: VRING_DESC_F_INDIRECT,
        next: 0,
      });
    }
    this.#chainDescs[head] = needed;
    this.#tokens[head] = token;
    this.#inFlight++;
    this.pushAvailRaw(head);
    return head;
  }

  /** Makes the chains added since the last call visible to the device by storing avail.idx. */
  publish(): void {
    // Release: descriptors and ring entries written before become visible before the new index. Pairs with the
    // device's acquire load of avail.idx (SplitQueue #loadAvailIdx) before it reads ring entries and descriptors.
    Atomics.store(this.#availU16, 1, le16(this.#availIdx));
    this.#publishedAvailIdx = this.#availIdx;
  }

  /**
   * Whether the device wants an available buffer notification for what was published since the last call
   * (Linux `virtqueue_kick_prepare_split`): with event idx, `vring_need_event(avail_event, new, old)`; without,
   * unless the device set VRING_USED_F_NO_NOTIFY. False when nothing was published since the last call.
   */
  kickNeeded(): boolean {
    const newIdx = this.#publishedAvailIdx;
    const old = this.#kickedAvailIdx;
    this.#kickedAvailIdx = newIdx;
    if (newIdx === old) return false;
    // The Atomics.store of avail.idx (publish) then these Atomics.loads: a full fence (Linux virtio_mb). Pairs with
    // the device's "store avail_event / clear NO_NOTIFY, fence, re-read avail.idx" in SplitQueue.enableNotification.
    if (this.eventIdx) {
      const availEvent = le16(Atomics.load(this.#usedU16, 2 + 4 * this.size));
      return vringNeedEvent(availEvent, newIdx, old);
    }
    return (le16(Atomics.load(this.#usedU16, 0)) & VRING_USED_F_NO_NOTIFY) === 0;
  }

  /**
   * Consumes the used elements the device published: frees their descriptors, then calls `cb(token, len)` for each.
   * Returns the number consumed. Throws `VIRTIO_USED_INDEX_INVALID` when used.idx moved further than the number of
   * chains in flight, `VIRTIO_USED_ID_INVALID` for an id that is not the head of a chain in flight.
   */
  pollUsed(cb: (token: T, len: number) => void): number {
    // Acquire: pairs with the device's release store of used.idx (SplitQueue.publishUsed), so the used elements read
    // below are the ones written before it.
    const usedIdx = le16(Atomics.load(this.#usedU16, 1));
    const n = (usedIdx - this.#lastUsedIdx) & 0xffff;
    if (n > this.#inFlight) {
      throw new VirtioError(
        'VIRTIO_USED_INDEX_INVALID',
        `used.idx ${usedIdx} is ${n} ahead of ${this.#lastUsedIdx} with only ${this.#inFlight} chains in flight`,
      );
    }
    for (let k = 0; k < n; k++) {
      const off = this.#usedBase + 4 + USED_ELEM_SIZE * (this.#lastUsedIdx & this.#mask);
      const id = this.#used.getUint32(off, true);
      const len = this.#used.getUint32(off + 4, true);
      if (id >= this.size || this.#chainDescs[id] === 0) {
        throw new VirtioError('VIRTIO_USED_ID_INVALID', `used element ${this.#lastUsedIdx} has id ${id}, not a chain in flight`);
      }
      const token = this.#tokens[id] as T;
      this.#release(id);
      this.#lastUsedIdx = (this.#lastUsedIdx + 1) & 0xffff;
      cb(token, len);
    }
    return n;
  }

  /**
   * Asks for a used buffer notification at the next completion: with event idx stores used_event = `lastUsedIdx`,
   * otherwise clears VRING_AVAIL_F_NO_INTERRUPT. Returns true when completions are already pending (poll them: their
   * notification may have been suppressed).
   */
  enableInterrupts(): boolean {
    if (this.eventIdx) {
      Atomics.store(this.#availU16, 2 + this.size, le16(this.#lastUsedIdx));
    } else {
      this.#availFlags &= ~VRING_AVAIL_F_NO_INTERRUPT;
      Atomics.store(this.#availU16, 0, le16(this.#availFlags));
    }
    // Store then load (SC): a full fence, the driver's half of the race described in SplitQueue.needsNotification.
    return le16(Atomics.load(this.#usedU16, 1)) !== this.#lastUsedIdx;
  }

  /** Asks the device not to notify: sets VRING_AVAIL_F_NO_INTERRUPT (with event idx: nothing; at most one more). */
  disableInterrupts(): void {
    if (this.eventIdx) return;
    this.#availFlags |= VRING_AVAIL_F_NO_INTERRUPT;
    Atomics.store(this.#availU16, 0, le16(this.#availFlags));
  }

  // ---- Raw accessors (tests, malformed rings) ----

  /** Writes descriptor `index` of the descriptor table as given. */
  writeDescriptor(index: number, desc: RawDescriptor): void {
    checkIndex(index, this.size, 'descriptor index');
    encodeDescriptor(this.#desc, this.#descBase + DESC_SIZE * index, desc);
  }

  /** Reads descriptor `index` of the descriptor table. */
  readDescriptor(index: number): DescriptorValue {
    checkIndex(index, this.size, 'descriptor index');
    return decodeDescriptor(this.#desc, this.#descBase + DESC_SIZE * index);
  }

  /** Writes `head` (any u16) into the next avail ring entry and advances the unpublished avail index. */
  pushAvailRaw(head: number): void {
    this.#avail.setUint16(this.#availBase + 4 + 2 * (this.#availIdx & this.#mask), head, true);
    this.#availIdx = (this.#availIdx + 1) & 0xffff;
  }

  /** Stores avail.idx (any u16) directly, and makes it the driver's avail index. */
  setAvailIdx(idx: number): void {
    this.#availIdx = idx & 0xffff;
    this.publish();
  }

  /** Stores avail.flags. */
  setAvailFlags(flags: number): void {
    this.#availFlags = flags & 0xffff;
    Atomics.store(this.#availU16, 0, le16(this.#availFlags));
  }

  /** Stores used_event (event idx: "notify me when used.idx passes this"). */
  setUsedEvent(idx: number): void {
    Atomics.store(this.#availU16, 2 + this.size, le16(idx & 0xffff));
  }

  /** Reads used.idx. */
  readUsedIdx(): number {
    return le16(Atomics.load(this.#usedU16, 1));
  }

  /** Reads used.flags. */
  readUsedFlags(): number {
    return le16(Atomics.load(this.#usedU16, 0));
  }

  /** Reads avail_event. */
  readAvailEvent(): number {
    return le16(Atomics.load(this.#usedU16, 2 + 4 * this.size));
  }

  /** Reads used ring element `slot` (0..size-1). */
  readUsedElem(slot: number): { readonly id: number; readonly len: number } {
    checkIndex(slot, this.size, 'used ring slot');
    const off = this.#usedBase + 4 + USED_ELEM_SIZE * slot;
    return { id: this.#used.getUint32(off, true), len: this.#used.getUint32(off + 4, true) };
  }

  /**
   * Sets both rings' indices to `idx` (avail.idx, used.idx, used_event) and the driver's own, as if `idx` chains had
   * been processed: for tests of 16-bit wrap-around (pair with `SplitQueue.setBase(idx)`). Only with nothing in flight.
   */
  resetPositions(idx: number): void {
    if (this.#inFlight !== 0) throw new Error('resetPositions with chains in flight');
    const v = idx & 0xffff;
    this.#availIdx = v;
    this.#publishedAvailIdx = v;
    this.#kickedAvailIdx = v;
    this.#lastUsedIdx = v;
    Atomics.store(this.#availU16, 1, le16(v));
    Atomics.store(this.#availU16, 2 + this.size, le16(v));
    Atomics.store(this.#usedU16, 1, le16(v));
  }

  #allocate(): number {
    this.#freeTop--;
    return this.#free[this.#freeTop] as number;
  }

  #writeRing(index: number, s: Segment, flags: number, next: number): void {
    encodeDescriptor(this.#desc, this.#descBase + DESC_SIZE * index, {
      addr: s.addr,
      len: s.len,
      flags: flags | (s.writable ? VRING_DESC_F_WRITE : 0),
      next,
    });
  }

  /** Returns the descriptors of the chain at `head` to the free list, following the JS copy of the links. */
  #release(head: number): void {
    let count = this.#chainDescs[head] ?? 0;
    let i = head;
    while (count-- > 0) {
      this.#free[this.#freeTop++] = i;
      i = this.#link[i] ?? 0;
    }
    this.#chainDescs[head] = 0;
    this.#tokens[head] = undefined;
    this.#inFlight--;
  }
}

function encodeDescriptor(dv: DataView, off: number, d: RawDescriptor): void {
  if (typeof d.addr === 'number') {
    // Numbers are exact integers below 2^53 here (addChain checks; raw writers pass bigint for larger values).
    dv.setUint32(off, d.addr >>> 0, true);
    dv.setUint32(off + 4, Math.floor(d.addr / 0x1_0000_0000) >>> 0, true);
  } else {
    const a = BigInt.asUintN(64, d.addr);
    dv.setUint32(off, Number(a & 0xffff_ffffn), true);
    dv.setUint32(off + 4, Number(a >> 32n), true);
  }
  dv.setUint32(off + 8, d.len >>> 0, true);
  dv.setUint16(off + 12, d.flags & 0xffff, true);
  dv.setUint16(off + 14, d.next & 0xffff, true);
}

function decodeDescriptor(dv: DataView, off: number): DescriptorValue {
  return {
    addr: (BigInt(dv.getUint32(off + 4, true)) << 32n) | BigInt(dv.getUint32(off, true)),
    len: dv.getUint32(off + 8, true),
    flags: dv.getUint16(off + 12, true),
    next: dv.getUint16(off + 14, true),
  };
}

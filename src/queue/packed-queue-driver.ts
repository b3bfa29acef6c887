/**
 * The driver side of a packed virtqueue (VIRTIO 1.2 §2.8), modelled on Linux `drivers/virtio/virtio_ring.c` (the
 * `_packed` functions) and the spec's driver examples: used by our TypeScript frontend and by tests, the counterpart
 * of `SplitQueueDriver`.
 *
 * The driver keeps its own bookkeeping in JS memory (free buffer ids, ring slots per id, tokens, positions): nothing
 * read back from the ring is trusted, and every used descriptor the device writes is checked
 * (`VIRTIO_USED_ID_INVALID`), since the device may be another process.
 *
 * Publication: `addChain` writes every descriptor of a chain except the first one's `flags`; `publish` then stores
 * those first flags, the chains in reverse order, so the first chain's first flags are stored last and the device
 * sees the whole batch at once (§2.8 "Placing Available Buffers Into The Descriptor Ring": "it defers updating the descriptor flags for the first descriptor").
 * The buffer id is written in the last descriptor of each chain only (§2.8.6); the other descriptors' `id` fields
 * keep whatever they held, so a device that reads the id elsewhere is caught.
 *
 * Raw accessors (`writeDescriptor`, `makeAvailableRaw`, `setDriverEvent`, ...) bypass the bookkeeping so tests can
 * build malformed rings; do not mix them with `addChain` / `pollUsed` on the same slots.
 */
import { VirtioError } from '../errors.js';
import type { GuestMemory } from '../memory/guest-memory.js';
import {
  DESC_ALIGN,
  DESC_SIZE,
  PACKED_EVENT_SIZE,
  VRING_DESC_F_INDIRECT,
  VRING_DESC_F_NEXT,
  VRING_DESC_F_WRITE,
  descTableSize,
} from './constants.js';
import { copyFromGuest, copyToGuest } from './descriptor-chain.js';
import {
  MAX_PACKED_QUEUE_SIZE,
  PACKED_EVENT_ALIGN,
  VRING_PACKED_DESC_F_AVAIL,
  VRING_PACKED_DESC_F_USED,
  VRING_PACKED_EVENT_FLAG_DESC,
  VRING_PACKED_EVENT_FLAG_DISABLE,
  VRING_PACKED_EVENT_FLAG_ENABLE,
  isValidPackedQueueSize,
  packedLinear,
  packedNeedEvent,
  packedPosition,
} from './packed-queue.js';
import { ADDRESS_LIMIT, le16, resolveRing } from './ring-access.js';
import type { QueueDriver } from './queue-driver.js';
import type { AddChainOptions, Segment } from './split-queue-driver.js';

/** Where the three areas of a packed queue go (see `PackedQueueDriver.layout`). */
export interface PackedRingLayout {
  readonly descAddr: number;
  readonly driverAddr: number;
  readonly deviceAddr: number;
  /** First byte after the device area. */
  readonly end: number;
}

/** Options of `PackedQueueDriver`. */
export interface PackedQueueDriverConfig {
  readonly size: number;
  readonly descAddr: number;
  readonly driverAddr: number;
  readonly deviceAddr: number;
  /** VIRTIO_F_RING_EVENT_IDX negotiated (default false). */
  readonly eventIdx?: boolean;
}

/** A packed descriptor as stored in guest memory. Raw writes accept any 64-bit address (`bigint` for >= 2^53). */
export interface PackedRawDescriptor {
  readonly addr: number | bigint;
  readonly len: number;
  readonly id: number;
  readonly flags: number;
}

/** A packed descriptor read back from guest memory. */
export interface PackedDescriptorValue {
  readonly addr: bigint;
  readonly len: number;
  readonly id: number;
  readonly flags: number;
}

/** An event suppression area's two words. */
export interface PackedEvent {
  readonly offWrap: number;
  readonly flags: number;
}

const FLAGS_WORD = 7;

function alignUp(x: number, a: number): number {
  return Math.ceil(x / a) * a;
}

/** AVAIL / USED bits that mark a descriptor available for the driver wrap counter `wrap` (§2.8.1). */
export function packedAvailBits(wrap: boolean): number {
  return wrap ? VRING_PACKED_DESC_F_AVAIL : VRING_PACKED_DESC_F_USED;
}

/** AVAIL / USED bits that mark a descriptor used for the device wrap counter `wrap` (§2.8.1). */
export function packedUsedBits(wrap: boolean): number {
  return wrap ? VRING_PACKED_DESC_F_AVAIL | VRING_PACKED_DESC_F_USED : 0;
}

/** The driver side of a packed virtqueue. `T` is the type of the per-chain token handed back by `pollUsed`. */
export class PackedQueueDriver<T = unknown> implements QueueDriver<T> {
  /** Layout for a queue of `size` at `base` (rounded up to 16): the ring, then the driver area, then the device area. */
  static layout(size: number, base: number): PackedRingLayout {
    const descAddr = alignUp(base, DESC_ALIGN);
    const driverAddr = alignUp(descAddr + descTableSize(size), PACKED_EVENT_ALIGN);
    const deviceAddr = driverAddr + PACKED_EVENT_SIZE;
    return { descAddr, driverAddr, deviceAddr, end: deviceAddr + PACKED_EVENT_SIZE };
  }

  /** Writes one packed descriptor at any guest address (an indirect table entry), across regions if needed. */
  static writeDescriptorAt(mem: GuestMemory, gpa: number, desc: PackedRawDescriptor): void {
    const b = new Uint8Array(DESC_SIZE);
    encodeDescriptor(new DataView(b.buffer), 0, desc);
    copyToGuest(mem, gpa, b, 0, DESC_SIZE);
  }

  /** Reads one packed descriptor at any guest address. */
  static readDescriptorAt(mem: GuestMemory, gpa: number): PackedDescriptorValue {
    const b = new Uint8Array(DESC_SIZE);
    copyFromGuest(mem, gpa, b, 0, DESC_SIZE);
    return decodeDescriptor(new DataView(b.buffer), 0);
  }

  readonly size: number;
  readonly eventIdx: boolean;
  readonly mem: GuestMemory;
  readonly packed = true;

  readonly #period: number;
  readonly #desc: DataView;
  readonly #descBase: number;
  readonly #descU16: Uint16Array;
  readonly #driverU16: Uint16Array;
  readonly #deviceU16: Uint16Array;

  /** Stack of free buffer ids: `#freeIds[0 .. #freeTop)`. */
  readonly #freeIds: Uint16Array;
  #freeTop: number;
  /** Per id in flight: ring slots of its chain (0 = free). */
  readonly #slotsOf: Uint16Array;
  readonly #tokens: (T | undefined)[];
  #inFlight = 0;
  #freeSlots: number;
  /** Linear position (see packed-queue.ts) of the next slot to fill. */
  #avail = 0;
  /** Linear position of the next used descriptor to read (Linux `last_used_idx` + wrap). */
  #used = 0;
  /** Chains added and not yet published: their first slot and that slot's flags, in ring order. */
  readonly #pendingSlot: Uint16Array;
  readonly #pendingFlags: Uint16Array;
  #pendingCount = 0;
  #pendingSlots = 0;
  /** Linear avail position at the last `publish`, and slots published since the last `kickNeeded`. */
  #publishedAvail = 0;
  #publishedSinceKick = 0;
  /** The value this driver last stored in the driver area's flags. */
  #driverFlags = VRING_PACKED_EVENT_FLAG_ENABLE;
  readonly #scratch = new Uint8Array(DESC_SIZE);
  readonly #scratchView = new DataView(this.#scratch.buffer);

  /** Resolves the areas (each inside one region, else `VIRTIO_RING_UNMAPPED`) and zeroes them (the ring is zero-initialized, §2.8 "The Virtqueue Descriptor Format"). */
  constructor(mem: GuestMemory, config: PackedQueueDriverConfig) {
    const { size } = config;
    if (!isValidPackedQueueSize(size)) {
      throw new VirtioError('VIRTIO_QUEUE_SIZE_INVALID', `packed queue size ${size} is not an integer in 1..${MAX_PACKED_QUEUE_SIZE}`);
    }
    this.size = size;
    this.eventIdx = config.eventIdx ?? false;
    this.mem = mem;
    this.#period = 2 * size;
    const d = resolveRing(mem, config.descAddr, descTableSize(size), DESC_ALIGN, 2, 'descriptor ring');
    const dr = resolveRing(mem, config.driverAddr, PACKED_EVENT_SIZE, PACKED_EVENT_ALIGN, 2, 'driver event suppression area');
    const dv = resolveRing(mem, config.deviceAddr, PACKED_EVENT_SIZE, PACKED_EVENT_ALIGN, 2, 'device event suppression area');
    d.fill(0);
    dr.fill(0);
    dv.fill(0);
    this.#desc = new DataView(d.buffer);
    this.#descBase = d.byteOffset;
    this.#descU16 = new Uint16Array(d.buffer, d.byteOffset, d.length >>> 1);
    this.#driverU16 = new Uint16Array(dr.buffer, dr.byteOffset, 2);
    this.#deviceU16 = new Uint16Array(dv.buffer, dv.byteOffset, 2);
    this.#freeIds = new Uint16Array(size);
    for (let i = 0; i < size; i++) this.#freeIds[i] = size - 1 - i; // low ids first
    this.#freeTop = size;
    this.#slotsOf = new Uint16Array(size);
    this.#tokens = new Array<T | undefined>(size).fill(undefined);
    this.#freeSlots = size;
    this.#pendingSlot = new Uint16Array(size);
    this.#pendingFlags = new Uint16Array(size);
  }

  /** Free ring slots (a direct chain of n segments needs n, an indirect one 1). */
  get freeCount(): number {
    return this.#freeSlots;
  }

  /** Chains added and not yet returned by `pollUsed`. */
  get inFlight(): number {
    return this.#inFlight;
  }

  /** The next position the driver fills, `index | wrap << 15`. */
  get availPosition(): number {
    return packedPosition(this.#avail, this.size);
  }

  /** The next position the driver reads a used descriptor from, `index | wrap << 15`. */
  get usedPosition(): number {
    return packedPosition(this.#used, this.size);
  }

  /**
   * Adds a chain of `segments` (readable ones first) at the next ring slots, or one slot referring to an indirect
   * table with `indirectAddr`; not visible to the device until `publish`. Returns the buffer id, or -1 when the ring
   * has not enough free slots.
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
    if (this.#freeSlots < needed) return -1;
    // A free slot implies a free id: ids in flight <= slots in flight.
    const id = this.#freeIds[--this.#freeTop] as number;
    const first = this.#avail;
    let firstFlags: number;
    if (indirectAddr === undefined) {
      let at = first;
      firstFlags = 0;
      for (let i = 0; i < n; i++) {
        const s = segments[i] as Segment;
        const wrap = at < this.size;
        const slot = wrap ? at : at - this.size;
        const off = this.#descBase + DESC_SIZE * slot;
        this.#desc.setUint32(off, s.addr >>> 0, true);
        this.#desc.setUint32(off + 4, Math.floor(s.addr / 0x1_0000_0000) >>> 0, true);
        this.#desc.setUint32(off + 8, s.len, true);
        if (i === n - 1) this.#desc.setUint16(off + 12, id, true); // the id goes in the last descriptor (§2.8.6)
        const flags = packedAvailBits(wrap) | (s.writable ? VRING_DESC_F_WRITE : 0) | (i < n - 1 ? VRING_DESC_F_NEXT : 0);
        if (i === 0) {
          firstFlags = flags;
        } else {
          // Release: this descriptor's fields before its flags. The device reads these only after the first flags.
          Atomics.store(this.#descU16, 8 * slot + FLAGS_WORD, le16(flags));
        }
        at = at + 1 === this.#period ? 0 : at + 1;
      }
    } else {
      for (let i = 0; i < n; i++) {
        const s = segments[i] as Segment;
        // Only WRITE is valid in a packed indirect table (§2.8.7); the id is reserved.
        encodeDescriptor(this.#scratchView, 0, { addr: s.addr, len: s.len, id: 0, flags: s.writable ? VRING_DESC_F_WRITE : 0 });
        copyToGuest(this.mem, indirectAddr + DESC_SIZE * i, this.#scratch, 0, DESC_SIZE);
      }
      const wrap = first < this.size;
      const slot = wrap ? first : first - this.size;
      encodeDescriptor(this.#desc, this.#descBase + DESC_SIZE * slot, { addr: indirectAddr, len: DESC_SIZE * n, id, flags: 0 }, false);
      firstFlags = packedAvailBits(wrap) | VRING_DESC_F_INDIRECT;
    }
    this.#pendingSlot[this.#pendingCount] = first < this.size ? first : first - this.size;
    this.#pendingFlags[this.#pendingCount] = firstFlags;
    this.#pendingCount++;
    this.#pendingSlots += needed;
    this.#slotsOf[id] = needed;
    this.#tokens[id] = token;
    this.#inFlight++;
    this.#freeSlots -= needed;
    this.#avail = (first + needed) % this.#period;
    return id;
  }

  /** Makes the chains added since the last call visible: stores their first flags, the first chain's last. */
  publish(): void {
    for (let k = this.#pendingCount - 1; k >= 0; k--) {
      // Release: each chain's other descriptors (and for k = 0, every chain of the batch) are visible before the
      // flags that expose it. Pairs with the device's acquire load of the flags (PackedQueue #walk).
      Atomics.store(this.#descU16, 8 * (this.#pendingSlot[k] as number) + FLAGS_WORD, le16(this.#pendingFlags[k] as number));
    }
    this.#pendingCount = 0;
    this.#publishedSinceKick = Math.min(this.#publishedSinceKick + this.#pendingSlots, this.#period);
    this.#pendingSlots = 0;
    this.#publishedAvail = this.#avail;
  }

  /**
   * Whether the device wants an available buffer notification for what was published since the last call (Linux
   * `virtqueue_kick_prepare_packed`): device area DISABLE: no; DESC with event idx: when the published avail position
   * passed its `off_wrap`; otherwise yes. False when nothing was published since the last call.
   */
  kickNeeded(): boolean {
    const moved = this.#publishedSinceKick;
    this.#publishedSinceKick = 0;
    if (moved === 0) return false;
    // The Atomics.store of the flags (publish) then these Atomics.loads: a full fence (Linux virtio_mb). Pairs with
    // the device's "store off_wrap / flags, fence, re-read the descriptor" in PackedQueue.enableNotification.
    const flags = le16(Atomics.load(this.#deviceU16, 1)) & 3;
    if (flags === VRING_PACKED_EVENT_FLAG_DISABLE) return false;
    if (flags !== VRING_PACKED_EVENT_FLAG_DESC || !this.eventIdx) return true;
    const offWrap = le16(Atomics.load(this.#deviceU16, 0));
    return packedNeedEvent(this.size, offWrap, this.#publishedAvail, moved);
  }

  /**
   * Consumes the used descriptors the device wrote: frees their slots and ids, then calls `cb(token, len)` for each
   * (`len` is 0 when the device did not set VRING_DESC_F_WRITE, §2.8.3). Returns the number consumed. Throws
   * `VIRTIO_USED_ID_INVALID` for an id that is not a buffer in flight.
   */
  pollUsed(cb: (token: T, len: number) => void): number {
    let n = 0;
    for (;;) {
      const got = this.#takeUsed();
      if (got === undefined) return n;
      n++;
      cb(got.token, got.len);
    }
  }

  /** Consumes one used descriptor, or returns undefined when the device has not used the next one. */
  getUsed(): { readonly token: T; readonly len: number } | undefined {
    return this.#takeUsed();
  }

  #takeUsed(): { readonly token: T; readonly len: number } | undefined {
    if (this.#inFlight === 0) return undefined; // nothing the device may have used: stale slots are not read
    const at = this.#used;
    const wrap = at < this.size;
    const slot = wrap ? at : at - this.size;
    // Acquire; pairs with the device's release store of the flags (PackedQueue.publishUsed / pushUsed).
    const flags = le16(Atomics.load(this.#descU16, 8 * slot + FLAGS_WORD));
    if (!isUsed(flags, wrap)) return undefined;
    const off = this.#descBase + DESC_SIZE * slot;
    const id = this.#desc.getUint16(off + 12, true);
    const len = this.#desc.getUint32(off + 8, true);
    const slots = id < this.size ? (this.#slotsOf[id] as number) : 0;
    if (slots === 0) {
      throw new VirtioError('VIRTIO_USED_ID_INVALID', `used descriptor at slot ${slot} has id ${id}, not a buffer in flight`);
    }
    const token = this.#tokens[id] as T;
    this.#slotsOf[id] = 0;
    this.#tokens[id] = undefined;
    this.#freeIds[this.#freeTop++] = id;
    this.#inFlight--;
    this.#freeSlots += slots;
    this.#used = (at + slots) % this.#period;
    return { token, len: (flags & VRING_DESC_F_WRITE) !== 0 ? len : 0 };
  }

  /**
   * Asks for a used buffer notification at the next completion: with event idx, driver area `off_wrap` = the next
   * used position, then flags DESC; otherwise flags ENABLE. Returns true when a used descriptor is already there
   * (poll it: its notification may have been suppressed).
   */
  enableInterrupts(): boolean {
    if (this.eventIdx) {
      // off_wrap first, then flags (Linux virtqueue_enable_cb_prepare_packed: virtio_wmb between them).
      Atomics.store(this.#driverU16, 0, le16(packedPosition(this.#used, this.size)));
      this.#setDriverFlags(VRING_PACKED_EVENT_FLAG_DESC);
    } else {
      this.#setDriverFlags(VRING_PACKED_EVENT_FLAG_ENABLE);
    }
    // Store(s) then load (SC): a full fence, the driver's half of the race described in PackedQueue.needsNotification.
    if (this.#inFlight === 0) return false;
    const at = this.#used;
    const wrap = at < this.size;
    return isUsed(le16(Atomics.load(this.#descU16, 8 * (wrap ? at : at - this.size) + FLAGS_WORD)), wrap);
  }

  /** Asks the device not to notify: driver area flags = DISABLE. */
  disableInterrupts(): void {
    this.#setDriverFlags(VRING_PACKED_EVENT_FLAG_DISABLE);
  }

  #setDriverFlags(flags: number): void {
    this.#driverFlags = flags;
    Atomics.store(this.#driverU16, 1, le16(flags));
  }

  // ---- Raw accessors (tests, malformed rings) ----

  /** Writes ring slot `slot` as given: addr, len and id first, then the flags (an atomic store). */
  writeDescriptor(slot: number, desc: PackedRawDescriptor): void {
    checkSlot(slot, this.size);
    encodeDescriptor(this.#desc, this.#descBase + DESC_SIZE * slot, desc, false);
    Atomics.store(this.#descU16, 8 * slot + FLAGS_WORD, le16(desc.flags & 0xffff));
  }

  /** Reads ring slot `slot`. */
  readDescriptor(slot: number): PackedDescriptorValue {
    checkSlot(slot, this.size);
    return decodeDescriptor(this.#desc, this.#descBase + DESC_SIZE * slot);
  }

  /**
   * Writes `descs` at the driver's next slots and makes them available, untracked: each descriptor's flags get the
   * AVAIL / USED bits of its slot's wrap counter (unless `exactFlags`), the first one's flags are stored last, and
   * the driver's avail position moves on. For malformed chains; the driver will not expect them back.
   */
  makeAvailableRaw(descs: readonly PackedRawDescriptor[], options: { readonly exactFlags?: boolean } = {}): void {
    const first = this.#avail;
    let firstFlags = 0;
    let at = first;
    descs.forEach((d, i) => {
      const wrap = at < this.size;
      const slot = wrap ? at : at - this.size;
      const flags = options.exactFlags === true ? d.flags & 0xffff : (d.flags & 0x7f7f) | packedAvailBits(wrap);
      encodeDescriptor(this.#desc, this.#descBase + DESC_SIZE * slot, d, false);
      if (i === 0) firstFlags = flags;
      else Atomics.store(this.#descU16, 8 * slot + FLAGS_WORD, le16(flags));
      at = at + 1 === this.#period ? 0 : at + 1;
    });
    if (descs.length > 0) {
      const slot = first < this.size ? first : first - this.size;
      Atomics.store(this.#descU16, 8 * slot + FLAGS_WORD, le16(firstFlags));
    }
    this.#avail = at;
    this.#publishedAvail = at;
  }

  /** Stores the driver event suppression area (off_wrap first, then flags). */
  setDriverEvent(offWrap: number, flags: number): void {
    Atomics.store(this.#driverU16, 0, le16(offWrap & 0xffff));
    this.#setDriverFlags(flags & 0xffff);
  }

  /** Reads the driver event suppression area. */
  readDriverEvent(): PackedEvent {
    return { offWrap: le16(Atomics.load(this.#driverU16, 0)), flags: le16(Atomics.load(this.#driverU16, 1)) };
  }

  /** Reads the device event suppression area. */
  readDeviceEvent(): PackedEvent {
    return { offWrap: le16(Atomics.load(this.#deviceU16, 0)), flags: le16(Atomics.load(this.#deviceU16, 1)) };
  }

  /** The flags value this driver last stored in its area (ENABLE initially). */
  get driverFlags(): number {
    return this.#driverFlags;
  }

  /**
   * Moves both of the driver's positions to `pos` (`index | wrap << 15`), as if the ring had been used up to there,
   * and rewrites every slot's flags accordingly (slots before `index` used in this lap, the others in the previous
   * one). For tests of wrap-around: pair with `PackedQueue.resume(pos)`. Only with nothing in flight.
   */
  resetPositions(pos: number): void {
    if (this.#inFlight !== 0 || this.#pendingCount !== 0) throw new Error('resetPositions with chains in flight');
    if (!Number.isInteger(pos) || pos < 0 || pos > 0xffff || (pos & 0x7fff) >= this.size) {
      throw new RangeError(`position 0x${pos.toString(16)} is not valid for size ${this.size}`);
    }
    const l = packedLinear(pos, this.size);
    const index = pos & 0x7fff;
    const wrap = (pos & 0x8000) !== 0;
    for (let s = 0; s < this.size; s++) {
      Atomics.store(this.#descU16, 8 * s + FLAGS_WORD, le16(packedUsedBits(s < index ? wrap : !wrap)));
    }
    this.#avail = l;
    this.#used = l;
    this.#publishedAvail = l;
    this.#publishedSinceKick = 0;
  }
}

function isUsed(flags: number, wrap: boolean): boolean {
  return ((flags & VRING_PACKED_DESC_F_AVAIL) !== 0) === wrap && ((flags & VRING_PACKED_DESC_F_USED) !== 0) === wrap;
}

function checkSlot(slot: number, size: number): void {
  if (!Number.isInteger(slot) || slot < 0 || slot >= size) throw new RangeError(`ring slot ${slot} is out of range 0..${size - 1}`);
}

/** Encodes a descriptor; with `withFlags` false the flags word is left alone (callers store it atomically). */
function encodeDescriptor(dv: DataView, off: number, d: PackedRawDescriptor, withFlags = true): void {
  if (typeof d.addr === 'number') {
    dv.setUint32(off, d.addr >>> 0, true);
    dv.setUint32(off + 4, Math.floor(d.addr / 0x1_0000_0000) >>> 0, true);
  } else {
    const a = BigInt.asUintN(64, d.addr);
    dv.setUint32(off, Number(a & 0xffff_ffffn), true);
    dv.setUint32(off + 4, Number(a >> 32n), true);
  }
  dv.setUint32(off + 8, d.len >>> 0, true);
  dv.setUint16(off + 12, d.id & 0xffff, true);
  if (withFlags) dv.setUint16(off + 14, d.flags & 0xffff, true);
}

function decodeDescriptor(dv: DataView, off: number): PackedDescriptorValue {
  return {
    addr: (BigInt(dv.getUint32(off + 4, true)) << 32n) | BigInt(dv.getUint32(off, true)),
    len: dv.getUint32(off + 8, true),
    id: dv.getUint16(off + 12, true),
    flags: dv.getUint16(off + 14, true),
  };
}

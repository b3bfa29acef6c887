/**
 * The device side of a packed virtqueue (VIRTIO 1.2 §2.8, VIRTIO_F_RING_PACKED), with the rigour of `SplitQueue`: the
 * queue holds ring addresses, positions and the views it resolved, guest memory is a parameter of the operations that
 * touch buffers, and every driver error is a `VirtioError` with a stable code.
 *
 * ## The ring
 *
 * One ring of `size` 16-byte descriptors `{ le64 addr; le32 len; le16 id; le16 flags; }` that both sides read and
 * write, plus two 4-byte event suppression areas `{ le16 off_wrap; le16 flags; }`: the driver area (written by the
 * driver, controls used buffer notifications) and the device area (written by us, controls kicks). The vhost-user
 * SET_VRING_ADDR fields are `desc` = ring, `avail` = driver area, `used` = device area.
 *
 * Both sides keep a position and a wrap counter starting at (0, 1); the counter flips each time the position passes
 * the end of the ring. A descriptor is available when its AVAIL flag (bit 7) equals the driver's wrap counter and its
 * USED flag (bit 15) does not; used when both equal the device's wrap counter. Internally a position is one number in
 * `[0, 2 * size)` (`linear`): `index` while the wrap counter is 1, `size + index` while it is 0, so that every
 * distance is plain arithmetic modulo `2 * size`. Outside (`getBase`, `seenAvailIdx`, `resume`, `enableNotification`)
 * it is `index | wrap << 15`, the vhost-user SET/GET_VRING_BASE encoding.
 *
 * A chain is either a run of descriptors linked by NEXT in ring order (it may straddle the end of the ring, the wrap
 * counter flipping in the middle), or a single descriptor with INDIRECT whose table holds the whole chain (§2.8.7:
 * the table is read in order, `len / 16` entries; only WRITE is meaningful in its entries, NEXT and the ids are
 * ignored as the spec says, an INDIRECT entry is rejected). The buffer id is the `id` of the last ring descriptor of
 * the chain (§2.8.6 "Buffer ID is included in the last descriptor in the list"). The device writes one used
 * descriptor per chain, at its next used position, and moves that position on by the number of ring slots the chain
 * took (§2.8.6), whatever order chains complete in: the queue records the slot count per id in flight.
 *
 * ## Memory model
 *
 * - Descriptor `flags` words and the four event suppression words are accessed with `Atomics.load` / `Atomics.store`
 *   on `Uint16Array`s (sequentially consistent: a load is at least an acquire, a store at least a release, a store
 *   followed by a load is a full fence). Each access says what it pairs with on the driver side (Linux
 *   `drivers/virtio/virtio_ring.c`, the `_packed` functions).
 * - The other descriptor fields use plain `DataView` accesses, ordered by those atomics: the flags of a descriptor
 *   are loaded (acquire) before the rest of it is read; a used descriptor's `id` / `len` are written before its flags.
 * - Every descriptor is copied into locals once, and only the locals are validated and used (no double fetch: DPDK
 *   CVE-2020-14375, and 93ed2f49de for the packed length).
 * - Used descriptors are made visible batch-wise: `pushUsed` writes `id` / `len` and, except for the first element
 *   of the batch, the flags; `publishUsed` stores the flags of the first element last (§2.8 "Multi-buffer
 *   requests": the driver polls only its next used position, so it sees the whole batch or none of it).
 *
 * ## Bounds
 *
 * - Queue size: 1..32768, any integer (not necessarily a power of two) (`VIRTIO_QUEUE_SIZE_INVALID`).
 * - A chain in the ring takes at most the slots the device does not hold in flight (`size - inFlightSlots`): one that
 *   runs on is running round the ring onto its own slots (`VIRTIO_DESC_LOOP`, the packed form of a loop).
 * - Every descriptor of a chain after the first must be available too (§2.8.6, the driver exposes the first one
 *   last): `VIRTIO_PACKED_DESC_UNAVAILABLE`.
 * - A chain holds at most `maxChainLength = max(size, 1024)` data descriptors and 2^32 - 1 bytes
 *   (`VIRTIO_CHAIN_TOO_LONG`); an indirect table 1..65536 entries of 16 bytes (`VIRTIO_INDIRECT_BAD_LENGTH`).
 *
 * ## Error codes (all `VirtioError`)
 *
 * Setup: `VIRTIO_QUEUE_SIZE_INVALID`, `VIRTIO_RING_MISALIGNED`, `VIRTIO_RING_UNMAPPED`, `VIRTIO_PACKED_BASE_INVALID`
 * (`resume` with an index >= size). Chains: `VIRTIO_PACKED_DESC_UNAVAILABLE`, `VIRTIO_DESC_LOOP`,
 * `VIRTIO_PACKED_ID_OUT_OF_RANGE` (id >= size), `VIRTIO_PACKED_ID_IN_FLIGHT` (an id made available again before the
 * device used it), `VIRTIO_DESC_ADDRESS_INVALID`, `VIRTIO_INDIRECT_NOT_NEGOTIATED`, `VIRTIO_INDIRECT_WITH_NEXT`,
 * `VIRTIO_PACKED_INDIRECT_IN_CHAIN` (an INDIRECT descriptor after NEXT-linked ones, §2.8 "Driver Requirements: Indirect Descriptors"),
 * `VIRTIO_INDIRECT_NESTED`, `VIRTIO_INDIRECT_BAD_LENGTH`, `VIRTIO_CHAIN_TOO_LONG`, `VIRTIO_WRITABLE_BEFORE_READABLE`,
 * and `GUEST_MEMORY_UNMAPPED` for an indirect table outside guest memory. Programming errors (bad arguments from the
 * device code, `pushUsed` of an id not in flight, `unpop` with nothing to give back) are `RangeError`s; using the
 * queue before `attach` is `VHOST_QUEUE_NOT_ATTACHED`. After a `VirtioError` nothing is consumed.
 */
import type { DeviceQueue } from './device-queue.js';
import { VhostError, VirtioError } from '../errors.js';
import { u64ToAddress, type GuestMemory } from '../memory/guest-memory.js';
import type { DirtyLog } from '../memory/dirty-log.js';
import { MemoryTable } from '../memory/memory-table.js';
import {
  DESC_ALIGN,
  DESC_SIZE,
  MAX_CHAIN_BYTES,
  MAX_INDIRECT_ENTRIES,
  MIN_CHAIN_BUDGET,
  PACKED_EVENT_SIZE,
  VRING_DESC_F_INDIRECT,
  VRING_DESC_F_NEXT,
  VRING_DESC_F_WRITE,
  descTableSize,
} from './constants.js';
import { copyFromGuest, DescriptorChain } from './descriptor-chain.js';
import { ADDRESS_LIMIT, checkRingAddress, le16, logRingEntries, resolveRing } from './ring-access.js';

/** Packed descriptor flag: available, when equal to the driver's wrap counter (§2.8.1). */
export const VRING_PACKED_DESC_F_AVAIL = 1 << 7;
/** Packed descriptor flag: used, when equal to the device's wrap counter (and AVAIL equal to it too) (§2.8.1). */
export const VRING_PACKED_DESC_F_USED = 1 << 15;
/** Event suppression flags (§2.8.10): notifications on. */
export const VRING_PACKED_EVENT_FLAG_ENABLE = 0;
/** Event suppression flags: notifications off. */
export const VRING_PACKED_EVENT_FLAG_DISABLE = 1;
/** Event suppression flags: notify when the position given by `off_wrap` is reached (VIRTIO_F_RING_EVENT_IDX only). */
export const VRING_PACKED_EVENT_FLAG_DESC = 2;
/** Bit of `off_wrap` (and of the vhost-user base encoding) holding the wrap counter. */
export const VRING_PACKED_EVENT_F_WRAP_CTR = 15;
/** Required alignment of the two event suppression areas (§2.8.10.1). */
export const PACKED_EVENT_ALIGN = 4;
/** Largest packed queue size (§2.8: "up to 2^15 entries"). */
export const MAX_PACKED_QUEUE_SIZE = 32768;

/** Offsets inside a packed descriptor. */
const D_LEN = 8;
const D_ID = 12;
/** Index of a descriptor's `flags` in a `Uint16Array` over the ring: `8 * slot + FLAGS_WORD`. */
const FLAGS_WORD = 7;
/** Words of an event suppression area. */
const EV_OFF_WRAP = 0;
const EV_FLAGS = 1;

/**
 * `(pos + n) % period` for `0 <= pos < period` and `0 <= n <= period`, without a division (the hot path: the
 * period of a packed ring need not be a power of two, and an integer modulo costs tens of cycles).
 */
function advance(pos: number, n: number, period: number): number {
  const next = pos + n;
  return next >= period ? next - period : next;
}

/** Whether `size` is a valid packed queue size: an integer in 1..32768 (no power-of-two requirement). */
export function isValidPackedQueueSize(size: number): boolean {
  return Number.isInteger(size) && size >= 1 && size <= MAX_PACKED_QUEUE_SIZE;
}

/** The linear position in `[0, 2 * size)` of `pos = index | wrap << 15` (index 0..size-1 assumed valid). */
export function packedLinear(pos: number, size: number): number {
  const index = pos & 0x7fff;
  return (pos & 0x8000) !== 0 ? index : index + size;
}

/** The encoding `index | wrap << 15` of a linear position in `[0, 2 * size)`. */
export function packedPosition(linear: number, size: number): number {
  return linear < size ? linear | 0x8000 : linear - size;
}

/**
 * The packed form of `vring_need_event` (§2.8.10; Linux `virtqueue_kick_prepare_packed`, QEMU
 * `vring_packed_need_event`): true when the position `offWrap` (`off | wrap << 15`) lies in the last `moved` slots
 * before `newLinear`, i.e. a descriptor at that offset and wrap counter was made available / used by this move.
 * Computed on the circle of `2 * size` (offset, wrap) states, which needs no power-of-two size; a move of `2 * size`
 * slots or more passes every position.
 */
export function packedNeedEvent(size: number, offWrap: number, newLinear: number, moved: number): boolean {
  if (moved <= 0) return false;
  const period = 2 * size;
  if (moved >= period) return true;
  const event = packedLinear(offWrap, size) % period; // an offset >= size is invalid; any value keeps this bounded
  return (newLinear - event - 1 + 2 * period) % period < moved;
}

/** Configuration of a packed virtqueue, as set by SET_VRING_NUM, SET_VRING_ADDR and the negotiated features. */
export interface PackedQueueConfig {
  /** Queue size (number of descriptors in the ring): 1..32768. */
  readonly size: number;
  /** Guest-physical address of the descriptor ring (16-byte aligned). -1 stands for an unrepresentable address. */
  readonly descAddr: number;
  /** Guest-physical address of the driver event suppression area (4-byte aligned; vhost-user `avail`). */
  readonly driverAddr: number;
  /** Guest-physical address of the device event suppression area (4-byte aligned; vhost-user `used`). */
  readonly deviceAddr: number;
  /** VIRTIO_F_RING_EVENT_IDX (bit 29) was negotiated. */
  readonly eventIdx: boolean;
  /** VIRTIO_F_INDIRECT_DESC (bit 28) was negotiated. */
  readonly indirect: boolean;
  /** As `SplitQueueConfig.cacheViews`: false translates the ring areas through the memory at every access. */
  readonly cacheViews?: boolean;
}

/** Views over the three areas, resolved by `attach`. */
interface PackedViews {
  /** The ring: `DataView` over the region's buffer, ring at byte `descBase`. Plain reads and writes. */
  readonly desc: DataView;
  readonly descBase: number;
  /** The ring as u16 words: descriptor `i`'s flags at `8 * i + 7`. Atomic accesses only. */
  readonly descU16: Uint16Array;
  /** Driver event suppression area: [0] off_wrap, [1] flags. Atomic loads only (the driver writes it). */
  readonly driverU16: Uint16Array;
  /** Device event suppression area: [0] off_wrap, [1] flags. Atomic stores (we write it). */
  readonly deviceU16: Uint16Array;
}

function checkU16(value: number, what: string): void {
  if (!Number.isInteger(value) || value < 0 || value > 0xffff) throw new RangeError(`${what} must be a u16, got ${value}`);
}

/** A ring descriptor as the driver wrote it (what inflight tracking saves of a chain, and gives back at restart). */
export interface PackedRingDescriptor {
  readonly addr: bigint;
  readonly len: number;
  readonly id: number;
  readonly flags: number;
}

/**
 * The ring descriptors of the chain `popChain` took last, exactly as it read them (one read per field: the values it
 * validated), kept only after `recordRingDescriptors()`. Inflight tracking copies them before the request has any
 * side effect (the ring slots may be overwritten by used descriptors before the chain completes).
 */
export class PackedRingRecord {
  /** Ring descriptors of the chain (1 for an indirect chain). */
  count = 0;
  readonly addrLo: Uint32Array;
  readonly addrHi: Uint32Array;
  readonly len: Uint32Array;
  readonly id: Uint16Array;
  readonly flags: Uint16Array;

  constructor(capacity: number) {
    this.addrLo = new Uint32Array(capacity);
    this.addrHi = new Uint32Array(capacity);
    this.len = new Uint32Array(capacity);
    this.id = new Uint16Array(capacity);
    this.flags = new Uint16Array(capacity);
  }
}

/** The device side of a packed virtqueue. See the module documentation for the ring, memory model and bounds. */
export class PackedQueue implements DeviceQueue {
  readonly size: number;
  readonly descAddr: number;
  readonly driverAddr: number;
  readonly deviceAddr: number;
  readonly eventIdx: boolean;
  readonly indirect: boolean;
  /** Most data descriptors a chain may hold: `max(size, 1024)`. */
  readonly maxChainLength: number;

  /** 2 * size: positions are linear numbers modulo this. */
  readonly #period: number;
  /** Linear position of the next descriptor to pop (`last_avail_idx` + wrap). */
  #avail = 0;
  /** Linear position of the next used descriptor to write (includes pushed, unpublished ones). */
  #used = 0;
  /** Linear used position last made visible by `publishUsed`. */
  #publishedUsed = 0;
  /** Slots pushed since the last `publishUsed` (saturates at 2 * size). */
  #pushedSincePublish = 0;
  /** Slots published since the last `needsNotification` (exact up to 2 * size, where it saturates). */
  #publishedSinceCheck = 0;
  /** Linear position past what the device has seen available (see `seenAvailIdx`). */
  #seenAvail = 0;
  /** Per buffer id: ring slots of its chain while in flight, 0 when not in flight. */
  readonly #slots: Uint16Array;
  /** Sum of `#slots`: the ring slots between the used and the avail position. */
  #inFlightSlots = 0;
  #inFlightChains = 0;
  /** Ids popped, most recent last (circular, `size` entries), for `unpop`. */
  readonly #popStack: Uint16Array;
  #popTop = 0;
  #popDepth = 0;
  /** The first used descriptor of the unpublished batch: its slot (-1: no batch) and the flags to store last. */
  #batchSlot = -1;
  #batchFlags = 0;
  /** The value we last stored in the device area's flags, -1 when unknown (after attach). */
  #deviceFlags = -1;
  /** Results of the last walk. */
  #walkSlots = 0;
  #walkId = 0;

  #views: PackedViews | undefined;
  #translateThrough: GuestMemory | undefined;
  readonly #cacheViews: boolean;
  #indirectBuffer: ArrayBufferLike | undefined;
  #indirectView: DataView | undefined;
  readonly #scratch = new Uint8Array(DESC_SIZE);
  readonly #scratchView = new DataView(this.#scratch.buffer);
  /** See `recordRingDescriptors`. */
  #record: PackedRingRecord | undefined;
  /** Migration: where this queue's writes to its ring and device area are logged (`setDirtyLog`), or undefined. */
  #log: DirtyLog | undefined;

  /**
   * Checks the size and the areas' alignment (`VIRTIO_QUEUE_SIZE_INVALID`, `VIRTIO_RING_MISALIGNED`,
   * `VIRTIO_RING_UNMAPPED` for a negative or unrepresentable address). Memory is checked by `attach`.
   */
  constructor(config: PackedQueueConfig) {
    const { size } = config;
    if (!isValidPackedQueueSize(size)) {
      throw new VirtioError('VIRTIO_QUEUE_SIZE_INVALID', `packed queue size ${size} is not an integer in 1..${MAX_PACKED_QUEUE_SIZE}`);
    }
    checkRingAddress(config.descAddr, descTableSize(size), DESC_ALIGN, 'descriptor ring');
    checkRingAddress(config.driverAddr, PACKED_EVENT_SIZE, PACKED_EVENT_ALIGN, 'driver event suppression area');
    checkRingAddress(config.deviceAddr, PACKED_EVENT_SIZE, PACKED_EVENT_ALIGN, 'device event suppression area');
    this.size = size;
    this.descAddr = config.descAddr;
    this.driverAddr = config.driverAddr;
    this.deviceAddr = config.deviceAddr;
    this.eventIdx = config.eventIdx;
    this.indirect = config.indirect;
    this.maxChainLength = Math.max(size, MIN_CHAIN_BUDGET);
    this.#period = 2 * size;
    this.#slots = new Uint16Array(size);
    this.#popStack = new Uint16Array(size);
    this.#cacheViews = config.cacheViews ?? true;
  }

  /** Resolves the three areas in `mem` (each inside one region, else `VIRTIO_RING_UNMAPPED`). Keeps the positions. */
  attach(mem: GuestMemory): void {
    this.#views = this.#resolve(mem);
    this.#translateThrough = this.#cacheViews ? undefined : mem;
    this.#indirectBuffer = undefined;
    this.#indirectView = undefined;
    this.#deviceFlags = -1;
  }

  #resolve(mem: GuestMemory): PackedViews {
    const d = resolveRing(mem, this.descAddr, descTableSize(this.size), DESC_ALIGN, 2, 'descriptor ring');
    const dr = resolveRing(mem, this.driverAddr, PACKED_EVENT_SIZE, PACKED_EVENT_ALIGN, 2, 'driver event suppression area');
    const dv = resolveRing(mem, this.deviceAddr, PACKED_EVENT_SIZE, PACKED_EVENT_ALIGN, 2, 'device event suppression area');
    return {
      desc: new DataView(d.buffer),
      descBase: d.byteOffset,
      descU16: new Uint16Array(d.buffer, d.byteOffset, d.length >>> 1),
      driverU16: new Uint16Array(dr.buffer, dr.byteOffset, 2),
      deviceU16: new Uint16Array(dv.buffer, dv.byteOffset, 2),
    };
  }

  /** Drops the views (before the memory they point into is unmapped). */
  detach(): void {
    this.#views = undefined;
    this.#translateThrough = undefined;
    this.#indirectBuffer = undefined;
    this.#indirectView = undefined;
  }

  get attached(): boolean {
    return this.#views !== undefined;
  }

  createChain(): DescriptorChain {
    return new DescriptorChain(this.maxChainLength);
  }

  /** The next used position, `index | wrap << 15` (including used descriptors pushed but not yet published). */
  get usedPosition(): number {
    return packedPosition(this.#used, this.size);
  }

  /** Ring slots held by chains popped and not yet completed. */
  get inFlightSlots(): number {
    return this.#inFlightSlots;
  }

  /** Chains popped and not yet completed. */
  get inFlightChains(): number {
    return this.#inFlightChains;
  }

  /**
   * SET_VRING_BASE: resume at `base` (`index | wrap << 15`). The used position is the same: the ring was stopped
   * with nothing in flight (GET_VRING_BASE drains first), and DPDK's frontend sends no used half at all
   * (vhost-user-next.md §4.2). Forgets everything in flight. `VIRTIO_PACKED_BASE_INVALID` when index >= size.
   */
  resume(base: number): void {
    checkU16(base, 'packed ring base');
    if ((base & 0x7fff) >= this.size) {
      throw new VirtioError(
        'VIRTIO_PACKED_BASE_INVALID',
        `packed ring base 0x${base.toString(16)}: index ${base & 0x7fff} is not below the queue size ${this.size}`,
      );
    }
    const l = packedLinear(base, this.size);
    this.#avail = l;
    this.#used = l;
    this.#publishedUsed = l;
    this.#publishedSinceCheck = 0;
    this.#pushedSincePublish = 0;
    this.#seenAvail = l;
    this.#slots.fill(0);
    this.#inFlightSlots = 0;
    this.#inFlightChains = 0;
    this.#popDepth = 0;
    this.#batchSlot = -1;
  }

  /** Packed rings keep no used index in guest memory: nothing to resync to. */
  resyncToUsed(): number {
    return -1;
  }

  /**
   * Logs every later write of this queue into guest memory (used descriptors in the ring, the device event area) in
   * `log` by their guest-physical addresses, each after the write; undefined stops logging. A packed ring has no used
   * ring, so vhost-user's `log_guest_addr` (QEMU puts the device area's GPA there) is not used: the descriptor ring is
   * logged where it is. Buffers are the device's to log (queue/written-buffers.ts).
   */
  setDirtyLog(log: DirtyLog | undefined): void {
    this.#log = log;
  }

  /** Logs `count` ring slots from position `at` (wrapping at the ring's end). */
  #logSlots(log: DirtyLog, at: number, count: number): void {
    logRingEntries(log, this.descAddr, DESC_SIZE, this.size, at < this.size ? at : at - this.size, count);
  }

  /**
   * From now on every `popChain` keeps the ring descriptors it read in the returned record (inflight tracking).
   * A chain in the ring takes at most `size` slots, so the record holds `size` descriptors.
   */
  recordRingDescriptors(): PackedRingRecord {
    this.#record ??= new PackedRingRecord(this.size);
    return this.#record;
  }

  /**
   * Restart with chains in flight (inflight tracking): writes `chains` (ring descriptors as the driver wrote them,
   * oldest first) back into the ring from `position` (`index | wrap << 15`, the used position), each descriptor's
   * AVAIL / USED bits set to "available" for the lap of the slot it lands in, then resumes at `position`. The next
   * `popChain`s take exactly these chains again, validated like any chain, and then what the driver made available
   * after them. The slots are the device's: the driver made them available and reads them only once they are used
   * at its next used position, which is `position`. `RangeError` when the chains take more than `size` slots.
   */
  restoreInFlight(position: number, chains: readonly (readonly PackedRingDescriptor[])[]): void {
    const v = this.#ring();
    let at = this.#checkPosition(position, 'restore');
    let total = 0;
    for (const c of chains) total += c.length;
    if (total > this.size) throw new RangeError(`chains of ${total} ring descriptors do not fit a ring of ${this.size}`);
    for (const c of chains) {
      if (c.length === 0) throw new RangeError('a chain has at least one descriptor');
      for (const d of c) {
        const wrap = at < this.size;
        const slot = wrap ? at : at - this.size;
        const off = v.descBase + DESC_SIZE * slot;
        v.desc.setUint32(off, Number(BigInt.asUintN(32, d.addr)), true);
        v.desc.setUint32(off + 4, Number(BigInt.asUintN(32, d.addr >> 32n)), true);
        v.desc.setUint32(off + D_LEN, d.len, true);
        v.desc.setUint16(off + D_ID, d.id, true);
        Atomics.store(v.descU16, 8 * slot + FLAGS_WORD, le16(packedAvailableFlags(d.flags, wrap)));
        at = advance(at, 1, this.#period);
      }
    }
    if (this.#log !== undefined) this.#logSlots(this.#log, this.#checkPosition(position, 'restore'), total);
    this.resume(position);
  }

  /** The `flags` of ring slot `slot` (an atomic load; for inflight recovery). */
  ringFlags(slot: number): number {
    return le16(Atomics.load(this.#ring().descU16, 8 * this.#checkSlot(slot) + FLAGS_WORD));
  }

  /** Stores the `flags` of ring slot `slot` (an atomic store; for inflight recovery). */
  setRingFlags(slot: number, flags: number): void {
    checkU16(flags, 'flags');
    Atomics.store(this.#ring().descU16, 8 * this.#checkSlot(slot) + FLAGS_WORD, le16(flags));
    this.#log?.mark(this.descAddr + DESC_SIZE * slot, DESC_SIZE);
  }

  #checkSlot(slot: number): number {
    if (!Number.isInteger(slot) || slot < 0 || slot >= this.size) throw new RangeError(`ring slot ${slot} is not below the queue size ${this.size}`);
    return slot;
  }

  /** GET_VRING_BASE: the next avail position, `index | wrap << 15`. */
  getBase(): number {
    return packedPosition(this.#avail, this.size);
  }

  /**
   * Where the device has seen the ring: past the last chain `popChain` took, or the position a `popChain` found
   * empty (`unpop` does not move it back). A device short of buffers waits for the descriptor at this position
   * (`enableNotification(seenAvailIdx)`, `availableSince(seenAvailIdx)`).
   */
  get seenAvailIdx(): number {
    return packedPosition(this.#seenAvail, this.size);
  }

  hasAvailable(): boolean {
    return this.#availableAt(this.#ring(), this.#avail);
  }

  /** Whether the descriptor at position `seen` is available (a fresh read of its flags). */
  availableSince(seen: number): boolean {
    return this.#availableAt(this.#ring(), this.#checkPosition(seen, 'seen'));
  }

  /**
   * Pops the next available chain into `chain` (capacity at least `maxChainLength`), validating every descriptor.
   * Returns false when the descriptor at the avail position is not available (`chain` untouched). On a `VirtioError`
   * nothing is consumed and `chain` is left cleared. `chain.head` is the buffer id.
   */
  popChain(mem: GuestMemory, chain: DescriptorChain): boolean {
    const v = this.#ring();
    if (chain.capacity < this.maxChainLength) {
      throw new RangeError(`chain capacity ${chain.capacity} is below the queue's maxChainLength ${this.maxChainLength}`);
    }
    let found: boolean;
    try {
      found = this.#walk(mem, v, chain);
    } catch (err) {
      chain.clear(); // no half-filled chain escapes
      throw err;
    }
    if (!found) {
      this.#seenAvail = this.#avail;
      return false;
    }
    const id = this.#walkId;
    const slots = this.#walkSlots;
    this.#slots[id] = slots;
    this.#inFlightSlots += slots;
    this.#inFlightChains++;
    this.#avail = advance(this.#avail, slots, this.#period);
    this.#seenAvail = this.#avail;
    this.#popStack[this.#popTop] = id;
    this.#popTop = advance(this.#popTop, 1, this.size);
    if (this.#popDepth < this.size) this.#popDepth++;
    return true;
  }

  /**
   * Gives back the chain popped last (repeatable: the one popped before it next, and so on), e.g. when the device
   * needs more buffers at once than the ring holds now. Rewinds the avail position (and wrap counter) by the
   * chain's slots. Only chains popped and not completed can be given back, last popped first (`RangeError`
   * otherwise). `seenAvailIdx` stays where it was.
   */
  unpop(): void {
    if (this.#popDepth === 0) throw new RangeError('unpop: no popped chain to give back');
    const top = (this.#popTop - 1 + this.size) % this.size;
    const id = this.#popStack[top] as number;
    const slots = this.#slots[id] as number;
    if (slots === 0) throw new RangeError(`unpop: the chain popped last (id ${id}) was already completed`);
    this.#popTop = top;
    this.#popDepth--;
    this.#slots[id] = 0;
    this.#inFlightSlots -= slots;
    this.#inFlightChains--;
    this.#avail = (this.#avail - slots + this.#period) % this.#period;
  }

  /**
   * Writes the used descriptor of chain `head` (its buffer id) with `len` bytes written, at the next used position,
   * and moves that position on by the chain's slots. Not visible to the driver until `publishUsed`. Any order.
   */
  pushUsed(head: number, len: number): void {
    const v = this.#ring();
    if (!Number.isInteger(head) || head < 0 || head >= this.size) {
      throw new RangeError(`used id ${head} is not a buffer id of a queue of size ${this.size}`);
    }
    const slots = this.#slots[head] as number;
    if (slots === 0) throw new RangeError(`used id ${head} is not in flight`);
    if (!Number.isInteger(len) || len < 0 || len > 0xffff_ffff) throw new RangeError(`used length ${len} is not a u32`);
    const at = this.#used;
    const wrap = at < this.size;
    const slot = wrap ? at : at - this.size;
    const off = v.descBase + DESC_SIZE * slot;
    // Plain stores of len and id (addr is unused in a used descriptor, §2.8.4): made visible by the release store of
    // this descriptor's flags below, or of the batch's first flags in publishUsed.
    v.desc.setUint32(off + D_LEN, len, true);
    v.desc.setUint16(off + D_ID, head, true);
    // AVAIL = USED = our wrap counter marks it used (§2.8.1); WRITE says len is meaningful (§2.8.3).
    const flags = (wrap ? VRING_PACKED_DESC_F_AVAIL | VRING_PACKED_DESC_F_USED : 0) | (len > 0 ? VRING_DESC_F_WRITE : 0);
    if (this.#batchSlot < 0) {
      // The first of the batch: its flags are stored last, by publishUsed.
      this.#batchSlot = slot;
      this.#batchFlags = flags;
    } else {
      // A later element: the driver reads it only after it has seen the first one used (it polls its next used
      // position only), so the order among these stores does not matter; each is a release for its own id / len.
      Atomics.store(v.descU16, 8 * slot + FLAGS_WORD, le16(flags));
    }
    this.#slots[head] = 0;
    this.#inFlightSlots -= slots;
    this.#inFlightChains--;
    this.#used = advance(at, slots, this.#period);
    const pushed = this.#pushedSincePublish + slots;
    this.#pushedSincePublish = pushed < this.#period ? pushed : this.#period;
  }

  /** Publishes the batch: stores the flags of its first used descriptor, after everything else of the batch. */
  publishUsed(): void {
    if (this.#batchSlot < 0) return;
    const v = this.#ring();
    // Release: every id / len / flags of the batch written before becomes visible before this. Pairs with the
    // driver's acquire of this flags word (virtqueue_get_buf_ctx_packed: is_used_desc_packed, then virtio_rmb)
    // before it reads id / len and moves on to the next used descriptors.
    Atomics.store(v.descU16, 8 * this.#batchSlot + FLAGS_WORD, le16(this.#batchFlags));
    // The batch's slots run from the last published used position to the current one (a whole lap at most).
    if (this.#log !== undefined) this.#logSlots(this.#log, this.#publishedUsed, Math.min(this.#pushedSincePublish, this.size));
    this.#batchSlot = -1;
    this.#publishedSinceCheck = Math.min(this.#publishedSinceCheck + this.#pushedSincePublish, this.#period);
    this.#pushedSincePublish = 0;
    this.#publishedUsed = this.#used;
  }

  /**
   * Whether the driver wants a used buffer notification for what was published since the last call (§2.8.10), from
   * the driver event suppression area: DISABLE: no; DESC (with VIRTIO_F_RING_EVENT_IDX): when the published used
   * position passed `off_wrap` since the last call; ENABLE (or anything else): yes. False when nothing was published.
   */
  needsNotification(): boolean {
    const v = this.#ring();
    const moved = this.#publishedSinceCheck;
    this.#publishedSinceCheck = 0;
    if (moved === 0) return false;
    // The Atomics.store of the first flags (publishUsed) followed by these Atomics.loads is a full fence. It pairs
    // with the driver's "store off_wrap / flags, mb, re-read the next used descriptor" (virtqueue_enable_cb_prepare
    // _packed + virtqueue_poll_packed): either we read its new event settings or it sees our used descriptor.
    // flags first, then off_wrap: the driver writes off_wrap, virtio_wmb, then flags (as QEMU's
    // vring_packed_event_read reads them), so a DESC read here comes with its off_wrap.
    const flags = le16(Atomics.load(v.driverU16, EV_FLAGS)) & 3;
    if (flags === VRING_PACKED_EVENT_FLAG_DISABLE) return false;
    if (flags !== VRING_PACKED_EVENT_FLAG_DESC || !this.eventIdx) return true; // ENABLE, reserved 3, DESC unnegotiated
    const offWrap = le16(Atomics.load(v.driverU16, EV_OFF_WRAP));
    return packedNeedEvent(this.size, offWrap, this.#publishedUsed, moved);
  }

  /** Asks the driver not to kick: device area flags = DISABLE (also with event idx, as Linux's driver reads it). */
  disableNotification(): void {
    const v = this.#ring();
    // A hint only: a stale value costs one extra kick. Stored only when it changes (Linux's event_flags_shadow).
    this.#storeDeviceFlags(v, VRING_PACKED_EVENT_FLAG_DISABLE);
  }

  /**
   * Asks the driver to kick once it makes the descriptor at `seen` available (default: the avail position): with
   * event idx, device area `off_wrap = seen` then flags DESC; without, flags ENABLE. Then re-reads that descriptor's
   * flags: true means it is available and the caller must process the ring (its kick may never come).
   */
  enableNotification(seen: number = packedPosition(this.#avail, this.size)): boolean {
    const v = this.#ring();
    const at = this.#checkPosition(seen, 'seen');
    if (this.eventIdx) {
      // off_wrap before flags: a driver that reads DESC reads this off_wrap (pairs with its flags-then-off_wrap
      // reads in virtqueue_kick_prepare_packed, which takes both as one 32-bit snapshot).
      Atomics.store(v.deviceU16, EV_OFF_WRAP, le16(seen));
      this.#log?.mark(this.deviceAddr, PACKED_EVENT_SIZE);
      this.#storeDeviceFlags(v, VRING_PACKED_EVENT_FLAG_DESC);
    } else {
      this.#storeDeviceFlags(v, VRING_PACKED_EVENT_FLAG_ENABLE);
    }
    // Store(s) above then this load, all SC: a full fence (the device half of the race; the driver's half is the
    // barrier §2.8 "Sending Available Buffer Notifications" requires). The driver exposes a descriptor (release
    // store of its flags), then (virtio_mb) reads our area. Either it reads our new area and kicks, or its flags
    // store precedes our load in the total order and we see the descriptor here. When the flags store was skipped
    // (the area already held that value), the earlier store of it precedes this load all the same.
    return this.#availableAt(v, at);
  }

  #storeDeviceFlags(v: PackedViews, flags: number): void {
    if (this.#deviceFlags === flags) return;
    Atomics.store(v.deviceU16, EV_FLAGS, le16(flags));
    this.#log?.mark(this.deviceAddr, PACKED_EVENT_SIZE);
    this.#deviceFlags = flags;
  }

  #ring(): PackedViews {
    if (this.#translateThrough !== undefined) return this.#resolve(this.#translateThrough);
    const v = this.#views;
    if (v === undefined) {
      throw new VhostError('VHOST_QUEUE_NOT_ATTACHED', 'the queue has no ring views: call attach(mem) first');
    }
    return v;
  }

  /** Validates an encoded position from the caller and returns it linear. */
  #checkPosition(pos: number, what: string): number {
    checkU16(pos, what);
    if ((pos & 0x7fff) >= this.size) throw new RangeError(`${what} position index ${pos & 0x7fff} is not below the queue size ${this.size}`);
    return packedLinear(pos, this.size);
  }

  /** Whether the descriptor at linear position `at` is available for that position's wrap counter. */
  #availableAt(v: PackedViews, at: number): boolean {
    const wrap = at < this.size;
    const slot = wrap ? at : at - this.size;
    // Acquire; pairs with the driver's release store of the flags (after virtio_wmb in virtqueue_add_packed).
    return isPackedAvailable(le16(Atomics.load(v.descU16, 8 * slot + FLAGS_WORD)), wrap);
  }

  #viewOf(buffer: ArrayBufferLike): DataView {
    if (buffer !== this.#indirectBuffer || this.#indirectView === undefined) {
      this.#indirectBuffer = buffer;
      this.#indirectView = new DataView(buffer);
    }
    return this.#indirectView;
  }

  /**
   * Walks the chain at the avail position into `chain`; sets `#walkSlots` / `#walkId`. Returns false when its first
   * descriptor is not available. Changes no queue state.
   */
  #walk(mem: GuestMemory, v: PackedViews, chain: DescriptorChain): boolean {
    const size = this.size;
    const start = this.#avail;
    // Slots the device may take: those it does not hold in flight. A chain running past them runs over its own.
    const room = size - this.#inFlightSlots;
    const budget = this.maxChainLength;
    let at = start;
    let slots = 0;
    let total = 0;
    let seenWritable = false;
    for (;;) {
      const wrap = at < size;
      const slot = wrap ? at : at - size;
      const off = v.descBase + DESC_SIZE * slot;
      // Acquire load of the flags, then plain reads of the rest: pairs with the driver's release (virtio_wmb, then
      // the flags store). Every field is read exactly once; only these locals are used below.
      const flags = le16(Atomics.load(v.descU16, 8 * slot + FLAGS_WORD));
      if (!isPackedAvailable(flags, wrap)) {
        if (slots === 0) return false;
        throw ringError('VIRTIO_PACKED_DESC_UNAVAILABLE', start, size, slot,
          `is not available (flags 0x${flags.toString(16)}, wrap counter ${wrap ? 1 : 0}) but the descriptor before it has NEXT`);
      }
      if (slots >= room) {
        throw ringError('VIRTIO_DESC_LOOP', start, size, slot,
          `would be slot ${slots + 1} of a chain with ${room} free slots: it runs round the ring onto slots in flight`);
      }
      if (slots === 0) chain.clear();
      const addrLo = v.desc.getUint32(off, true);
      const addrHi = v.desc.getUint32(off + 4, true);
      const len = v.desc.getUint32(off + D_LEN, true);
      const id = v.desc.getUint16(off + D_ID, true);
      const rec = this.#record;
      if (rec !== undefined) {
        rec.addrLo[slots] = addrLo;
        rec.addrHi[slots] = addrHi;
        rec.len[slots] = len;
        rec.id[slots] = id;
        rec.flags[slots] = flags;
        rec.count = slots + 1;
      }
      slots++;
      at = at + 1 === this.#period ? 0 : at + 1;
      // -1 when the address is not below 2^53. Checked together with the length before any use.
      const addr = u64ToAddress(addrLo, addrHi);

      if ((flags & VRING_DESC_F_INDIRECT) !== 0) {
        if (!this.indirect) {
          throw ringError('VIRTIO_INDIRECT_NOT_NEGOTIATED', start, size, slot,
            'has VRING_DESC_F_INDIRECT but VIRTIO_F_INDIRECT_DESC was not negotiated');
        }
        if (slots > 1) {
          throw ringError('VIRTIO_PACKED_INDIRECT_IN_CHAIN', start, size, slot,
            'has VRING_DESC_F_INDIRECT inside a list linked by VRING_DESC_F_NEXT');
        }
        if ((flags & VRING_DESC_F_NEXT) !== 0) {
          throw ringError('VIRTIO_INDIRECT_WITH_NEXT', start, size, slot, 'has both VRING_DESC_F_INDIRECT and VRING_DESC_F_NEXT');
        }
        if (len === 0 || len % DESC_SIZE !== 0 || len / DESC_SIZE > MAX_INDIRECT_ENTRIES) {
          throw ringError('VIRTIO_INDIRECT_BAD_LENGTH', start, size, slot,
            `refers to an indirect table of ${len} bytes (must be a non-zero multiple of ${DESC_SIZE}, ` +
              `at most ${MAX_INDIRECT_ENTRIES} entries)`);
        }
        if (len / DESC_SIZE > budget) {
          throw ringError('VIRTIO_CHAIN_TOO_LONG', start, size, slot,
            `refers to an indirect table of ${len / DESC_SIZE} entries; a chain holds at most ${budget}`);
        }
        if (addr < 0 || addr > ADDRESS_LIMIT - len) {
          throw ringError('VIRTIO_DESC_ADDRESS_INVALID', start, size, slot, badRange(addrLo, addrHi, len));
        }
        this.#walkIndirect(mem, chain, start, slot, addr, len / DESC_SIZE);
        chain.indirect = true;
        this.#walkSlots = 1;
        this.#walkId = this.#checkId(start, slot, id);
        chain.head = this.#walkId;
        return true;
      }

      if (addr < 0 || addr > ADDRESS_LIMIT - len) {
        throw ringError('VIRTIO_DESC_ADDRESS_INVALID', start, size, slot, badRange(addrLo, addrHi, len));
      }
      if (chain.count >= budget) {
        throw ringError('VIRTIO_CHAIN_TOO_LONG', start, size, slot, `would be descriptor number ${budget + 1}; a chain holds at most ${budget}`);
      }
      total += len;
      if (total > MAX_CHAIN_BYTES) {
        throw ringError('VIRTIO_CHAIN_TOO_LONG', start, size, slot, 'takes the chain past 2^32 - 1 bytes in total');
      }
      const writable = (flags & VRING_DESC_F_WRITE) !== 0;
      if (writable) {
        seenWritable = true;
      } else if (seenWritable) {
        throw ringError('VIRTIO_WRITABLE_BEFORE_READABLE', start, size, slot, 'is device-readable but follows a device-writable descriptor');
      }
      chain.push(addr, len, writable);
      if ((flags & VRING_DESC_F_NEXT) === 0) {
        // The buffer id is in the last descriptor of the list (§2.8.6).
        this.#walkSlots = slots;
        this.#walkId = this.#checkId(start, slot, id);
        chain.head = this.#walkId;
        return true;
      }
    }
  }

  /** Reads the `entries` descriptors of an indirect table at `addr` into `chain` (§2.8.7). */
  #walkIndirect(mem: GuestMemory, chain: DescriptorChain, start: number, ringSlot: number, addr: number, entries: number): void {
    const len = entries * DESC_SIZE;
    let table: DataView;
    let base = 0;
    let crossing = false;
    // One view for the whole table when it lies in one region (throws GUEST_MEMORY_UNMAPPED if its start is not
    // mapped); entry by entry through a scratch copy when it crosses into another region.
    const r = mem instanceof MemoryTable ? mem.findRegion(addr) : undefined;
    let tv: Uint8Array;
    if (r !== undefined && addr + len <= r.gpa + r.size) {
      table = this.#viewOf(r.buffer);
      base = r.bufferOffset + (addr - r.gpa);
    } else if ((tv = mem.view(addr, len)).length === len) {
      table = this.#viewOf(tv.buffer);
      base = tv.byteOffset;
    } else {
      table = this.#scratchView;
      crossing = true;
    }
    let total = 0;
    let seenWritable = false;
    for (let i = 0; i < entries; i++) {
      let off: number;
      if (crossing) {
        copyFromGuest(mem, addr + DESC_SIZE * i, this.#scratch, 0, DESC_SIZE);
        off = 0;
      } else {
        off = base + DESC_SIZE * i;
      }
      // Each field read once into locals (the table is guest memory the driver may change under us).
      const addrLo = table.getUint32(off, true);
      const addrHi = table.getUint32(off + 4, true);
      const dlen = table.getUint32(off + D_LEN, true);
      const flags = table.getUint16(off + 14, true);
      // Only WRITE is valid in table entries; NEXT (and the id) are reserved and ignored (§2.8.7). INDIRECT would be
      // a table in a table, which this device does not follow.
      if ((flags & VRING_DESC_F_INDIRECT) !== 0) {
        throw indirectError('VIRTIO_INDIRECT_NESTED', start, this.size, ringSlot, i, 'refers to a nested indirect table');
      }
      const a = u64ToAddress(addrLo, addrHi);
      if (a < 0 || a > ADDRESS_LIMIT - dlen) {
        throw indirectError('VIRTIO_DESC_ADDRESS_INVALID', start, this.size, ringSlot, i, badRange(addrLo, addrHi, dlen));
      }
      total += dlen;
      if (total > MAX_CHAIN_BYTES) {
        throw indirectError('VIRTIO_CHAIN_TOO_LONG', start, this.size, ringSlot, i, 'takes the chain past 2^32 - 1 bytes in total');
      }
      const writable = (flags & VRING_DESC_F_WRITE) !== 0;
      if (writable) {
        seenWritable = true;
      } else if (seenWritable) {
        throw indirectError('VIRTIO_WRITABLE_BEFORE_READABLE', start, this.size, ringSlot, i,
          'is device-readable but follows a device-writable descriptor');
      }
      chain.push(a, dlen, writable);
    }
  }

  /** Checks a chain's buffer id: below the size and not in flight. */
  #checkId(start: number, slot: number, id: number): number {
    if (id >= this.size) {
      throw ringError('VIRTIO_PACKED_ID_OUT_OF_RANGE', start, this.size, slot, `has buffer id ${id}, queue size is ${this.size}`);
    }
    if (this.#slots[id] !== 0) {
      throw ringError('VIRTIO_PACKED_ID_IN_FLIGHT', start, this.size, slot,
        `has buffer id ${id}, which is still in flight (made available again before the device used it)`);
    }
    return id;
  }
}

/** Whether descriptor `flags` mark it available for the wrap counter `wrap` (AVAIL == wrap, USED != wrap). */
export function isPackedAvailable(flags: number, wrap: boolean): boolean {
  return ((flags & VRING_PACKED_DESC_F_AVAIL) !== 0) === wrap && ((flags & VRING_PACKED_DESC_F_USED) !== 0) !== wrap;
}

/** `flags` with its AVAIL / USED bits set to mark the descriptor available for the wrap counter `wrap` (§2.8.1). */
export function packedAvailableFlags(flags: number, wrap: boolean): number {
  return (flags & ~(VRING_PACKED_DESC_F_AVAIL | VRING_PACKED_DESC_F_USED)) | (wrap ? VRING_PACKED_DESC_F_AVAIL : VRING_PACKED_DESC_F_USED);
}

function where(start: number, size: number): string {
  const wrap = start < size;
  return `chain at slot ${wrap ? start : start - size} (wrap ${wrap ? 1 : 0})`;
}

/** A chain error naming the chain's start and the ring slot at fault (strings built only when thrown). */
function ringError(code: `VIRTIO_${string}`, start: number, size: number, slot: number, problem: string): VirtioError {
  return new VirtioError(code, `${where(start, size)}: descriptor at slot ${slot} ${problem}`);
}

function indirectError(code: `VIRTIO_${string}`, start: number, size: number, ringSlot: number, i: number, problem: string): VirtioError {
  return new VirtioError(code, `${where(start, size)}: indirect entry ${i} (table at slot ${ringSlot}) ${problem}`);
}

function badRange(addrLo: number, addrHi: number, len: number): string {
  const a = addrHi === 0 ? addrLo.toString(16) : addrHi.toString(16) + addrLo.toString(16).padStart(8, '0');
  return `has buffer 0x${a} + ${len} bytes, which does not end at or below 2^53`;
}

/**
 * The device side of a split virtqueue (VIRTIO 1.2 §2.7), in the style of rust-vmm's virtio-queue: the queue holds
 * ring addresses, indices and the views it resolved, guest memory is a parameter of the operations that touch
 * buffers, and every driver error is a `VirtioError` with a stable code.
 *
 * ## Memory model
 *
 * The device runs in a worker thread over guest memory (a `SharedArrayBuffer` over a memfd) that the guest writes
 * concurrently from another process.
 *
 * - The four ring indices (`avail.idx`, `used.idx`, `used_event`, `avail_event`) and the two flag words are accessed
 *   with `Atomics.load` / `Atomics.store` on a `Uint16Array`. JS atomics are sequentially consistent, so a load is at
 *   least an acquire, a store at least a release, and a store followed by a load is a full fence (Linux `smp_mb()`).
 *   Each access below says what it pairs with on the driver side (Linux `drivers/virtio/virtio_ring.c`).
 * - Descriptors, avail ring entries and used elements use plain `DataView` accesses, ordered by those atomics.
 * - Every descriptor is copied into locals once per visit, and only the locals are validated and used: nothing is
 *   fetched twice from guest memory (double fetch, DPDK CVE-2020-14375).
 *
 * ## Bounds
 *
 * - Queue size: a power of two in 1..32768 (`VIRTIO_QUEUE_SIZE_INVALID`).
 * - A chain holds at most `maxChainLength = max(size, 1024)` data descriptors, direct and indirect together
 *   (`VIRTIO_CHAIN_TOO_LONG`), and at most 2^32 - 1 bytes (`VIRTIO_CHAIN_TOO_LONG`).
 * - Loops are caught by a time-to-live: at most `size` descriptors are visited in the descriptor table and at most
 *   `entries` in an indirect table (`VIRTIO_DESC_LOOP`).
 * - An indirect table holds 1..65536 entries (`VIRTIO_INDIRECT_BAD_LENGTH`). One that lies in one memory region
 *   (the usual case) is read through a single view; one that crosses a region boundary is read descriptor by
 *   descriptor through `GuestMemory.view` (each 16-byte entry copied into a scratch buffer), so a table is valid
 *   exactly when the entries the chain visits are mapped (libvhost-user also accepts such tables, by copying them).
 *
 * ## Error codes (all `VirtioError`)
 *
 * `VIRTIO_QUEUE_SIZE_INVALID`, `VIRTIO_RING_MISALIGNED`, `VIRTIO_RING_UNMAPPED` (setup); `VIRTIO_AVAIL_INDEX_INVALID`,
 * `VIRTIO_DESC_INDEX_OUT_OF_RANGE` (head or next), `VIRTIO_DESC_LOOP`, `VIRTIO_DESC_ADDRESS_INVALID` (address >= 2^53
 * or address + length > 2^53), `VIRTIO_INDIRECT_NOT_NEGOTIATED`, `VIRTIO_INDIRECT_NESTED`, `VIRTIO_INDIRECT_WITH_NEXT`,
 * `VIRTIO_INDIRECT_BAD_LENGTH`, `VIRTIO_CHAIN_TOO_LONG` (descriptors or bytes), `VIRTIO_WRITABLE_BEFORE_READABLE`,
 * and `GUEST_MEMORY_UNMAPPED` from `GuestMemory.view` when an indirect table is not mapped. Programming errors (bad
 * arguments from the device code) are `RangeError`s; using the queue before `attach` is `VHOST_QUEUE_NOT_ATTACHED`.
 *
 * After a `VirtioError` the queue state is unchanged (the failing chain is not consumed); the caller is expected to
 * stop the queue and mark the device as needing reset.
 *
 * @example The canonical processing loop (as in rust-vmm's `Queue` docs):
 * ```ts
 * const chain = queue.createChain();
 * do {
 *   queue.disableNotification();
 *   while (queue.popChain(mem, chain)) {
 *     const len = handle(mem, chain);   // reads the readable segments, writes the writable ones
 *     queue.addUsed(chain.head, len);
 *     if (queue.needsNotification()) callFd.notify();
 *   }
 * } while (queue.enableNotification());
 * ```
 */
import type { DeviceQueue } from './device-queue.js';
import { VhostError, VirtioError } from '../errors.js';
import { u64ToAddress, type GuestMemory } from '../memory/guest-memory.js';
import type { DirtyLog } from '../memory/dirty-log.js';
import { MemoryTable } from '../memory/memory-table.js';
import {
  AVAIL_ALIGN,
  DESC_ALIGN,
  DESC_SIZE,
  MAX_CHAIN_BYTES,
  MAX_INDIRECT_ENTRIES,
  MAX_QUEUE_SIZE,
  MIN_CHAIN_BUDGET,
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
import { copyFromGuest, DescriptorChain } from './descriptor-chain.js';
import { ADDRESS_LIMIT, checkRingAddress, le16, logRingEntries, resolveRing } from './ring-access.js';

/** Configuration of a split virtqueue, as set by SET_VRING_NUM, SET_VRING_ADDR and the negotiated features. */
export interface SplitQueueConfig {
  /** Queue size (number of descriptors): a power of two in 1..32768. */
  readonly size: number;
  /** Guest-physical address of the descriptor table (16-byte aligned). -1 stands for an unrepresentable address. */
  readonly descAddr: number;
  /** Guest-physical address of the available ring (2-byte aligned). */
  readonly availAddr: number;
  /** Guest-physical address of the used ring (4-byte aligned). */
  readonly usedAddr: number;
  /** VIRTIO_F_EVENT_IDX (bit 29) was negotiated. */
  readonly eventIdx: boolean;
  /** VIRTIO_F_INDIRECT_DESC (bit 28) was negotiated. */
  readonly indirect: boolean;
  /**
   * false: keep no ring views between accesses; every ring access translates the ring's address through the
   * memory given to `attach` again, with its bounds checks (the copy_from_user / rust-vmm shape, `--sync copy`).
   * Default true: views are resolved once by `attach` and indexed directly.
   */
  readonly cacheViews?: boolean;
}

/** Returns true when `size` is a valid split queue size: a power of two in 1..32768. */
export function isValidQueueSize(size: number): boolean {
  return Number.isInteger(size) && size >= 1 && size <= MAX_QUEUE_SIZE && (size & (size - 1)) === 0;
}

function checkU16(value: number, what: string): void {
  if (!Number.isInteger(value) || value < 0 || value > 0xffff) throw new RangeError(`${what} must be a u16, got ${value}`);
}

/** Views over the three ring areas, resolved by `attach`. */
interface RingViews {
  /** Descriptor table: `DataView` over the region's buffer, table at byte `descBase`. */
  readonly desc: DataView;
  readonly descBase: number;
  /** Available ring as u16 words: [0] flags, [1] idx, [2 + i] ring[i], [2 + size] used_event. Atomic accesses only. */
  readonly availU16: Uint16Array;
  /** Available ring as bytes for plain little-endian reads of ring entries. */
  readonly avail: DataView;
  readonly availBase: number;
  /** Used ring as u16 words: [0] flags, [1] idx, [2 + 4 * size] avail_event. Atomic accesses only. */
  readonly usedU16: Uint16Array;
  /** Used ring as bytes for plain little-endian writes of used elements. */
  readonly used: DataView;
  readonly usedBase: number;
}

/** The device side of a split virtqueue. See the module documentation for the memory model and bounds. */
export class SplitQueue implements DeviceQueue {
  /** Queue size. */
  readonly size: number;
  readonly descAddr: number;
  readonly availAddr: number;
  readonly usedAddr: number;
  /** VIRTIO_F_EVENT_IDX negotiated. */
  readonly eventIdx: boolean;
  /** VIRTIO_F_INDIRECT_DESC negotiated. */
  readonly indirect: boolean;
  /** Most data descriptors a chain may hold: `max(size, 1024)`. A `DescriptorChain` passed in needs this capacity. */
  readonly maxChainLength: number;

  readonly #mask: number;
  /** u16 index into the avail ring of the next chain to pop (`last_avail_idx`). */
  #lastAvailIdx = 0;
  /** Last validated value of avail.idx; refreshed when `#lastAvailIdx` catches up with it. */
  #shadowAvailIdx = 0;
  /** u16 index of the next used element to write (includes elements written but not yet published). */
  #usedIdx = 0;
  /** u16 value of used.idx last stored to the ring. */
  #publishedUsedIdx = 0;
  /** Event idx: the used index at the last `needsNotification` (Linux `signalled_used`), valid after the first call. */
  #signalledUsed = 0;
  #signalledUsedValid = false;
  /** The value this device last stored in used.flags (the device owns that word). */
  #usedFlags = 0;
  #views: RingViews | undefined;
  /** Migration: where this queue's writes to its used ring are logged (`setDirtyLog`), or undefined. */
  #log: DirtyLog | undefined;
  /** Guest-physical address the used ring is logged at (vhost-user's `log_guest_addr`). */
  #usedLogAddr = 0;
  /** With `cacheViews: false`, the memory every ring access is translated through. */
  #translateThrough: GuestMemory | undefined;
  readonly #cacheViews: boolean;
  /** A `DataView` over the buffer of the last indirect table read in place, reused while the buffer is the same. */
  #indirectBuffer: ArrayBufferLike | undefined;
  #indirectView: DataView | undefined;
  /** 16-byte scratch for indirect entries that cross a region boundary. */
  readonly #scratch = new Uint8Array(DESC_SIZE);
  readonly #scratchView = new DataView(this.#scratch.buffer);

  /**
   * Checks the size and the ring addresses' alignment (`VIRTIO_QUEUE_SIZE_INVALID`, `VIRTIO_RING_MISALIGNED`,
   * `VIRTIO_RING_UNMAPPED` for a negative or unrepresentable address). Memory is checked by `attach`.
   */
  constructor(config: SplitQueueConfig) {
    const { size } = config;
    if (!isValidQueueSize(size)) {
      throw new VirtioError('VIRTIO_QUEUE_SIZE_INVALID', `queue size ${size} is not a power of two in 1..${MAX_QUEUE_SIZE}`);
    }
    checkRingAddress(config.descAddr, descTableSize(size), DESC_ALIGN, 'descriptor table');
    checkRingAddress(config.availAddr, availRingSize(size), AVAIL_ALIGN, 'available ring');
    checkRingAddress(config.usedAddr, usedRingSize(size), USED_ALIGN, 'used ring');
    this.size = size;
    this.descAddr = config.descAddr;
    this.availAddr = config.availAddr;
    this.usedAddr = config.usedAddr;
    this.eventIdx = config.eventIdx;
    this.indirect = config.indirect;
    this.maxChainLength = Math.max(size, MIN_CHAIN_BUDGET);
    this.#mask = size - 1;
    this.#cacheViews = config.cacheViews ?? true;
  }

  /**
   * Resolves the three ring areas in `mem` into views (again after a memory table change). Each area must lie inside
   * one memory region (`VIRTIO_RING_UNMAPPED`). Does not read or write guest memory, and keeps the indices.
   */
  attach(mem: GuestMemory): void {
    this.#views = this.#resolve(mem);
    this.#translateThrough = this.#cacheViews ? undefined : mem;
    this.#indirectBuffer = undefined;
    this.#indirectView = undefined;
  }

  #resolve(mem: GuestMemory): RingViews {
    const size = this.size;
    const d = resolveRing(mem, this.descAddr, descTableSize(size), DESC_ALIGN, 1, 'descriptor table');
    const a = resolveRing(mem, this.availAddr, availRingSize(size), AVAIL_ALIGN, 2, 'available ring');
    const u = resolveRing(mem, this.usedAddr, usedRingSize(size), USED_ALIGN, 2, 'used ring');
    return {
      desc: new DataView(d.buffer),
      descBase: d.byteOffset,
      availU16: new Uint16Array(a.buffer, a.byteOffset, a.length >>> 1),
      avail: new DataView(a.buffer),
      availBase: a.byteOffset,
      usedU16: new Uint16Array(u.buffer, u.byteOffset, u.length >>> 1),
      used: new DataView(u.buffer),
      usedBase: u.byteOffset,
    };
  }

  /**
   * Logs every later write of this queue into its used ring (elements, used.idx, used.flags, avail_event) in `log`,
   * at guest address `usedLogAddr` (vhost-user's `log_guest_addr`, the used ring's GPA for QEMU), each after the
   * write; undefined stops logging. Buffers are the device's to log (queue/written-buffers.ts).
   */
  setDirtyLog(log: DirtyLog | undefined, usedLogAddr: number = this.usedAddr): void {
    this.#log = log;
    this.#usedLogAddr = usedLogAddr;
  }

  /** Drops the ring views (before the memory they point into is unmapped). */
  detach(): void {
    this.#views = undefined;
    this.#translateThrough = undefined;
    this.#indirectBuffer = undefined;
    this.#indirectView = undefined;
  }

  /** True between `attach` and `detach`. */
  get attached(): boolean {
    return this.#views !== undefined;
  }

  /** A chain object with the capacity `popChain` needs for this queue. Allocate once, reuse for every pop. */
  createChain(): DescriptorChain {
    return new DescriptorChain(this.maxChainLength);
  }

  /** Index in the avail ring of the next chain to pop (the value GET_VRING_BASE reports). */
  get lastAvailIdx(): number {
    return this.#lastAvailIdx;
  }

  /** Index of the next used element (including elements pushed but not yet published). */
  get usedIdx(): number {
    return this.#usedIdx;
  }

  /**
   * SET_VRING_BASE: sets the next avail index to process and the next used index (by default the same value, which
   * is right for a fresh queue or one stopped with nothing in flight; after a reconnect pass `ringUsedIdx()`, as
   * libvhost-user does). Resets the event-idx notification tracking.
   */
  setBase(lastAvailIdx: number, usedIdx: number = lastAvailIdx): void {
    checkU16(lastAvailIdx, 'lastAvailIdx');
    checkU16(usedIdx, 'usedIdx');
    this.#lastAvailIdx = lastAvailIdx;
    this.#shadowAvailIdx = lastAvailIdx;
    this.#usedIdx = usedIdx;
    this.#publishedUsedIdx = usedIdx;
    this.#signalledUsedValid = false;
  }

  /** GET_VRING_BASE: the next avail index to process. */
  getBase(): number {
    return this.#lastAvailIdx;
  }

  /** DeviceQueue.resume: avail from SET_VRING_BASE, used from the ring itself (what the driver last saw). */
  resume(base: number): void {
    this.setBase(base, this.ringUsedIdx());
  }

  hasAvailable(): boolean {
    return this.availableCount() > 0;
  }

  resyncToUsed(): number {
    const from = this.#lastAvailIdx;
    if (this.#usedIdx === from) return -1;
    this.setBase(this.#usedIdx, this.#usedIdx);
    return from;
  }

  /**
   * Reads the chain at descriptor `head` into `chain`, validated like any other, without taking an avail entry: a
   * request an inflight region says was taken before a restart (resubmission). `VIRTIO_DESC_INDEX_OUT_OF_RANGE` for
   * a head past the queue; on any `VirtioError` `chain` is left cleared.
   */
  popChainAt(mem: GuestMemory, chain: DescriptorChain, head: number): void {
    const v = this.#ring();
    if (chain.capacity < this.maxChainLength) {
      throw new RangeError(`chain capacity ${chain.capacity} is below the queue's maxChainLength ${this.maxChainLength}`);
    }
    chain.clear();
    if (!Number.isInteger(head) || head < 0 || head >= this.size) {
      throw new VirtioError('VIRTIO_DESC_INDEX_OUT_OF_RANGE', `resubmitted head ${head} is not below the queue size ${this.size}`);
    }
    try {
      this.#walk(mem, v, head, chain);
    } catch (err) {
      chain.clear();
      throw err;
    }
  }

  /** Whether avail.idx moved past `seen` (validated as every avail.idx read). */
  availableSince(seen: number): boolean {
    return ((this.#lastAvailIdx + this.availableCount()) & 0xffff) !== seen;
  }

  /** Reads used.idx from the ring (for resuming after a reconnect). */
  ringUsedIdx(): number {
    const v = this.#ring();
    // Acquire; only meaningful when the queue is stopped (the device is the only writer of used.idx).
    return le16(Atomics.load(v.usedU16, 1));
  }

  /**
   * Number of chains the driver has made available and the device has not popped. Reads avail.idx; throws
   * `VIRTIO_AVAIL_INDEX_INVALID` when it is more than `size` ahead of the last popped index.
   */
  availableCount(): number {
    const v = this.#ring();
    const idx = this.#loadAvailIdx(v);
    return (idx - this.#lastAvailIdx) & 0xffff;
  }

  /**
   * Pops the next available chain into `chain` (whose capacity must be at least `maxChainLength`), validating every
   * descriptor. Returns false when no chain is available (`chain` is then untouched). On a `VirtioError` nothing is
   * consumed and `chain` is left cleared.
   */
  popChain(mem: GuestMemory, chain: DescriptorChain): boolean {
    const v = this.#ring();
    if (chain.capacity < this.maxChainLength) {
      throw new RangeError(`chain capacity ${chain.capacity} is below the queue's maxChainLength ${this.maxChainLength}`);
    }
    if (this.#lastAvailIdx === this.#shadowAvailIdx) {
      let idx: number;
      try {
        idx = this.#loadAvailIdx(v);
      } catch (err) {
        chain.clear();
        throw err;
      }
      if (idx === this.#lastAvailIdx) return false;
    }
    chain.clear();
    const slot = this.#lastAvailIdx & this.#mask;
    // Plain read of avail.ring[slot]: ordered after the Atomics.load of avail.idx in #loadAvailIdx (now or on an
    // earlier call), which pairs with the driver's release (virtio_wmb) between writing ring[slot] and avail.idx.
    const head = v.avail.getUint16(v.availBase + 4 + 2 * slot, true);
    if (head >= this.size) {
      throw new VirtioError(
        'VIRTIO_DESC_INDEX_OUT_OF_RANGE',
        `avail ring entry ${this.#lastAvailIdx} holds head ${head}, queue size is ${this.size}`,
      );
    }
    try {
      this.#walk(mem, v, head, chain);
    } catch (err) {
      chain.clear(); // no half-filled chain escapes
      throw err;
    }
    this.#lastAvailIdx = (this.#lastAvailIdx + 1) & 0xffff;
    return true;
  }

  /**
   * Gives back the chain popped last (Linux `vhost_discard_vq_desc`), e.g. when the device has nowhere to put data
   * yet. Call only right after a successful `popChain`, before completing that chain.
   */
  unpop(): void {
    this.#lastAvailIdx = (this.#lastAvailIdx - 1) & 0xffff;
  }

  /**
   * Writes a used element `{ id: head, len }` without publishing it. A batch of `pushUsed` is made visible to the
   * driver by one `publishUsed`. `len` is the number of bytes written into the chain's writable part.
   */
  pushUsed(head: number, len: number): void {
    const v = this.#ring();
    if (!Number.isInteger(head) || head < 0 || head >= this.size) {
      throw new RangeError(`used head ${head} is not a descriptor index of a queue of size ${this.size}`);
    }
    if (!Number.isInteger(len) || len < 0 || len > 0xffff_ffff) throw new RangeError(`used length ${len} is not a u32`);
    const off = v.usedBase + 4 + USED_ELEM_SIZE * (this.#usedIdx & this.#mask);
    // Plain stores: made visible by the Atomics.store of used.idx in publishUsed.
    v.used.setUint32(off, head, true);
    v.used.setUint32(off + 4, len, true);
    this.#usedIdx = (this.#usedIdx + 1) & 0xffff;
  }

  /** Publishes the used elements pushed so far by storing used.idx. */
  publishUsed(): void {
    const v = this.#ring();
    if (this.#publishedUsedIdx === this.#usedIdx) return;
    // Release: the used elements written above become visible before the new index. Pairs with the driver's
    // acquire (virtio_rmb after reading used.idx in virtqueue_get_buf) before it reads the elements.
    Atomics.store(v.usedU16, 1, le16(this.#usedIdx));
    if (this.#log !== undefined) this.#logPublished(this.#log);
    this.#publishedUsedIdx = this.#usedIdx;
  }

  /** Logs the elements written since the last publication and used.idx (after the store of used.idx). */
  #logPublished(log: DirtyLog): void {
    const count = (this.#usedIdx - this.#publishedUsedIdx) & 0xffff;
    logRingEntries(log, this.#usedLogAddr + 4, USED_ELEM_SIZE, this.size, this.#publishedUsedIdx & this.#mask, count);
    log.mark(this.#usedLogAddr + 2, 2);
  }

  /** Writes one used element and publishes it (`pushUsed` + `publishUsed`). */
  addUsed(head: number, len: number): void {
    this.pushUsed(head, len);
    this.publishUsed();
  }

  /**
   * Whether the driver wants a used buffer notification for the elements published since the last call (§2.7.7).
   * With event idx: `vring_need_event(used_event, published used.idx, used.idx at the last call)`, always true on the
   * first call after `setBase`. Without: true unless the driver set VRING_AVAIL_F_NO_INTERRUPT. Call after
   * `publishUsed`.
   */
  needsNotification(): boolean {
    const v = this.#ring();
    // The Atomics.store of used.idx (publishUsed) followed by these Atomics.loads is a full fence (Linux vhost_notify's
    // smp_mb()). It pairs with the driver's "store used_event (or clear NO_INTERRUPT); mb; re-read used.idx" in
    // virtqueue_enable_cb: either we read the new used_event / flags, or the driver sees our used.idx and does not
    // wait for a notification. Without the fence both could miss each other and the driver would sleep forever.
    if (this.eventIdx) {
      const newIdx = this.#publishedUsedIdx;
      const old = this.#signalledUsed;
      const valid = this.#signalledUsedValid;
      this.#signalledUsed = newIdx;
      this.#signalledUsedValid = true;
      // used_event lives after ring[size] in the avail ring.
      const usedEvent = le16(Atomics.load(v.availU16, 2 + this.size));
      if (!valid) return true;
      return vringNeedEvent(usedEvent, newIdx, old);
    }
    const flags = le16(Atomics.load(v.availU16, 0));
    return (flags & VRING_AVAIL_F_NO_INTERRUPT) === 0;
  }

  /**
   * Asks the driver to send available buffer notifications again (§2.7.10): with event idx, stores avail_event =
   * `lastAvailIdx` (notify when the driver makes anything past what we processed available); without, clears
   * VRING_USED_F_NO_NOTIFY. Then re-reads avail.idx and returns true when chains are available, in which case the
   * caller must process them (the notification for them may never come).
   *
   * `seen` (default: the last popped index) is the avail index the caller has already taken into account: a device
   * that left chains available because it needs more of them at once (a frame spanning several receive buffers)
   * passes the avail index it saw, so that it is notified, and true is returned, only when the driver adds more.
   */
  enableNotification(seen: number = this.#lastAvailIdx): boolean {
    const v = this.#ring();
    if (this.eventIdx) {
      // Release store of avail_event (after ring[size] in the used ring).
      Atomics.store(v.usedU16, 2 + 4 * this.size, le16(seen));
      this.#log?.mark(this.#usedLogAddr + 4 + USED_ELEM_SIZE * this.size, 2);
    } else {
      this.#usedFlags &= ~VRING_USED_F_NO_NOTIFY;
      Atomics.store(v.usedU16, 0, le16(this.#usedFlags));
      this.#log?.mark(this.#usedLogAddr, 2);
    }
    // Store then load, both SC: the full fence of the spec (and rust-vmm's fence(SeqCst)). It closes this race: the
    // driver adds a buffer after our last avail.idx read, then (its own mb) reads avail_event / used.flags while they
    // still said "don't notify", so it does not kick. Either it reads our new value and kicks, or we read its new
    // avail.idx here and return true. Pairs with the driver's virtio_mb() in virtqueue_kick_prepare.
    // The index read here becomes the shadow (checked like every read of avail.idx), so that true always means
    // the next popChain takes a chain or fails: it does not read avail.idx again before it reached this one. Else
    // a driver that moves avail.idx back, or rings laid out so that our own used.flags / avail_event stores land on
    // avail.idx, could make this say "more" and the pop "nothing" forever (found by `npm run fuzz`).
    const availIdx = this.#loadAvailIdx(v);
    return availIdx !== seen;
  }

  /**
   * The avail.idx that `popChain` or `enableNotification` last read: when a pop fails, the chains the device has seen. A device that stops
   * for want of buffers waits for the driver to move avail.idx past this value (`enableNotification(seenAvailIdx)`),
   * not past a fresh read, which may already include buffers it has not tried.
   */
  get seenAvailIdx(): number {
    return this.#shadowAvailIdx;
  }

  /**
   * Asks the driver not to send available buffer notifications while the device is polling the ring. Without event
   * idx, sets VRING_USED_F_NO_NOTIFY. With event idx, does nothing (as Linux and rust-vmm): avail_event stays at the
   * last `enableNotification` value, which the driver passes once, so it kicks at most once more.
   */
  disableNotification(): void {
    if (this.eventIdx) return;
    const v = this.#ring();
    this.#usedFlags |= VRING_USED_F_NO_NOTIFY;
    // A hint only: ordering does not matter for correctness (a stale value costs one extra kick).
    Atomics.store(v.usedU16, 0, le16(this.#usedFlags));
    this.#log?.mark(this.#usedLogAddr, 2);
  }

  #ring(): RingViews {
    if (this.#translateThrough !== undefined) return this.#resolve(this.#translateThrough);
    const v = this.#views;
    if (v === undefined) {
      throw new VhostError('VHOST_QUEUE_NOT_ATTACHED', 'the queue has no ring views: call attach(mem) first');
    }
    return v;
  }

  /** A DataView over `buffer` (an indirect table's), reused while the buffer stays the same. */
  #viewOf(buffer: ArrayBufferLike): DataView {
    if (buffer !== this.#indirectBuffer || this.#indirectView === undefined) {
      this.#indirectBuffer = buffer;
      this.#indirectView = new DataView(buffer);
    }
    return this.#indirectView;
  }

  /** Reads and validates avail.idx, updating the shadow. */
  #loadAvailIdx(v: RingViews): number {
    // Acquire: pairs with the driver's release (virtio_wmb, then the store of avail->idx in virtqueue_add_split /
    // kick_prepare): ring entries and descriptors the driver wrote before the new index are visible to the plain
    // reads that follow.
    const idx = le16(Atomics.load(v.availU16, 1));
    const pending = (idx - this.#lastAvailIdx) & 0xffff;
    if (pending > this.size) {
      throw new VirtioError(
        'VIRTIO_AVAIL_INDEX_INVALID',
        `avail.idx ${idx} is ${pending} entries ahead of the last processed index ${this.#lastAvailIdx} ` +
          `(queue size ${this.size})`,
      );
    }
    this.#shadowAvailIdx = idx;
    return idx;
  }

  /** Walks the chain starting at descriptor `head` into `chain`. */
  #walk(mem: GuestMemory, v: RingViews, head: number, chain: DescriptorChain): void {
    chain.head = head;
    const budget = this.maxChainLength;
    // The table being walked: the descriptor table first, possibly one indirect table after.
    let table: DataView = v.desc;
    let base = v.descBase;
    let tableLen = this.size;
    let ttl = this.size;
    let inIndirect = false;
    /** Indirect table crossing a region boundary: its guest address, entries read one by one (`table` unused). */
    let crossing = false;
    let tableAddr = 0;
    let idx = head;
    let indirectAt = -1; // index in the descriptor table of the descriptor referring to the indirect table
    let total = 0;
    let seenWritable = false;
    let tv: Uint8Array;

    for (;;) {
      if (ttl === 0) throw chainError('VIRTIO_DESC_LOOP', head, inIndirect, idx, indirectAt, 'is visited again (loop)');
      ttl--;

      // Copy the descriptor into locals: each field is read exactly once per visit.
      let d = table;
      let off: number;
      if (crossing) {
        copyFromGuest(mem, tableAddr + DESC_SIZE * idx, this.#scratch, 0, DESC_SIZE);
        d = this.#scratchView;
        off = 0;
      } else {
        off = base + DESC_SIZE * idx;
      }
      const addrLo = d.getUint32(off, true);
      const addrHi = d.getUint32(off + 4, true);
      const len = d.getUint32(off + 8, true);
      const flags = d.getUint16(off + 12, true);
      const next = d.getUint16(off + 14, true);

      // -1 when the address is not below 2^53. Checked together with the length before any use below.
      const addr = u64ToAddress(addrLo, addrHi);

      if ((flags & VRING_DESC_F_INDIRECT) !== 0) {
        if (!this.indirect) {
          throw chainError('VIRTIO_INDIRECT_NOT_NEGOTIATED', head, inIndirect, idx, indirectAt,
            'has VRING_DESC_F_INDIRECT but VIRTIO_F_INDIRECT_DESC was not negotiated');
        }
        if (inIndirect) {
          throw chainError('VIRTIO_INDIRECT_NESTED', head, inIndirect, idx, indirectAt, 'refers to a nested indirect table');
        }
        if ((flags & VRING_DESC_F_NEXT) !== 0) {
          throw chainError('VIRTIO_INDIRECT_WITH_NEXT', head, inIndirect, idx, indirectAt,
            'has both VRING_DESC_F_INDIRECT and VRING_DESC_F_NEXT');
        }
        if (len === 0 || len % DESC_SIZE !== 0 || len / DESC_SIZE > MAX_INDIRECT_ENTRIES) {
          throw chainError('VIRTIO_INDIRECT_BAD_LENGTH', head, inIndirect, idx, indirectAt,
            `refers to an indirect table of ${len} bytes ` +
              `(must be a non-zero multiple of ${DESC_SIZE}, at most ${MAX_INDIRECT_ENTRIES} entries)`);
        }
        if (addr < 0 || addr > ADDRESS_LIMIT - len) {
          throw chainError('VIRTIO_DESC_ADDRESS_INVALID', head, inIndirect, idx, indirectAt, badRange(addrLo, addrHi, len));
        }
        // One view for the whole table (throws GUEST_MEMORY_UNMAPPED if its start is unmapped). The write-only flag
        // of this descriptor is ignored, as the spec requires (§2.7.5.3.2). A MemoryTable is asked for the region
        // itself, so the usual case (the table inside one region) allocates nothing: the DataView over the region's
        // buffer is kept from one chain to the next.
        const r = mem instanceof MemoryTable ? mem.findRegion(addr) : undefined;
        if (r !== undefined && addr + len <= r.gpa + r.size) {
          table = this.#viewOf(r.buffer);
          base = r.bufferOffset + (addr - r.gpa);
        } else if ((tv = mem.view(addr, len)).length === len) {
          table = this.#viewOf(tv.buffer);
          base = tv.byteOffset;
        } else {
          crossing = true;
          tableAddr = addr;
        }
        indirectAt = idx;
        inIndirect = true;
        chain.indirect = true;
        tableLen = len / DESC_SIZE;
        ttl = tableLen;
        idx = 0;
        continue;
      }

      if (addr < 0 || addr > ADDRESS_LIMIT - len) {
        throw chainError('VIRTIO_DESC_ADDRESS_INVALID', head, inIndirect, idx, indirectAt, badRange(addrLo, addrHi, len));
      }
      if (chain.count >= budget) {
        throw chainError('VIRTIO_CHAIN_TOO_LONG', head, inIndirect, idx, indirectAt,
          `would be descriptor number ${budget + 1}; a chain holds at most ${budget}`);
      }
      total += len;
      if (total > MAX_CHAIN_BYTES) {
        throw chainError('VIRTIO_CHAIN_TOO_LONG', head, inIndirect, idx, indirectAt,
          'takes the chain past 2^32 - 1 bytes in total');
      }
      const writable = (flags & VRING_DESC_F_WRITE) !== 0;
      if (writable) {
        seenWritable = true;
      } else if (seenWritable) {
        throw chainError('VIRTIO_WRITABLE_BEFORE_READABLE', head, inIndirect, idx, indirectAt,
          'is device-readable but follows a device-writable descriptor');
      }
      chain.push(addr, len, writable);

      if ((flags & VRING_DESC_F_NEXT) === 0) break;
      if (next >= tableLen) {
        throw chainError('VIRTIO_DESC_INDEX_OUT_OF_RANGE', head, inIndirect, idx, indirectAt,
          `has next ${next}, ${inIndirect ? 'indirect table' : 'queue'} size is ${tableLen}`);
      }
      idx = next;
    }
    // Unreachable by construction (every walk ends on a data descriptor), kept as a cheap invariant check.
    if (chain.count === 0) throw new VirtioError('VIRTIO_CHAIN_EMPTY', `chain ${head} has no data descriptors`);
  }
}

/** A chain validation error naming the chain and the descriptor (strings are built only when an error is thrown). */
function chainError(
  code: `VIRTIO_${string}`,
  head: number,
  inIndirect: boolean,
  idx: number,
  indirectAt: number,
  problem: string,
): VirtioError {
  const at = inIndirect ? `indirect entry ${idx} (table at descriptor ${indirectAt})` : `descriptor ${idx}`;
  return new VirtioError(code, `chain ${head}: ${at} ${problem}`);
}

function badRange(addrLo: number, addrHi: number, len: number): string {
  const a = addrHi === 0 ? addrLo.toString(16) : addrHi.toString(16) + addrLo.toString(16).padStart(8, '0');
  return `has buffer 0x${a} + ${len} bytes, which does not end at or below 2^53`;
}

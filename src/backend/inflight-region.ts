/**
 * The inflight region of VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD: shared memory where the back-end records which
 * requests it has taken from each virtqueue and not yet completed, so that a back-end restarted after a crash can
 * resubmit them (QEMU `docs/interop/vhost-user.rst`, "Inflight I/O tracking"; libvhost-user `vu_queue_inflight_*`,
 * `vu_check_queue_inflights`; DPDK `lib/vhost` `rte_vhost_*_inflight_*`, `vhost_check_queue_inflights_*`).
 *
 * Pure TypeScript over memory passed in: no native calls (allocation and mapping of the memfd are in
 * `inflight-fd.ts`), so every rule is unit-tested on plain buffers.
 *
 * ## Layout (spec = libvhost-user = DPDK)
 *
 * The region is `num_queues` consecutive queue regions of `inflightQueueRegionSize(queue_size, packed)` bytes each
 * (a multiple of 64). Numbers are in native byte order (little endian on every host this package supports).
 *
 * Split queue region (`QueueRegionSplit`, DPDK `rte_vhost_inflight_info_split`), 16-byte header:
 * `u64 features` (0), `u16 version` (8; 0 = never initialised, 1 = this layout), `u16 desc_num` (10),
 * `u16 last_batch_head` (12, DPDK `last_inflight_io`), `u16 used_idx` (14); then `desc[desc_num]` of 16 bytes from
 * offset 16: `u8 inflight` (+0), `u8 padding[5]`, `u16 next` (+6), `u64 counter` (+8). Size
 * `ALIGN_UP(16 * q + 2, 64)` (libvhost-user) = `ALIGN_UP(16 * q + 16, 64)` (DPDK): equal for every q, as 16 * q is a
 * multiple of 16.
 *
 * Packed queue region (`QueueRegionPacked`, DPDK `rte_vhost_inflight_info_packed`), 32-byte header:
 * `u64 features` (0), `u16 version` (8), `u16 desc_num` (10), `u16 free_head` (12), `u16 old_free_head` (14),
 * `u16 used_idx` (16), `u16 old_used_idx` (18), `u8 used_wrap_counter` (20), `u8 old_used_wrap_counter` (21),
 * `u8 padding[7]` (22..28, then 3 bytes of alignment); then `desc[desc_num]` of 32 bytes from offset 32:
 * `u8 inflight` (+0), `u8 padding`, `u16 next` (+2), `u16 last` (+4), `u16 num` (+6), `u64 counter` (+8),
 * `u16 id` (+16), `u16 flags` (+18), `u32 len` (+20), `u64 addr` (+24). Size `ALIGN_UP(32 * q + 29, 64)` (DPDK's
 * `get_pervq_shm_size_packed`; libvhost-user has no packed inflight tracking).
 *
 * ## Memory model and crash consistency
 *
 * Every store to the region is an `Atomics.store` (sequentially consistent: one total order with the stores to the
 * rings in guest memory, which the queues also make with `Atomics.store`). A crash (SIGKILL) loses nothing already
 * stored and stores nothing out of order, so the region seen after a restart is the state after some prefix of
 * these stores. Each store says what a crash just before and just after it leaves, and the tests crash after every
 * single store and check that recovery completes each request exactly once.
 *
 * The datapath only writes the region; it never reads back what it wrote. What it needs (free list, counters,
 * positions) lives in JS shadows. The region is read only by `recover`, once per ring start, each field once into a
 * local, every index validated before use: the frontend maps the same file and may rewrite it at any time, so its
 * contents are as hostile as a guest's ring.
 *
 * ## Hostile regions
 *
 * `recover` never throws on what it reads and never indexes out of range. An entry it cannot trust (an index past
 * the ring, a `next` chain that loops or leaves the array, a counter seen twice, a packed chain overlapping another)
 * is skipped, its inflight flag cleared, and the reason counted in `anomalies`. Header fields that make the whole
 * queue region meaningless reset it, as a fresh region (nothing resubmitted). What recovery hands back (split heads,
 * packed descriptor copies) is validated later by the queue like anything else from the guest.
 *
 * Errors: `InflightError` with a `VHOST_INFLIGHT_*` code for what a frontend sends (GET/SET_INFLIGHT_FD and the ring
 * size at ring start), `VirtioError('VIRTIO_INFLIGHT_EXHAUSTED')` for a driver that has more descriptors in flight
 * than the ring holds, `RangeError` for calls that break the API's contract (a bug on our side).
 */
import { VhostError, VirtioError } from '../errors.js';
import type { Inflight } from '../protocol/index.js';
import { packedAvailableFlags, isPackedAvailable } from '../queue/packed-queue.js';

/** The region layout version this module writes and reads (`version` field). 0 means "never initialised". */
export const INFLIGHT_VERSION = 1;
/** Alignment of each queue region (libvhost-user and DPDK `INFLIGHT_ALIGNMENT`). */
export const INFLIGHT_ALIGNMENT = 64;
/** Largest `queue_size` accepted (virtio: a queue holds at most 32768 entries). */
export const MAX_INFLIGHT_QUEUE_SIZE = 32768;

/** Byte offsets in a split queue region and its 16-byte descriptor states. */
export const SplitRegion = {
  FEATURES: 0,
  VERSION: 8,
  DESC_NUM: 10,
  LAST_BATCH_HEAD: 12,
  USED_IDX: 14,
  /** Offset of `desc[0]`. */
  DESC: 16,
  DESC_SIZE: 16,
  /** Offsets inside one descriptor state. */
  D_INFLIGHT: 0,
  D_NEXT: 6,
  D_COUNTER: 8,
} as const;

/** Byte offsets in a packed queue region and its 32-byte descriptor states. */
export const PackedRegion = {
  FEATURES: 0,
  VERSION: 8,
  DESC_NUM: 10,
  FREE_HEAD: 12,
  OLD_FREE_HEAD: 14,
  USED_IDX: 16,
  OLD_USED_IDX: 18,
  USED_WRAP_COUNTER: 20,
  OLD_USED_WRAP_COUNTER: 21,
  /** Offset of `desc[0]` (29 bytes of header, aligned to the u64 in each descriptor state). */
  DESC: 32,
  DESC_SIZE: 32,
  /** Offsets inside one descriptor state. */
  D_INFLIGHT: 0,
  D_NEXT: 2,
  D_LAST: 4,
  D_NUM: 6,
  D_COUNTER: 8,
  D_ID: 16,
  D_FLAGS: 18,
  D_LEN: 20,
  D_ADDR: 24,
} as const;

/** Counters are kept below 2^53 (exact in a JS number); a region holding a larger one is corrupt. */
const COUNTER_HI_LIMIT = 0x20_0000;
const TWO_32 = 0x1_0000_0000;

// ---------------------------------------------------------------------------------------------------------------
// Errors, sizes and validation of the frontend's messages

/** An inflight message or region the frontend sent that cannot be used. The request is refused (NACK). */
export class InflightError extends VhostError {
  constructor(code: `VHOST_INFLIGHT_${string}`, message: string, options?: ErrorOptions) {
    super(code, message, options);
    this.name = 'InflightError';
  }
}

/** The stable codes of `InflightError`. */
export const InflightErrorCode = {
  /** `num_queues` is 0 or more than the device has queues (DPDK CVE-2021-3839 class: an out-of-bounds write). */
  BAD_NUM_QUEUES: 'VHOST_INFLIGHT_BAD_NUM_QUEUES',
  /** `queue_size` is 0 or above 32768. */
  BAD_QUEUE_SIZE: 'VHOST_INFLIGHT_BAD_QUEUE_SIZE',
  /** SET_INFLIGHT_FD: `mmap_size` is smaller than `num_queues` queue regions of `queue_size`. */
  REGION_TOO_SMALL: 'VHOST_INFLIGHT_REGION_TOO_SMALL',
  /** SET_INFLIGHT_FD: `mmap_offset` is not a multiple of the page size. */
  BAD_OFFSET: 'VHOST_INFLIGHT_BAD_OFFSET',
  /** SET_INFLIGHT_FD: `mmap_offset + mmap_size` is past the end of the file. */
  BEYOND_FILE: 'VHOST_INFLIGHT_BEYOND_FILE',
  /** Ring start: the ring has more entries than the inflight region tracks (`queue_size`). */
  RING_TOO_LARGE: 'VHOST_INFLIGHT_RING_TOO_LARGE',
  /** SET_INFLIGHT_FD: the fd cannot be inspected or mapped. */
  BAD_FD: 'VHOST_INFLIGHT_BAD_FD',
  /** GET_INFLIGHT_FD: the memfd could not be created, sealed or mapped. */
  ALLOC_FAILED: 'VHOST_INFLIGHT_ALLOC_FAILED',
} as const;

function alignUp(value: number, alignment: number): number {
  return Math.ceil(value / alignment) * alignment;
}

function isQueueSize(queueSize: number): boolean {
  return Number.isInteger(queueSize) && queueSize >= 1 && queueSize <= MAX_INFLIGHT_QUEUE_SIZE;
}

/**
 * Bytes of one queue region for `queueSize` descriptors: split `ALIGN_UP(16 * q + 2, 64)` (libvhost-user
 * `vu_inflight_queue_size`; DPDK `get_pervq_shm_size_split` computes `ALIGN_UP(16 * q + 16, 64)`, the same value),
 * packed `ALIGN_UP(32 * q + 29, 64)` (DPDK `get_pervq_shm_size_packed`).
 */
export function inflightQueueRegionSize(queueSize: number, packed: boolean): number {
  if (!isQueueSize(queueSize)) throw new RangeError(`queue size ${queueSize} is not in 1..${MAX_INFLIGHT_QUEUE_SIZE}`);
  return packed
    ? alignUp(PackedRegion.DESC_SIZE * queueSize + 8 + 2 * 6 + 9, INFLIGHT_ALIGNMENT)
    : alignUp(SplitRegion.DESC_SIZE * queueSize + 2, INFLIGHT_ALIGNMENT);
}

/** Bytes of the whole region: `numQueues` queue regions (the GET_INFLIGHT_FD reply's `mmap_size`). */
export function inflightMmapSize(numQueues: number, queueSize: number, packed: boolean): number {
  if (!Number.isInteger(numQueues) || numQueues < 1 || numQueues > 0xffff) {
    throw new RangeError(`number of queues ${numQueues} is not in 1..65535`);
  }
  return numQueues * inflightQueueRegionSize(queueSize, packed);
}

/** The shape of an inflight region: how many queue regions, of which layout and size. */
export interface InflightGeometry {
  readonly numQueues: number;
  /** Descriptor states per queue (`queue_size`, written to each queue's `desc_num`). */
  readonly queueSize: number;
  /** Packed layout (VIRTIO_F_RING_PACKED negotiated when the region was asked for) or split. */
  readonly packed: boolean;
  /** Bytes of one queue region. */
  readonly queueRegionSize: number;
  /** Bytes the back-end maps and uses: `numQueues * queueRegionSize`. */
  readonly mmapSize: number;
}

/** The geometry of a region of `numQueues` queues of `queueSize` (RangeError for values out of range). */
export function inflightGeometry(numQueues: number, queueSize: number, packed: boolean): InflightGeometry {
  const mmapSize = inflightMmapSize(numQueues, queueSize, packed);
  return { numQueues, queueSize, packed, queueRegionSize: inflightQueueRegionSize(queueSize, packed), mmapSize };
}

/** What the device allows: the frontend's numbers are checked against it. */
export interface InflightLimits {
  /** The device's number of virtqueues: `num_queues` may not exceed it (DPDK 6442c329b9). */
  readonly maxQueues: number;
  /** VIRTIO_F_RING_PACKED negotiated (QEMU sends SET_FEATURES right before GET/SET_INFLIGHT_FD). */
  readonly packed: boolean;
}

/** What SET_INFLIGHT_FD's fd holds, for `checkSetInflight`. */
export interface InflightFile {
  /** The file's size (fstat), after it was sealed against shrinking. */
  readonly fileSize: number;
  /** The system page size: `mmap_offset` must be a multiple of it. */
  readonly pageSize: number;
}

function checkCounts(request: Inflight, limits: InflightLimits): InflightGeometry {
  const { numQueues, queueSize } = request;
  if (!Number.isInteger(numQueues) || numQueues < 1 || numQueues > limits.maxQueues) {
    throw new InflightError(
      InflightErrorCode.BAD_NUM_QUEUES,
      `inflight num_queues ${numQueues} is not in 1..${limits.maxQueues} (the device's queues)`,
    );
  }
  if (!isQueueSize(queueSize)) {
    throw new InflightError(
      InflightErrorCode.BAD_QUEUE_SIZE,
      `inflight queue_size ${queueSize} is not in 1..${MAX_INFLIGHT_QUEUE_SIZE}`,
    );
  }
  return inflightGeometry(numQueues, queueSize, limits.packed);
}

/**
 * GET_INFLIGHT_FD: checks `num_queues` and `queue_size` (its `mmap_size` and `mmap_offset` are not used; QEMU sends
 * 0) and returns the geometry of the region to allocate. The reply is `{ mmapSize: geometry.mmapSize, mmapOffset:
 * 0, numQueues, queueSize }` with the memfd.
 */
export function checkGetInflight(request: Inflight, limits: InflightLimits): InflightGeometry {
  return checkCounts(request, limits);
}

/**
 * SET_INFLIGHT_FD: checks every field against the device and the file it came with. The region is
 * `geometry.mmapSize` bytes from `mmapOffset` (a larger `mmap_size` is accepted, the excess is not mapped).
 */
export function checkSetInflight(
  request: Inflight,
  limits: InflightLimits,
  file: InflightFile,
): InflightGeometry & { readonly mmapOffset: number } {
  const geometry = checkCounts(request, limits);
  if (request.mmapSize < BigInt(geometry.mmapSize)) {
    throw new InflightError(
      InflightErrorCode.REGION_TOO_SMALL,
      `inflight mmap_size ${request.mmapSize} is below the ${geometry.mmapSize} bytes of ${geometry.numQueues} ` +
        `${limits.packed ? 'packed' : 'split'} queue regions of ${geometry.queueSize} descriptors`,
    );
  }
  if (request.mmapOffset % BigInt(file.pageSize) !== 0n) {
    throw new InflightError(
      InflightErrorCode.BAD_OFFSET,
      `inflight mmap_offset 0x${request.mmapOffset.toString(16)} is not a multiple of the page size ${file.pageSize}`,
    );
  }
  if (request.mmapOffset + request.mmapSize > BigInt(file.fileSize)) {
    throw new InflightError(
      InflightErrorCode.BEYOND_FILE,
      `inflight region [0x${request.mmapOffset.toString(16)}, +0x${request.mmapSize.toString(16)}) extends past the ` +
        `end of its file (0x${file.fileSize.toString(16)} bytes)`,
    );
  }
  return { ...geometry, mmapOffset: Number(request.mmapOffset) };
}

// ---------------------------------------------------------------------------------------------------------------
// The region

/**
 * A mapped inflight region: the whole buffer and its geometry. Plain data that can be posted to a worker (post
 * `bytes` and `geometry`, build the region again there); the queue objects are built per queue in the worker that
 * serves the queue.
 */
export class InflightRegion {
  readonly geometry: InflightGeometry;
  /** The region's bytes (from the mapping's start, `geometry.mmapSize` of them or more). */
  readonly bytes: Uint8Array;

  constructor(memory: SharedArrayBuffer | Uint8Array, geometry: InflightGeometry) {
    const bytes = memory instanceof Uint8Array ? memory : new Uint8Array(memory);
    if (bytes.byteOffset % 8 !== 0) throw new RangeError(`inflight region at byte offset ${bytes.byteOffset}: not 8-aligned`);
    if (bytes.length < geometry.mmapSize) {
      throw new RangeError(`inflight region of ${bytes.length} bytes is smaller than its geometry (${geometry.mmapSize})`);
    }
    this.bytes = bytes;
    this.geometry = geometry;
  }

  /** The bytes of queue `index`'s region. */
  queueBytes(index: number): Uint8Array {
    const g = this.geometry;
    if (!Number.isInteger(index) || index < 0 || index >= g.numQueues) {
      throw new RangeError(`queue ${index} is not below the region's ${g.numQueues} queues`);
    }
    return this.bytes.subarray(index * g.queueRegionSize, (index + 1) * g.queueRegionSize);
  }

  /** The tracker of split queue `index` (the region must have the split layout). */
  splitQueue(index: number): SplitInflightQueue {
    if (this.geometry.packed) throw new RangeError('a packed inflight region has no split queues');
    return new SplitInflightQueue(this.queueBytes(index), this.geometry.queueSize);
  }

  /** The tracker of packed queue `index` (the region must have the packed layout). */
  packedQueue(index: number): PackedInflightQueue {
    if (!this.geometry.packed) throw new RangeError('a split inflight region has no packed queues');
    return new PackedInflightQueue(this.queueBytes(index), this.geometry.queueSize);
  }
}

/** Why `recover` skipped an entry or distrusted a header, with how often. */
export type InflightAnomaly =
  /** `version` is neither 0 nor 1: the queue region was reset (nothing resubmitted). */
  | 'unknown-version'
  /** Packed: an index or wrap counter in the header is out of range: the queue region was reset. */
  | 'bad-header'
  /** Split: `used->idx - used_idx` is more than the ring size; the repair walked at most the ring size. */
  | 'batch-too-large'
  /** Split: the last batch's list reached an index >= the ring size; the repair stopped there. */
  | 'batch-index-out-of-range'
  /** Split: the last batch's list came back to an entry it had visited; the repair stopped there. */
  | 'batch-loop'
  /** Packed: the free list came back to an entry it had visited; the walk stopped there. */
  | 'free-list-loop'
  /**
   * Packed: reading or writing the ring flags threw (at `old_used_idx`: the half-done batch was rolled back; in the
   * slots in flight: their reset stopped).
   */
  | 'ring-unreadable'
  /** An `inflight` byte other than 0 or 1 (cleared). */
  | 'bad-inflight-value'
  /** Split: an entry in flight at an index >= the ring size (cleared). */
  | 'index-out-of-range'
  /** A counter >= 2^53 (cleared). */
  | 'counter-out-of-range'
  /** A counter equal to an older entry's (the later index is cleared). */
  | 'duplicate-counter'
  /** Packed: a chain with `num` 0 or more than the ring size (cleared). */
  | 'chain-bad-length'
  /** Packed: a chain whose `next` leaves the array (cleared). */
  | 'chain-index-out-of-range'
  /** Packed: a chain sharing an entry with the free list, an older chain or itself (cleared). */
  | 'chain-overlap'
  /** Packed: a chain whose `num`-th entry is not its head's `last` (cleared). */
  | 'chain-bad-last'
  /** Packed: a chain whose buffer id (its last descriptor's `id`) is >= the ring size (cleared). */
  | 'bad-buffer-id'
  /** Packed: a chain with the buffer id of an older chain (cleared). */
  | 'duplicate-buffer-id'
  /** Packed: chains holding more ring slots in all than the ring has (the newer ones are cleared). */
  | 'too-many-slots';

/** Counts per `InflightAnomaly` (absent = 0). */
export type InflightAnomalies = Partial<Record<InflightAnomaly, number>>;

function note(anomalies: InflightAnomalies, what: InflightAnomaly): void {
  anomalies[what] = (anomalies[what] ?? 0) + 1;
}

function checkU16(value: number, what: string): void {
  if (!Number.isInteger(value) || value < 0 || value > 0xffff) throw new RangeError(`${what} is not a u16: ${value}`);
}

function checkRingSize(ringSize: number, descNum: number): void {
  if (!Number.isInteger(ringSize) || ringSize < 1) throw new RangeError(`ring size ${ringSize} is not a positive integer`);
  if (ringSize > descNum) {
    throw new InflightError(
      InflightErrorCode.RING_TOO_LARGE,
      `a ring of ${ringSize} entries does not fit an inflight region of ${descNum} descriptor states`,
    );
  }
}

/** Typed-array views of one queue region. */
interface Views {
  readonly u8: Uint8Array;
  readonly u16: Uint16Array;
  readonly u32: Uint32Array;
}

function views(memory: Uint8Array, descNum: number, packed: boolean): Views {
  if (!isQueueSize(descNum)) throw new RangeError(`descriptor count ${descNum} is not in 1..${MAX_INFLIGHT_QUEUE_SIZE}`);
  const size = inflightQueueRegionSize(descNum, packed);
  if (memory.byteOffset % 8 !== 0) throw new RangeError(`queue region at byte offset ${memory.byteOffset}: not 8-aligned`);
  if (memory.length < size) throw new RangeError(`queue region of ${memory.length} bytes, ${size} needed`);
  const { buffer, byteOffset } = memory;
  return {
    u8: new Uint8Array(buffer, byteOffset, size),
    u16: new Uint16Array(buffer, byteOffset, size / 2),
    u32: new Uint32Array(buffer, byteOffset, size / 4),
  };
}

/** A counter read from the region, or -1 when it is >= 2^53. */
function readCounter(u32: Uint32Array, loIndex: number): number {
  const lo = Atomics.load(u32, loIndex);
  const hi = Atomics.load(u32, loIndex + 1);
  return hi >= COUNTER_HI_LIMIT ? -1 : hi * TWO_32 + lo;
}

/**
 * Stores counter `c` (< 2^53) as two u32 halves, only into an entry not in flight (no reader sees it torn), and as
 * plain stores: every caller stores the entry's inflight flag with `Atomics.store` after it (a release: these
 * become visible first), and a recovery reads counters of entries in flight only.
 */
function storeCounter(u32: Uint32Array, loIndex: number, c: number): void {
  u32[loIndex] = c >>> 0;
  u32[loIndex + 1] = Math.floor(c / TWO_32);
}

/** Batch phases: pushUsed collects, prepareUsed stores the links, commitUsed clears after the ring was published. */
const IDLE = 0;
const PREPARED = 1;

// ---------------------------------------------------------------------------------------------------------------
// Split queues

/** What `SplitInflightQueue.recover` found. */
export interface SplitRecovery {
  /** The queue region was (re)initialised: version 0 (a new region, or one from a VM reset) or unknown. */
  readonly fresh: boolean;
  /** Heads to process again before anything new, oldest first (fetch order). They stay marked in flight. */
  readonly resubmit: readonly number[];
  /** Where to take the next new head from the avail ring: `usedIdx + resubmit.length` (libvhost-user). */
  readonly lastAvailIdx: number;
  /** used->idx as read from the ring, the queue's next used index. */
  readonly usedIdx: number;
  /** Entries of a batch published in the used ring but still marked in flight, cleared (not resubmitted). */
  readonly repaired: number;
  readonly anomalies: InflightAnomalies;
}

const S_INFLIGHT = (i: number): number => SplitRegion.DESC + SplitRegion.DESC_SIZE * i;
const S_NEXT = (i: number): number => (SplitRegion.DESC + SplitRegion.DESC_SIZE * i + SplitRegion.D_NEXT) / 2;
const S_COUNTER = (i: number): number => (SplitRegion.DESC + SplitRegion.DESC_SIZE * i + SplitRegion.D_COUNTER) / 4;
const S_VERSION = SplitRegion.VERSION / 2;
const S_DESC_NUM = SplitRegion.DESC_NUM / 2;
const S_LAST_BATCH_HEAD = SplitRegion.LAST_BATCH_HEAD / 2;
const S_USED_IDX = SplitRegion.USED_IDX / 2;

/**
 * Inflight tracking of one split queue. Per request: `markInflight(head)` when the head is taken from the avail
 * ring, before the request has any side effect; `pushUsed(head)` with each `queue.pushUsed`; around the queue's
 * publication of used.idx, `prepareUsed()` just before and `commitUsed()` just after. `recover` first, at ring
 * start: until then the other calls throw.
 */
export class SplitInflightQueue {
  /** Descriptor states in the region (`queue_size`). */
  readonly descNum: number;
  readonly #v: Views;
  #ringSize = 0;
  /** Per head: 0 not in flight, 1 in flight, 2 pushed in the current batch. */
  #state = new Uint8Array(0);
  #batch = new Uint16Array(0);
  #batchLen = 0;
  #phase = IDLE;
  #counter = 0;
  #usedIdx = 0;
  #lastBatchHead = 0;

  constructor(memory: Uint8Array, descNum: number) {
    this.descNum = descNum;
    this.#v = views(memory, descNum, false);
  }

  /** The ring size `recover` was given (0 before). */
  get ringSize(): number {
    return this.#ringSize;
  }

  /** The counter the next `markInflight` stores. */
  get counter(): number {
    return this.#counter;
  }

  /** used->idx after the last `commitUsed` (what `used_idx` in the region holds). */
  get usedIdx(): number {
    return this.#usedIdx;
  }

  /** Heads marked in flight and not yet committed as used. */
  get inFlight(): number {
    let n = 0;
    for (const s of this.#state) if (s !== 0) n++;
    return n;
  }

  /**
   * Ring start (SET_VRING_KICK, libvhost-user and DPDK do it there): `usedIdx` is used->idx as the ring holds it now,
   * `ringSize` the ring's size (at most `descNum`, else `VHOST_INFLIGHT_RING_TOO_LARGE`). A region of version 0 is
   * initialised (nothing to resubmit). Otherwise a batch whose used->idx store happened but whose entries were not
   * yet cleared is repaired (the spec's `last_batch_head` list, `used->idx - used_idx` entries), and the heads still
   * in flight are returned oldest first; they stay marked (do not mark them again) and complete like any other.
   * Never throws on the region's contents. Drops whatever the previous `recover` set up.
   */
  recover(usedIdx: number, ringSize: number): SplitRecovery {
    checkU16(usedIdx, 'used index');
    checkRingSize(ringSize, this.descNum);
    const { u8, u16, u32 } = this.#v;
    const anomalies: InflightAnomalies = {};
    this.#ringSize = ringSize;
    this.#state = new Uint8Array(ringSize);
    this.#batch = new Uint16Array(ringSize);
    this.#batchLen = 0;
    this.#phase = IDLE;
    // desc_num as libvhost-user and DPDK write it at SET_INFLIGHT_FD; informative only, never read back.
    Atomics.store(u16, S_DESC_NUM, this.descNum);

    const version = Atomics.load(u16, S_VERSION);
    if (version !== INFLIGHT_VERSION) {
      if (version !== 0) note(anomalies, 'unknown-version');
      this.#initialise(usedIdx);
      return { fresh: true, resubmit: [], lastAvailIdx: usedIdx, usedIdx, repaired: 0, anomalies };
    }

    // 1. A batch published in the used ring (used->idx stored) whose entries were not all cleared: walk the
    // `used->idx - used_idx` entries of the list from last_batch_head and clear them (spec "When reconnecting").
    let repaired = 0;
    const regionUsed = Atomics.load(u16, S_USED_IDX);
    if (regionUsed !== usedIdx) {
      let count = (usedIdx - regionUsed) & 0xffff;
      if (count > ringSize) {
        note(anomalies, 'batch-too-large');
        count = ringSize;
      }
      const seen = new Uint8Array(ringSize);
      let head = Atomics.load(u16, S_LAST_BATCH_HEAD);
      for (let n = 0; n < count; n++) {
        if (head >= ringSize) {
          note(anomalies, 'batch-index-out-of-range');
          break;
        }
        if (seen[head] === 1) {
          note(anomalies, 'batch-loop');
          break;
        }
        seen[head] = 1;
        const next = Atomics.load(u16, S_NEXT(head));
        if (Atomics.load(u8, S_INFLIGHT(head)) !== 0) {
          // Published, so not in flight. A crash before the used_idx store below repeats this walk (idempotent).
          Atomics.store(u8, S_INFLIGHT(head), 0);
          repaired++;
        }
        head = next;
      }
      // After the clears: from here the region agrees with the ring again.
      Atomics.store(u16, S_USED_IDX, usedIdx);
    }

    // 2. What is still in flight, in fetch order.
    const found: { head: number; counter: number }[] = [];
    for (let i = 0; i < this.descNum; i++) {
      const flag = Atomics.load(u8, S_INFLIGHT(i));
      if (flag === 0) continue;
      let bad: InflightAnomaly | undefined;
      let counter = -1;
      if (flag !== 1) bad = 'bad-inflight-value';
      else if (i >= ringSize) bad = 'index-out-of-range';
      else if ((counter = readCounter(u32, S_COUNTER(i))) < 0) bad = 'counter-out-of-range';
      if (bad !== undefined) {
        note(anomalies, bad);
        Atomics.store(u8, S_INFLIGHT(i), 0); // never resubmitted: the region says so from now on
        continue;
      }
      found.push({ head: i, counter });
    }
    found.sort((a, b) => a.counter - b.counter || a.head - b.head);
    const resubmit: number[] = [];
    let last = -1;
    for (const { head, counter } of found) {
      if (counter === last) {
        note(anomalies, 'duplicate-counter');
        Atomics.store(u8, S_INFLIGHT(head), 0);
        continue;
      }
      last = counter;
      resubmit.push(head);
      this.#state[head] = 1;
    }

    this.#counter = last + 1; // after every resubmitted head (0 when none: only relative order matters)
    this.#usedIdx = usedIdx;
    const lbh = Atomics.load(u16, S_LAST_BATCH_HEAD);
    this.#lastBatchHead = lbh < this.descNum ? lbh : 0;
    return {
      fresh: false,
      resubmit,
      lastAvailIdx: (usedIdx + resubmit.length) & 0xffff,
      usedIdx,
      repaired,
      anomalies,
    };
  }

  /** Version 0 (or unknown): nothing is in flight. Every field first, the version last. */
  #initialise(usedIdx: number): void {
    const { u8, u16 } = this.#v;
    for (let i = 0; i < this.descNum; i++) {
      if (Atomics.load(u8, S_INFLIGHT(i)) !== 0) Atomics.store(u8, S_INFLIGHT(i), 0);
    }
    Atomics.store(u16, S_LAST_BATCH_HEAD, 0);
    // used_idx = used->idx now, so that the first recovery after a crash does not take the ring's past for a batch.
    Atomics.store(u16, S_USED_IDX, usedIdx);
    // Last: until this store the region still reads as never initialised, and a crash initialises it again.
    Atomics.store(u16, S_VERSION, INFLIGHT_VERSION);
    this.#counter = 0;
    this.#usedIdx = usedIdx;
    this.#lastBatchHead = 0;
  }

  #checkHead(head: number, what: string): void {
    if (this.#ringSize === 0) throw new RangeError(`${what} before recover`);
    if (!Number.isInteger(head) || head < 0 || head >= this.#ringSize) {
      throw new RangeError(`${what}: head ${head} is not below the ring size ${this.#ringSize}`);
    }
    if (this.#phase === PREPARED) throw new RangeError(`${what} between prepareUsed and commitUsed`);
  }

  /**
   * Records that `head` was taken from the avail ring. Call right after the pop, in pop order, before the request
   * has any side effect. Returns false (and records nothing) when `head` is already in flight, which only a driver
   * that made it available twice can cause: treat it as a driver error.
   */
  markInflight(head: number): boolean {
    this.#checkHead(head, 'markInflight');
    if (this.#state[head] !== 0) return false;
    const { u8, u32 } = this.#v;
    const c = this.#counter;
    this.#counter = c + 1;
    // The counter first, while the entry is not in flight: a recovery only reads counters of entries in flight.
    storeCounter(u32, S_COUNTER(head), c);
    // In flight. A crash before this store: not resubmitted, and lastAvailIdx = used->idx + (entries in flight)
    // leaves this head, the last one popped, in the avail ring to be taken again (heads are marked in pop order).
    // After it: resubmitted in counter order. The caller starts the request only after this returns.
    Atomics.store(u8, S_INFLIGHT(head), 1);
    this.#state[head] = 1;
    return true;
  }

  /** Records that `head`'s used element was written (`queue.pushUsed(head, len)`), in the same order. */
  pushUsed(head: number): void {
    this.#checkHead(head, 'pushUsed');
    if (this.#state[head] !== 1) throw new RangeError(`pushUsed: head ${head} is not in flight`);
    this.#state[head] = 2;
    this.#batch[this.#batchLen++] = head;
  }

  /**
   * Just before the queue stores used.idx: links the batch for recovery (spec: `desc[i].next = last_batch_head;
   * last_batch_head = i` per head). No-op for an empty batch. No mark or push until `commitUsed`.
   */
  prepareUsed(): void {
    if (this.#batchLen === 0) return;
    if (this.#phase === PREPARED) throw new RangeError('prepareUsed twice');
    const { u16 } = this.#v;
    let lbh = this.#lastBatchHead;
    // These stores are read only when used->idx moved past used_idx, i.e. after the queue's store of used.idx,
    // which comes after them: a crash before that store finds used->idx == used_idx and ignores the list.
    // Plain stores: the Atomics.store of last_batch_head below (a release) orders them before it.
    for (let k = 0; k < this.#batchLen; k++) {
      const head = this.#batch[k] as number;
      u16[S_NEXT(head)] = lbh;
      lbh = head;
    }
    Atomics.store(u16, S_LAST_BATCH_HEAD, lbh);
    this.#lastBatchHead = lbh;
    this.#phase = PREPARED;
  }

  /**
   * Just after the queue stored used.idx: the batch is published, its entries are no longer in flight (spec: clear
   * `inflight` of each, then `used_idx = used->idx`). No-op for an empty batch.
   */
  commitUsed(): void {
    if (this.#batchLen === 0) return;
    if (this.#phase !== PREPARED) throw new RangeError('commitUsed without prepareUsed');
    const { u8, u16 } = this.#v;
    // A crash between these stores: used->idx - used_idx = the batch size, the recovery walks the list that
    // prepareUsed linked and clears the rest (or all) of them.
    for (let k = 0; k < this.#batchLen; k++) {
      const head = this.#batch[k] as number;
      Atomics.store(u8, S_INFLIGHT(head), 0);
      this.#state[head] = 0;
    }
    this.#usedIdx = (this.#usedIdx + this.#batchLen) & 0xffff;
    // Last: from here used_idx == used->idx and the batch list is not needed any more.
    Atomics.store(u16, S_USED_IDX, this.#usedIdx);
    this.#batchLen = 0;
    this.#phase = IDLE;
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Packed queues

/** A packed ring descriptor as saved in the region (`addr` is the full u64). */
export interface PackedDescriptorCopy {
  readonly addr: bigint;
  readonly len: number;
  readonly id: number;
  readonly flags: number;
}

/** A chain to process again, from the copies saved when it was fetched (the ring slots may be overwritten). */
export interface PackedResubmit {
  /** Its buffer id (the last descriptor's `id`): what `pushUsed` takes. */
  readonly id: number;
  /** Its head descriptor state in the region. */
  readonly entry: number;
  /** The ring descriptors of the chain, in ring order (one with INDIRECT for an indirect chain). */
  readonly descriptors: readonly PackedDescriptorCopy[];
}

/** What `PackedInflightQueue.recover` found. */
export interface PackedRecovery {
  /** The queue region was (re)initialised (version 0, unknown, or a header out of range): positions from `base`. */
  readonly fresh: boolean;
  /**
   * A batch found half done: `committed` (its first used descriptor was in the ring: its chains are not resubmitted),
   * `rolled-back` (it was not: they are), `none`.
   */
  readonly batch: 'none' | 'committed' | 'rolled-back';
  /** Chains to process again before anything new, oldest first. They stay marked: do not mark them again. */
  readonly resubmit: readonly PackedResubmit[];
  /** Where to take the next new chain from the ring: used position + the slots of `resubmit` (`index | wrap << 15`). */
  readonly availPosition: number;
  /** Where to write the next used descriptor (`index | wrap << 15`). QEMU cannot restore it for packed rings. */
  readonly usedPosition: number;
  /** Heads found marked on the free list and cleared: half-done marks, or the chains of a committed batch. */
  readonly discarded: number;
  /** Ring slots in flight whose AVAIL / USED bits were set back to "available" (see `setRingFlags`). */
  readonly ringSlotsReset: number;
  readonly anomalies: InflightAnomalies;
}

/** Options of `PackedInflightQueue.recover`. */
export interface PackedRecoverOptions {
  /** The ring size (at most `descNum`, else `VHOST_INFLIGHT_RING_TOO_LARGE`). */
  readonly ringSize: number;
  /** SET_VRING_BASE's avail half (`index | wrap << 15`): the positions of a fresh region. */
  readonly base: number;
  /**
   * Reads the `flags` of ring slot `slot` (an `Atomics.load` of guest memory): at `old_used_idx` when a batch was
   * found half done, and each slot between the used and avail positions (see `setRingFlags`). A `VhostError` (such
   * as `GUEST_MEMORY_UNMAPPED`) thrown by either callback is counted as `ring-unreadable`; anything else propagates.
   */
  readonly ringFlagsAt: (slot: number) => number;
  /**
   * Stores the `flags` of ring slot `slot` (an `Atomics.store` of guest memory). Used only for the slots between
   * the used and avail positions, which hold chains in flight: the driver wrote them available in their lap, and
   * nothing published is there. A crashed back-end may have left used flags there (PackedQueue.pushUsed stores
   * the flags of a batch's later descriptors before publishUsed stores the first one); the next recovery's check at
   * `old_used_idx` would take such a leftover for a published batch, so their AVAIL / USED bits are set back to
   * "available in this lap" (the driver reads a slot only once the device has written it used at its position).
   */
  readonly setRingFlags: (slot: number, flags: number) => void;
}

const P_INFLIGHT = (i: number): number => PackedRegion.DESC + PackedRegion.DESC_SIZE * i;
const P_U16 = (i: number, field: number): number => (PackedRegion.DESC + PackedRegion.DESC_SIZE * i + field) / 2;
const P_U32 = (i: number, field: number): number => (PackedRegion.DESC + PackedRegion.DESC_SIZE * i + field) / 4;
const P_VERSION = PackedRegion.VERSION / 2;
const P_DESC_NUM = PackedRegion.DESC_NUM / 2;
const P_FREE_HEAD = PackedRegion.FREE_HEAD / 2;
const P_OLD_FREE_HEAD = PackedRegion.OLD_FREE_HEAD / 2;
const P_USED_IDX = PackedRegion.USED_IDX / 2;
const P_OLD_USED_IDX = PackedRegion.OLD_USED_IDX / 2;
const P_USED_WRAP = PackedRegion.USED_WRAP_COUNTER;
const P_OLD_USED_WRAP = PackedRegion.OLD_USED_WRAP_COUNTER;

/** recover's per-entry state. */
const UNSEEN = 0;
const FREE = 1;
const CHAIN = 2;
const CANDIDATE = 3;

/**
 * Inflight tracking of one packed queue (spec "For packed virtqueue"; DPDK `rte_vhost_set_inflight_desc_packed`,
 * `rte_vhost_set_last_inflight_io_packed`, `rte_vhost_clr_inflight_desc_packed`). Each chain taken from the ring is
 * copied (addr, len, id, flags of every ring descriptor) into descriptor states taken from a free list, because the
 * ring slots are overwritten by used descriptors before the chain completes when completions are out of order.
 *
 * Per chain: `beginChain()`, `addDescriptor(...)` for each of its ring descriptors, `endChain()` (or
 * `markChain(descs)`), right after the pop, in pop order, before the request has any side effect; `pushUsed(id)`
 * with each `queue.pushUsed`; `prepareUsed()` just before `queue.publishUsed()`, `commitUsed()` just after.
 *
 * Where the spec stores every step at once, this class keeps the free list and the used position in JS until
 * `prepareUsed`, so chains marked while a batch is being collected (the worker pops and completes in one loop)
 * never take the entries of that batch: the region only ever holds a batch that is entirely linked or none.
 * Recovery decides a half-done batch from `free_head == old_free_head` first (our commit stores old_free_head before
 * the old position, see `commitUsed`), and only otherwise from the ring flags at `old_used_idx`, so that it never
 * reads a position and wrap counter torn by a crash between their two stores. That ring check assumes the slot at
 * `old_used_idx` reads "available" until the batch is published; recovery restores that for every slot in flight
 * (`PackedRecoverOptions.setRingFlags`).
 */
export class PackedInflightQueue {
  /** Descriptor states in the region (`queue_size`). */
  readonly descNum: number;
  readonly #v: Views;
  #ringSize = 0;
  /** Shadows of what the datapath wrote (never read back from the region). */
  readonly #next: Uint16Array;
  readonly #last: Uint16Array;
  readonly #num: Uint16Array;
  /** Head entry of the chain with buffer id `i`, or -1. */
  #entryOfId = new Int32Array(0);
  #freeHead = 0;
  /** Used position, linear in [0, 2 * ringSize): index while the wrap counter is 1, ringSize + index while 0. */
  #used = 0;
  #counter = 0;
  #batch = new Uint16Array(0);
  #batchLen = 0;
  #phase = IDLE;
  /** The chain being marked: its head entry (-1: none), the entry for its next descriptor, its length so far. */
  #chainHead = -1;
  #cursor = 0;
  #chainLen = 0;
  #chainLast = 0;
  #chainId = 0;

  constructor(memory: Uint8Array, descNum: number) {
    this.descNum = descNum;
    this.#v = views(memory, descNum, true);
    this.#next = new Uint16Array(descNum);
    this.#last = new Uint16Array(descNum);
    this.#num = new Uint16Array(descNum);
  }

  get ringSize(): number {
    return this.#ringSize;
  }

  /** The counter the next chain gets. */
  get counter(): number {
    return this.#counter;
  }

  /** The used position after the last `prepareUsed` (`index | wrap << 15`): equals the queue's `usedPosition`. */
  get usedPosition(): number {
    return this.#encode(this.#used);
  }

  /** Chains marked and not yet pushed as used. */
  get inFlight(): number {
    let n = 0;
    for (const e of this.#entryOfId) if (e >= 0) n++;
    return n;
  }

  #linear(index: number, wrap: number): number {
    return wrap !== 0 ? index : index + this.#ringSize;
  }

  #encode(linear: number): number {
    return linear < this.#ringSize ? linear | 0x8000 : linear - this.#ringSize;
  }

  /**
   * Ring start (SET_VRING_KICK). A region of version 0 is initialised at `base` (nothing to resubmit). Otherwise a
   * half-done batch is committed or rolled back (spec "When reconnecting"), marked entries on the free list are
   * cleared, the chains still in flight are returned oldest first from their saved copies, the free list is
   * rebuilt from every entry that is not in one of them, and the ring slots those chains hold get their AVAIL / USED
   * bits back to "available". Never throws on the region's contents. The ring positions come from the region (QEMU
   * cannot restore a packed ring's and sends a stale SET_VRING_BASE after a crash): resume the queue there.
   */
  recover(options: PackedRecoverOptions): PackedRecovery {
    const { ringSize, base } = options;
    checkRingSize(ringSize, this.descNum);
    checkU16(base, 'packed ring base');
    if ((base & 0x7fff) >= ringSize) throw new RangeError(`packed ring base index ${base & 0x7fff} is not below ${ringSize}`);
    const { u8, u16, u32 } = this.#v;
    const descNum = this.descNum;
    const anomalies: InflightAnomalies = {};
    this.#ringSize = ringSize;
    this.#entryOfId = new Int32Array(ringSize).fill(-1);
    this.#batch = new Uint16Array(descNum);
    this.#batchLen = 0;
    this.#phase = IDLE;
    this.#chainHead = -1;
    Atomics.store(u16, P_DESC_NUM, descNum); // informative, as DPDK writes it at SET_INFLIGHT_FD

    const fresh = (): PackedRecovery => {
      this.#initialise(base);
      return {
        fresh: true,
        batch: 'none',
        resubmit: [],
        availPosition: base,
        usedPosition: base,
        discarded: 0,
        ringSlotsReset: 0,
        anomalies,
      };
    };
    const version = Atomics.load(u16, P_VERSION);
    if (version !== INFLIGHT_VERSION) {
      if (version !== 0) note(anomalies, 'unknown-version');
      return fresh();
    }
    const fh = Atomics.load(u16, P_FREE_HEAD);
    const ofh = Atomics.load(u16, P_OLD_FREE_HEAD);
    const ui = Atomics.load(u16, P_USED_IDX);
    const oui = Atomics.load(u16, P_OLD_USED_IDX);
    const uw = Atomics.load(u8, P_USED_WRAP);
    const ouw = Atomics.load(u8, P_OLD_USED_WRAP);
    if (oui >= ringSize || ouw > 1) {
      note(anomalies, 'bad-header');
      return fresh();
    }
    const oldPos = this.#linear(oui, ouw);
    const curValid = ui < ringSize && uw <= 1;
    const curPos = curValid ? this.#linear(ui, uw) : -1;

    // 1. The half-done batch, if any.
    let batch: PackedRecovery['batch'];
    if (fh === ofh) {
      // commitUsed stores old_free_head = free_head first: the batch was published (and its entries cleared);
      // finish the commit of the position, which a crash may have left torn.
      if (curPos === oldPos) {
        batch = 'none';
      } else if (!curValid) {
        note(anomalies, 'bad-header');
        return fresh();
      } else {
        batch = 'committed';
      }
    } else if (curPos === oldPos || !curValid) {
      // Only the free head moved: a half-done mark, or a batch linked before its position was stored. Nothing of
      // it was published (the ring is published after the position). An invalid current position is hostile.
      if (!curValid) note(anomalies, 'bad-header');
      batch = curPos === oldPos ? 'none' : 'rolled-back';
    } else {
      // A batch linked and positioned: published iff the descriptor at old_used_idx no longer reads as available
      // for old_used_wrap_counter (the first used descriptor of a batch is stored last).
      let published = false;
      try {
        published = !isPackedAvailable(options.ringFlagsAt(oui), ouw === 1);
      } catch (err) {
        if (!(err instanceof VhostError)) throw err;
        note(anomalies, 'ring-unreadable'); // rolled back: at least once
      }
      batch = published ? 'committed' : 'rolled-back';
    }
    const committed = batch === 'committed';
    const pos = committed ? curPos : oldPos;

    // 2. Everything on the free list is free: clear marks found there (a mark that did not reach its commit, or the
    // chains of a committed batch, which commitUsed may not have cleared yet).
    const state = new Uint8Array(descNum);
    let discarded = 0;
    for (let e = committed ? fh : ofh; e < descNum; ) {
      if (state[e] !== UNSEEN) {
        note(anomalies, 'free-list-loop');
        break;
      }
      state[e] = FREE;
      if (Atomics.load(u8, P_INFLIGHT(e)) !== 0) {
        Atomics.store(u8, P_INFLIGHT(e), 0);
        discarded++;
      }
      e = Atomics.load(u16, P_U16(e, PackedRegion.D_NEXT));
    }

    // 3. Settle the decision in the header. Committed: old_free_head = free_head first (from then on a crash takes
    // the fh === ofh branch above and finishes), then the old position. Rolled back: the position first, the free
    // head last (until then fh !== ofh and a crash decides again from the untouched old values).
    if (committed) {
      if (ofh !== fh) Atomics.store(u16, P_OLD_FREE_HEAD, fh);
      Atomics.store(u8, P_OLD_USED_WRAP, uw);
      Atomics.store(u16, P_OLD_USED_IDX, ui);
    } else if (curPos !== oldPos || fh !== ofh) {
      Atomics.store(u8, P_USED_WRAP, ouw);
      Atomics.store(u16, P_USED_IDX, oui);
      if (fh !== ofh) Atomics.store(u16, P_FREE_HEAD, ofh);
    }

    // 4. The chains in flight, oldest first, each validated entry by entry.
    const found: { entry: number; counter: number }[] = [];
    for (let e = 0; e < descNum; e++) {
      const flag = Atomics.load(u8, P_INFLIGHT(e));
      if (flag === 0) continue;
      let bad: InflightAnomaly | undefined;
      let counter = -1;
      if (flag !== 1) bad = 'bad-inflight-value';
      else if (state[e] === FREE) bad = 'chain-overlap'; // marked again after the walk cleared it: concurrent writes
      else if ((counter = readCounter(u32, P_U32(e, PackedRegion.D_COUNTER))) < 0) bad = 'counter-out-of-range';
      if (bad !== undefined) {
        note(anomalies, bad);
        Atomics.store(u8, P_INFLIGHT(e), 0);
        continue;
      }
      found.push({ entry: e, counter });
    }
    found.sort((a, b) => a.counter - b.counter || a.entry - b.entry);
    const resubmit: PackedResubmit[] = [];
    const idSeen = new Uint8Array(ringSize);
    let lastCounter = -1;
    let slots = 0;
    const entries: number[] = [];
    for (const { entry, counter } of found) {
      const bad = this.#validateChain(entry, counter, lastCounter, slots, state, idSeen, entries);
      if (typeof bad === 'string') {
        for (const x of entries) state[x] = UNSEEN;
        note(anomalies, bad);
        Atomics.store(u8, P_INFLIGHT(entry), 0);
        continue;
      }
      for (const x of entries) state[x] = CHAIN;
      for (let k = 0; k + 1 < entries.length; k++) this.#next[entries[k] as number] = entries[k + 1] as number;
      this.#last[entry] = entries[entries.length - 1] as number;
      this.#num[entry] = entries.length;
      this.#entryOfId[bad.id] = entry;
      idSeen[bad.id] = 1;
      slots += entries.length;
      lastCounter = counter;
      resubmit.push({ id: bad.id, entry, descriptors: bad.descriptors });
    }

    // 5. Rebuild the free list from every entry not in a resubmitted chain, in index order. Links are written from
    // the tail: a walk from any free head written before or during this loop meets only free entries whose link is
    // either the old one (to a free entry) or already the new one. Then old_free_head, then free_head (a crash in
    // between leaves fh !== ofh with equal positions: the next recovery resets fh and rebuilds again).
    let head = descNum; // the end of the list: any index >= descNum
    for (let e = descNum - 1; e >= 0; e--) {
      if (state[e] === CHAIN) continue;
      if (Atomics.load(u16, P_U16(e, PackedRegion.D_NEXT)) !== head) Atomics.store(u16, P_U16(e, PackedRegion.D_NEXT), head);
      this.#next[e] = head;
      head = e;
    }
    Atomics.store(u16, P_OLD_FREE_HEAD, head);
    Atomics.store(u16, P_FREE_HEAD, head);

    this.#freeHead = head;
    this.#used = pos;
    this.#counter = lastCounter + 1;

    // 6. The ring slots in flight read "available in their lap" again (see `setRingFlags`). Idempotent: a crash
    // during this loop redoes it with the same positions (the region is settled).
    let ringSlotsReset = 0;
    const period = 2 * ringSize;
    try {
      for (let k = 0; k < slots; k++) {
        const p = (pos + k) % period;
        const slot = p < ringSize ? p : p - ringSize;
        const flags = options.ringFlagsAt(slot) & 0xffff;
        const want = packedAvailableFlags(flags, p < ringSize);
        if (flags !== want) {
          options.setRingFlags(slot, want);
          ringSlotsReset++;
        }
      }
    } catch (err) {
      if (!(err instanceof VhostError)) throw err;
      note(anomalies, 'ring-unreadable');
    }
    return {
      fresh: false,
      batch,
      resubmit,
      availPosition: this.#encode((pos + slots) % period),
      usedPosition: this.#encode(pos),
      discarded,
      ringSlotsReset,
      anomalies,
    };
  }

  /**
   * Checks the chain whose head is `entry` (its entries are collected into `entries`, marked CANDIDATE in `state`);
   * returns its id and copies, or the reason to skip it.
   */
  #validateChain(
    entry: number,
    counter: number,
    lastCounter: number,
    slots: number,
    state: Uint8Array,
    idSeen: Uint8Array,
    entries: number[],
  ): InflightAnomaly | { id: number; descriptors: PackedDescriptorCopy[] } {
    const { u16, u32 } = this.#v;
    const ringSize = this.#ringSize;
    entries.length = 0;
    if (counter === lastCounter) return 'duplicate-counter';
    const num = Atomics.load(u16, P_U16(entry, PackedRegion.D_NUM));
    const last = Atomics.load(u16, P_U16(entry, PackedRegion.D_LAST));
    if (num === 0 || num > ringSize) return 'chain-bad-length';
    if (slots + num > ringSize) return 'too-many-slots';
    let x = entry;
    for (let k = 0; k < num; k++) {
      if (x >= this.descNum) return 'chain-index-out-of-range';
      if (state[x] !== UNSEEN) return 'chain-overlap';
      state[x] = CANDIDATE;
      entries.push(x);
      if (k + 1 < num) x = Atomics.load(u16, P_U16(x, PackedRegion.D_NEXT));
    }
    if (x !== last) return 'chain-bad-last';
    const descriptors: PackedDescriptorCopy[] = [];
    for (const e of entries) {
      const lo = Atomics.load(u32, P_U32(e, PackedRegion.D_ADDR));
      const hi = Atomics.load(u32, P_U32(e, PackedRegion.D_ADDR) + 1);
      descriptors.push({
        addr: (BigInt(hi) << 32n) | BigInt(lo),
        len: Atomics.load(u32, P_U32(e, PackedRegion.D_LEN)),
        id: Atomics.load(u16, P_U16(e, PackedRegion.D_ID)),
        flags: Atomics.load(u16, P_U16(e, PackedRegion.D_FLAGS)),
      });
    }
    const id = (descriptors[descriptors.length - 1] as PackedDescriptorCopy).id;
    if (id >= ringSize) return 'bad-buffer-id';
    if (idSeen[id] === 1) return 'duplicate-buffer-id';
    return { id, descriptors };
  }

  /** Version 0 (or unusable): a free list of every entry, both positions at `base`. Every field, the version last. */
  #initialise(base: number): void {
    const { u8, u16 } = this.#v;
    const descNum = this.descNum;
    for (let e = 0; e < descNum; e++) {
      if (Atomics.load(u8, P_INFLIGHT(e)) !== 0) Atomics.store(u8, P_INFLIGHT(e), 0);
      Atomics.store(u16, P_U16(e, PackedRegion.D_NEXT), e + 1); // DPDK: desc[j].next = j + 1
      this.#next[e] = e + 1;
    }
    const index = base & 0x7fff;
    const wrap = base >>> 15;
    Atomics.store(u16, P_FREE_HEAD, 0);
    Atomics.store(u16, P_OLD_FREE_HEAD, 0);
    Atomics.store(u16, P_USED_IDX, index);
    Atomics.store(u16, P_OLD_USED_IDX, index);
    Atomics.store(u8, P_USED_WRAP, wrap);
    Atomics.store(u8, P_OLD_USED_WRAP, wrap);
    // Last: until this store the region still reads as never initialised, and a crash initialises it again.
    Atomics.store(u16, P_VERSION, INFLIGHT_VERSION);
    this.#freeHead = 0;
    this.#used = this.#linear(index, wrap);
    this.#counter = 0;
  }

  /** Starts marking a chain taken from the ring (right after the pop). */
  beginChain(): void {
    if (this.#ringSize === 0) throw new RangeError('beginChain before recover');
    if (this.#phase === PREPARED) throw new RangeError('beginChain between prepareUsed and commitUsed');
    if (this.#chainHead >= 0) throw new RangeError('beginChain: a chain is already open');
    this.#chainHead = this.#freeHead;
    this.#cursor = this.#freeHead;
    this.#chainLen = 0;
  }

  /**
   * Saves the chain's next ring descriptor, as the driver wrote it (`addr` any u64). Throws
   * `VIRTIO_INFLIGHT_EXHAUSTED` (and drops the chain) when no descriptor state is free, which only a driver that
   * reuses ring slots still in flight causes.
   */
  addDescriptor(addr: number | bigint, len: number, id: number, flags: number): void {
    if (this.#chainHead < 0) throw new RangeError('addDescriptor without beginChain');
    let lo: number;
    let hi: number;
    if (typeof addr === 'bigint') {
      if (addr < 0n || addr > 0xffff_ffff_ffff_ffffn) throw new RangeError(`descriptor address is not a u64: ${addr}`);
      lo = Number(addr & 0xffff_ffffn);
      hi = Number(addr >> 32n);
    } else {
      if (!Number.isSafeInteger(addr) || addr < 0) throw new RangeError(`descriptor address is not exact: ${addr}`);
      lo = addr >>> 0;
      hi = Math.floor(addr / TWO_32);
    }
    if (!Number.isInteger(len) || len < 0 || len > 0xffff_ffff) throw new RangeError(`descriptor length is not a u32: ${len}`);
    checkU16(id, 'descriptor id');
    checkU16(flags, 'descriptor flags');
    this.addRingDescriptor(lo, hi, len, id, flags);
  }

  /**
   * `addDescriptor` with the address as its two u32 halves and every field already in range (the datapath's form:
   * the queue's `PackedRingRecord` holds exactly these; no conversion, no allocation).
   */
  addRingDescriptor(lo: number, hi: number, len: number, id: number, flags: number): void {
    if (this.#chainHead < 0) throw new RangeError('addDescriptor without beginChain');
    if (this.#chainLen >= this.#ringSize) throw new RangeError(`a chain of more than ${this.#ringSize} ring descriptors`);
    const e = this.#cursor;
    if (e >= this.descNum) {
      this.#chainHead = -1;
      throw new VirtioError(
        'VIRTIO_INFLIGHT_EXHAUSTED',
        `more ring descriptors in flight than the ${this.descNum} the inflight region tracks`,
      );
    }
    const { u16, u32 } = this.#v;
    // Entries still on the committed free list (old_free_head has not moved past them): a crash leaves them free,
    // whatever they hold. So plain stores: endChain's Atomics.store of the inflight flag, which commits them, is a
    // release that makes them visible first.
    u32[P_U32(e, PackedRegion.D_ADDR)] = lo;
    u32[P_U32(e, PackedRegion.D_ADDR) + 1] = hi;
    u32[P_U32(e, PackedRegion.D_LEN)] = len;
    u16[P_U16(e, PackedRegion.D_ID)] = id;
    u16[P_U16(e, PackedRegion.D_FLAGS)] = flags;
    this.#chainLast = e;
    this.#chainId = id;
    this.#chainLen++;
    this.#cursor = this.#next[e] as number;
  }

  /**
   * Ends the chain: it is in flight, under its buffer id (its last descriptor's `id`, below the ring size and not
   * in flight: the queue has checked both). Returns its head entry.
   */
  endChain(): number {
    const e0 = this.#chainHead;
    if (e0 < 0) throw new RangeError('endChain without beginChain');
    if (this.#chainLen === 0) throw new RangeError('endChain: a chain has at least one descriptor');
    const id = this.#chainId;
    if (id >= this.#ringSize || this.#entryOfId[id] !== -1) {
      this.#chainHead = -1;
      throw new RangeError(`endChain: buffer id ${id} is out of range or already in flight`);
    }
    const { u8, u16, u32 } = this.#v;
    const c = this.#counter;
    // The head's bookkeeping, then inflight = 1, all while old_free_head still points at e0: a crash up to the
    // old_free_head store below finds e0 on the free list, clears it and does not resubmit the chain (it had no
    // side effect yet), and the avail position it computes leaves the chain in the ring to be taken again.
    // (Plain stores before the flag's Atomics.store: it is their release.)
    u16[P_U16(e0, PackedRegion.D_LAST)] = this.#chainLast;
    u16[P_U16(e0, PackedRegion.D_NUM)] = this.#chainLen;
    storeCounter(u32, P_U32(e0, PackedRegion.D_COUNTER), c);
    Atomics.store(u8, P_INFLIGHT(e0), 1);
    // free_head, then old_free_head: the commit of the mark. Between the two, fh !== ofh with equal positions: a
    // recovery rolls the free head back (as above).
    Atomics.store(u16, P_FREE_HEAD, this.#cursor);
    Atomics.store(u16, P_OLD_FREE_HEAD, this.#cursor);
    this.#counter = c + 1;
    this.#last[e0] = this.#chainLast;
    this.#num[e0] = this.#chainLen;
    this.#entryOfId[id] = e0;
    this.#freeHead = this.#cursor;
    this.#chainHead = -1;
    return e0;
  }

  /** Drops an open chain (nothing of it was committed). */
  abortChain(): void {
    this.#chainHead = -1;
  }

  /** `beginChain`, `addDescriptor` for each of `descs`, `endChain`. */
  markChain(descs: ArrayLike<{ readonly addr: number | bigint; readonly len: number; readonly id: number; readonly flags: number }>): number {
    this.beginChain();
    try {
      for (let i = 0; i < descs.length; i++) {
        const d = descs[i] as { readonly addr: number | bigint; readonly len: number; readonly id: number; readonly flags: number };
        this.addDescriptor(d.addr, d.len, d.id, d.flags);
      }
      return this.endChain();
    } catch (err) {
      this.#chainHead = -1;
      throw err;
    }
  }

  /** Records that the chain with buffer id `id` was pushed as used (`queue.pushUsed(id, len)`), in the same order. */
  pushUsed(id: number): void {
    if (this.#ringSize === 0) throw new RangeError('pushUsed before recover');
    if (this.#phase === PREPARED) throw new RangeError('pushUsed between prepareUsed and commitUsed');
    if (!Number.isInteger(id) || id < 0 || id >= this.#ringSize) throw new RangeError(`pushUsed: id ${id} is out of range`);
    const e = this.#entryOfId[id] as number;
    if (e < 0) throw new RangeError(`pushUsed: buffer id ${id} is not in flight`);
    this.#entryOfId[id] = -1;
    this.#batch[this.#batchLen++] = e;
  }

  /**
   * Just before the queue publishes the batch (`queue.publishUsed()`): returns the batch's chains to the free list
   * and moves the used position, in the region (spec steps 3-4 per chain, then "increase used_idx").
   */
  prepareUsed(): void {
    if (this.#batchLen === 0) return;
    if (this.#phase === PREPARED) throw new RangeError('prepareUsed twice');
    if (this.#chainHead >= 0) throw new RangeError('prepareUsed with a chain open');
    const { u8, u16 } = this.#v;
    const period = 2 * this.#ringSize;
    let fh = this.#freeHead;
    let pos = this.#used;
    // Links into entries in flight only (desc[last].next): the committed free list from old_free_head is untouched,
    // so a rollback to it finds it intact.
    for (let k = 0; k < this.#batchLen; k++) {
      const e = this.#batch[k] as number;
      const last = this.#last[e] as number;
      u16[P_U16(last, PackedRegion.D_NEXT)] = fh; // plain: the Atomics.store of free_head below is its release
      this.#next[last] = fh;
      fh = e;
      pos = (pos + (this.#num[e] as number)) % period;
    }
    // free_head, then the used position (wrap, index). Until the ring is published, any prefix of these reads as
    // "not published" (the ring flags at old_used_idx still say available) and is rolled back.
    Atomics.store(u16, P_FREE_HEAD, fh);
    const wrap = pos < this.#ringSize ? 1 : 0;
    Atomics.store(u8, P_USED_WRAP, wrap);
    Atomics.store(u16, P_USED_IDX, wrap === 1 ? pos : pos - this.#ringSize);
    this.#freeHead = fh;
    this.#used = pos;
    this.#phase = PREPARED;
  }

  /**
   * Just after the queue published the batch: clears the chains' inflight flags and commits (spec: `old_free_head`,
   * `old_used_idx`, `old_used_wrap_counter` = the current ones).
   */
  commitUsed(): void {
    if (this.#batchLen === 0) return;
    if (this.#phase !== PREPARED) throw new RangeError('commitUsed without prepareUsed');
    const { u8, u16 } = this.#v;
    // A crash during these: the batch's first used descriptor is in the ring, the recovery commits and clears them.
    for (let k = 0; k < this.#batchLen; k++) Atomics.store(u8, P_INFLIGHT(this.#batch[k] as number), 0);
    // old_free_head first: from here free_head === old_free_head tells a recovery that the batch was published,
    // without reading the old position, which the next two stores may leave torn (index of one, wrap of the other).
    Atomics.store(u16, P_OLD_FREE_HEAD, this.#freeHead);
    const wrap = this.#used < this.#ringSize ? 1 : 0;
    Atomics.store(u8, P_OLD_USED_WRAP, wrap);
    Atomics.store(u16, P_OLD_USED_IDX, wrap === 1 ? this.#used : this.#used - this.#ringSize);
    this.#batchLen = 0;
    this.#phase = IDLE;
  }
}

/**
 * The device side of a virtqueue, whatever its layout (split: split-queue.ts; packed: packed-queue.ts). The worker
 * loop and the devices' queue handlers use only this, so a device serves both layouts without knowing which one it
 * has. Guest memory is passed in (`attach`, `popChain`), never hidden.
 *
 * Positions: a split queue counts chains with a 16-bit index; a packed queue counts descriptor slots with a 15-bit
 * index and a wrap counter, encoded as `index | wrap << 15` (the vhost-user SET/GET_VRING_BASE encoding). Callers
 * treat positions (`getBase`, `seenAvailIdx`) as opaque values to hand back, never as numbers to do arithmetic on.
 */
import type { DirtyLog } from '../memory/dirty-log.js';
import type { GuestMemory } from '../memory/guest-memory.js';
import type { DescriptorChain } from './descriptor-chain.js';
import { PackedQueue } from './packed-queue.js';
import { SplitQueue } from './split-queue.js';

export interface DeviceQueue {
  /** Number of entries (descriptors for packed, chains' heads for split). */
  readonly size: number;
  /** Most data descriptors a chain may hold; a `DescriptorChain` passed to `popChain` needs this capacity. */
  readonly maxChainLength: number;
  /** Whether VIRTIO_F_RING_EVENT_IDX was negotiated. */
  readonly eventIdx: boolean;

  /** (Re)builds the ring views from a memory table: at start and at every quiescent point that switches tables. */
  attach(mem: GuestMemory): void;
  /**
   * Migration: logs each later write of the queue into its rings in `log` (undefined: no more), after the write.
   * Split rings log their used ring at `usedLogAddr` (vhost-user's `log_guest_addr`; default the used ring's GPA);
   * packed rings log where they write. What the device writes into buffers is logged by the worker.
   */
  setDirtyLog(log: DirtyLog | undefined, usedLogAddr?: number): void;
  /** Drops the ring views (the queue stops or its memory goes). */
  detach(): void;
  readonly attached: boolean;
  /** A chain object with the capacity `popChain` needs. Allocate once, reuse for every pop. */
  createChain(): DescriptorChain;

  /**
   * Where the device resumes: `base` from SET_VRING_BASE (the next available position to process). The used
   * position is taken from the ring where the layout has it in guest memory (split: used.idx, as libvhost-user and
   * DPDK do after a reconnect), else it equals `base` (packed: nothing may be in flight when the ring was stopped).
   */
  resume(base: number): void;
  /**
   * Where the layout keeps the used position in guest memory (split: used.idx) and it differs from where `resume`
   * put the avail position: moves both there and returns the avail position it moved from; otherwise -1 (packed:
   * always). For a frontend that resumes a ring it lost track of without an inflight region (DPDK's virtio_user
   * sends 0 after a reconnect, whatever the ring says), as DPDK's own backend does: every chain before used.idx was
   * completed, every one after it is taken again.
   */
  resyncToUsed(): number;
  /** GET_VRING_BASE: the next available position to process. */
  getBase(): number;

  /**
   * Pops the next available chain into `chain`, validating every descriptor (hard bounds, no double fetch). Returns
   * false when none is available. Throws a `VirtioError` (nothing consumed) on a malformed chain.
   * `chain.head` is what `pushUsed` takes back: the head index (split) or the buffer id (packed).
   */
  popChain(mem: GuestMemory, chain: DescriptorChain): boolean;
  /** Gives back the chain popped last (only right after a successful `popChain`, before completing it). */
  unpop(): void;
  /** Writes a used element for `head` with `len` bytes written, without publishing it. Any order (out of order). */
  pushUsed(head: number, len: number): void;
  /** Makes the elements pushed so far visible to the driver, in one publication with the ordering the spec demands. */
  publishUsed(): void;
  /** Whether the driver wants a notification for what was published since the last call. After `publishUsed`. */
  needsNotification(): boolean;

  /** Asks the driver not to notify (kick) while the device polls the ring. */
  disableNotification(): void;
  /**
   * Asks the driver to notify again once it makes anything available past `seen` (default: past what the device
   * has popped), then re-checks the ring: true means chains are available past `seen` and the caller must process
   * them (their notification may never come).
   */
  enableNotification(seen?: number): boolean;
  /** The available position the last `popChain` or `enableNotification` saw (for `enableNotification(seen)`). */
  readonly seenAvailIdx: number;
  /** Whether a chain is available now (a fresh read; no notification change). */
  hasAvailable(): boolean;
  /** Whether the driver made anything available past position `seen` (a fresh read). */
  availableSince(seen: number): boolean;
}

/** A queue as vhost-user describes it (SET_VRING_NUM, SET_VRING_ADDR, the negotiated features). */
export interface DeviceQueueConfig {
  /** VIRTIO_F_RING_PACKED was negotiated. */
  readonly packed: boolean;
  readonly size: number;
  readonly descAddr: number;
  /** Split: the available ring; packed: the driver event suppression area. */
  readonly availAddr: number;
  /** Split: the used ring; packed: the device event suppression area. */
  readonly usedAddr: number;
  readonly eventIdx: boolean;
  readonly indirect: boolean;
  /** See `SplitQueueConfig.cacheViews`. */
  readonly cacheViews?: boolean;
}

/** The device side of a queue of either layout (not attached: see `attach`). */
export function createDeviceQueue(config: DeviceQueueConfig): DeviceQueue {
  const { size, descAddr, availAddr, usedAddr, eventIdx, indirect, cacheViews = true } = config;
  return config.packed
    ? new PackedQueue({ size, descAddr, driverAddr: availAddr, deviceAddr: usedAddr, eventIdx, indirect, cacheViews })
    : new SplitQueue({ size, descAddr, availAddr, usedAddr, eventIdx, indirect, cacheViews });
}

/**
 * INFLIGHT_SHMFD in a queue worker: one running queue's tracking in its part of the inflight region, for either
 * ring layout, behind one small interface the worker loop calls at the four points that matter:
 *
 *   start     `startQueueInflight`: the region says where the ring resumes (not SET_VRING_BASE: QEMU restores a
 *             split ring to used.idx and cannot restore a packed one at all), repairs a half-published batch, and
 *             lines up what was in flight for `next` to take again first, oldest first;
 *   take      `next`: the resubmitted chains, then the ring's new chains, each marked in the region before the
 *             request has any side effect;
 *   complete  `pushUsed` with every `queue.pushUsed`;
 *   publish   `prepareUsed` just before `queue.publishUsed()`, `commitUsed` just after.
 *
 * A resubmitted chain is validated like any other: split rings take its head again from the descriptor table
 * (`SplitQueue.popChainAt`); packed rings write the saved ring descriptors back into the ring slots they held
 * (`PackedQueue.restoreInFlight`), so the ordinary `popChain` reads them again. The region layouts, recovery and its
 * crash-safety: inflight-region.ts.
 */
import { VirtioError } from '../errors.js';
import type { GuestMemory } from '../memory/guest-memory.js';
import type { DescriptorChain } from '../queue/descriptor-chain.js';
import type { DeviceQueue } from '../queue/device-queue.js';
import { PackedQueue, type PackedRingRecord } from '../queue/packed-queue.js';
import { SplitQueue } from '../queue/split-queue.js';
import { InflightRegion, type InflightAnomalies, type InflightGeometry, type PackedInflightQueue, type SplitInflightQueue } from './inflight-region.js';

/** What a ring start found in the region (logged by the session). */
export interface InflightRecovered {
  /** Requests in flight before the restart, taken again first. */
  readonly resubmitted: number;
  /** Split: entries of a published batch cleared; packed: 1 when a half-done batch was committed, else 0. */
  readonly repaired: number;
  /** The region was (re)initialised: nothing to take again. */
  readonly fresh: boolean;
  readonly anomalies: InflightAnomalies;
}

/** One running queue's inflight tracking (see the module documentation). */
export interface QueueInflight {
  readonly recovered: InflightRecovered;
  /** Takes the next request into `chain`, marked in the region; false when there is none. */
  next(memory: GuestMemory, chain: DescriptorChain): boolean;
  pushUsed(head: number): void;
  prepareUsed(): void;
  commitUsed(): void;
}

/**
 * Starts tracking ring `index` (already resumed at SET_VRING_BASE and attached) in `region`: recovers what the region
 * holds and moves the queue's positions to where it says.
 */
export function startQueueInflight(queue: DeviceQueue, buffer: SharedArrayBuffer, geometry: InflightGeometry, index: number, base: number): QueueInflight {
  const region = new InflightRegion(buffer, geometry);
  if (queue instanceof SplitQueue) return new SplitTracking(queue, region.splitQueue(index));
  if (queue instanceof PackedQueue) return new PackedTracking(queue, region.packedQueue(index), base);
  throw new TypeError('inflight tracking needs a split or a packed queue');
}

/** What both layouts' trackers do alike: completions and the publication are passed on as they are. */
abstract class Tracking<T extends SplitInflightQueue | PackedInflightQueue> implements QueueInflight {
  abstract readonly recovered: InflightRecovered;
  protected readonly tracker: T;

  constructor(tracker: T) {
    this.tracker = tracker;
  }

  abstract next(memory: GuestMemory, chain: DescriptorChain): boolean;

  pushUsed(head: number): void {
    this.tracker.pushUsed(head);
  }

  prepareUsed(): void {
    this.tracker.prepareUsed();
  }

  commitUsed(): void {
    this.tracker.commitUsed();
  }
}

class SplitTracking extends Tracking<SplitInflightQueue> {
  readonly recovered: InflightRecovered;
  readonly #queue: SplitQueue;
  /** Heads to take again, oldest first; `#taken` of them are. */
  readonly #resubmit: readonly number[];
  #taken = 0;

  constructor(queue: SplitQueue, tracker: SplitInflightQueue) {
    super(tracker);
    this.#queue = queue;
    // Resume at used.idx plus what is in flight (libvhost-user vu_check_queue_inflights).
    const rec = tracker.recover(queue.ringUsedIdx(), queue.size);
    queue.setBase(rec.lastAvailIdx, rec.usedIdx);
    this.#resubmit = rec.resubmit;
    this.recovered = { resubmitted: rec.resubmit.length, repaired: rec.repaired, fresh: rec.fresh, anomalies: rec.anomalies };
  }

  next(memory: GuestMemory, chain: DescriptorChain): boolean {
    if (this.#taken < this.#resubmit.length) {
      // Still marked in the region from before the restart: not marked again.
      this.#queue.popChainAt(memory, chain, this.#resubmit[this.#taken++] as number);
      return true;
    }
    if (!this.#queue.popChain(memory, chain)) return false;
    if (!this.tracker.markInflight(chain.head)) throw headInFlight(chain.head);
    return true;
  }
}

class PackedTracking extends Tracking<PackedInflightQueue> {
  readonly recovered: InflightRecovered;
  readonly #queue: PackedQueue;
  readonly #record: PackedRingRecord;
  /** Buffer ids of the chains to take again, oldest first; `#taken` of them are. */
  readonly #resubmit: readonly number[];
  #taken = 0;

  constructor(queue: PackedQueue, tracker: PackedInflightQueue, base: number) {
    super(tracker);
    this.#queue = queue;
    this.#record = queue.recordRingDescriptors();
    const rec = tracker.recover({
      ringSize: queue.size,
      base,
      ringFlagsAt: (slot) => queue.ringFlags(slot),
      setRingFlags: (slot, flags) => queue.setRingFlags(slot, flags),
    });
    // The chains in flight go back into the ring slots between the used and the avail position (the region's
    // positions: QEMU sends a stale base after a crash), where popChain takes them again.
    queue.restoreInFlight(rec.usedPosition, rec.resubmit.map((r) => r.descriptors));
    this.#resubmit = rec.resubmit.map((r) => r.id);
    this.recovered = {
      resubmitted: rec.resubmit.length,
      repaired: rec.batch === 'committed' ? 1 : 0,
      fresh: rec.fresh,
      anomalies: rec.anomalies,
    };
  }

  next(memory: GuestMemory, chain: DescriptorChain): boolean {
    if (!this.#queue.popChain(memory, chain)) {
      // The restored chains are in the ring: one that is not available any more was overwritten by the driver.
      if (this.#taken < this.#resubmit.length) throw resubmitLost(this.#resubmit[this.#taken] as number, -1);
      return false;
    }
    if (this.#taken < this.#resubmit.length) {
      // Still marked in the region from before the restart: not marked again.
      const want = this.#resubmit[this.#taken++] as number;
      if (chain.head !== want) throw resubmitLost(want, chain.head);
      return true;
    }
    // Copy the ring descriptors as popChain read and validated them, before the request has any side effect.
    const t = this.tracker;
    const r = this.#record;
    t.beginChain();
    try {
      for (let k = 0; k < r.count; k++) t.addRingDescriptor(r.addrLo[k] as number, r.addrHi[k] as number, r.len[k] as number, r.id[k] as number, r.flags[k] as number);
      t.endChain();
    } catch (err) {
      t.abortChain();
      throw err;
    }
    return true;
  }
}

function headInFlight(head: number): VirtioError {
  // The driver made a head available again while its request is still in flight: accepting it would complete one
  // head twice.
  return new VirtioError('VIRTIO_HEAD_IN_FLIGHT', `descriptor ${head} is already in flight`);
}

function resubmitLost(want: number, got: number): VirtioError {
  return new VirtioError(
    'VIRTIO_INFLIGHT_RESUBMIT_CHANGED',
    `the ring slots of a chain in flight before the restart (buffer id ${want}) were changed by the driver` +
      (got >= 0 ? ` (found buffer id ${got})` : ''),
  );
}

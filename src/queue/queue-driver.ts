/**
 * The driver side of a virtqueue whatever its layout: what the TypeScript frontend, its blk and net drivers and the
 * load generators use, so that one code path drives split rings (`SplitQueueDriver`) and packed rings
 * (`PackedQueueDriver`, VIRTIO_F_RING_PACKED). Raw accessors for malformed rings stay on the two classes.
 *
 * Positions (`availPosition`, `resetPositions`) are what SET/GET_VRING_BASE carry for the layout: the 16-bit avail
 * index of a split ring, `index | wrap << 15` of a packed one.
 */
import type { GuestMemory } from '../memory/guest-memory.js';
import { PackedQueueDriver } from './packed-queue-driver.js';
import { SplitQueueDriver, type AddChainOptions, type RingLayout, type Segment } from './split-queue-driver.js';

/** The operations a device driver needs from a virtqueue's driver side. `T` is the per-chain token. */
export interface QueueDriver<T = unknown> {
  readonly size: number;
  readonly eventIdx: boolean;
  /** Whether this is a packed ring. */
  readonly packed: boolean;
  /** Ring entries free for new chains (split: descriptors; packed: ring slots). A chain of n direct segments takes n, an indirect one 1. */
  readonly freeCount: number;
  /** Chains added and not yet returned by `pollUsed`. */
  readonly inFlight: number;
  /** The next position the driver fills (split: avail index; packed: `index | wrap << 15`). */
  readonly availPosition: number;
  /** Adds a chain (readable segments first), not visible until `publish`. Returns its id, or -1 when the ring is full. */
  addChain(segments: readonly Segment[], token: T, options?: AddChainOptions): number;
  /** Makes the chains added since the last call visible to the device. */
  publish(): void;
  /** Whether the device wants a kick for what was published since the last call. */
  kickNeeded(): boolean;
  /** Consumes the completions the device published, calling `cb(token, len)` for each; returns how many. */
  pollUsed(cb: (token: T, len: number) => void): number;
  /** Asks for a used buffer notification; true when completions are already waiting (poll them). */
  enableInterrupts(): boolean;
  /** Asks the device not to notify. */
  disableInterrupts(): void;
  /** Moves the driver's positions to `pos`, as if the ring had been used up to there. Only with nothing in flight. */
  resetPositions(pos: number): void;
}

/** Which layout and where: what `createQueueDriver` builds. */
export interface QueueDriverOptions {
  readonly packed: boolean;
  readonly size: number;
  /** Guest-physical address the ring areas start at (rounded up to 16). */
  readonly base: number;
  readonly eventIdx: boolean;
}

/**
 * The ring areas of a queue at `base`, under their vhost-user names (SET_VRING_ADDR): for a packed ring `availAddr`
 * is the driver event suppression area and `usedAddr` the device's.
 */
export function queueDriverLayout(packed: boolean, size: number, base: number): RingLayout {
  if (!packed) return SplitQueueDriver.layout(size, base);
  const l = PackedQueueDriver.layout(size, base);
  return { descAddr: l.descAddr, availAddr: l.driverAddr, usedAddr: l.deviceAddr, end: l.end };
}

/** A zeroed ring of the given layout at `options.base` in `mem`, and its driver. */
export function createQueueDriver<T>(mem: GuestMemory, options: QueueDriverOptions): { layout: RingLayout; driver: QueueDriver<T> } {
  const { packed, size, eventIdx } = options;
  const layout = queueDriverLayout(packed, size, options.base);
  const { descAddr, availAddr, usedAddr } = layout;
  const driver: QueueDriver<T> = packed
    ? new PackedQueueDriver<T>(mem, { size, descAddr, driverAddr: availAddr, deviceAddr: usedAddr, eventIdx })
    : new SplitQueueDriver<T>(mem, { size, descAddr, availAddr, usedAddr, eventIdx });
  return { layout, driver };
}

// Tests that write malformed packed rings need the raw accessors of `PackedQueueDriver`, which the frontend's
// layout-independent `QueueDriver` does not have.
import type { FrontendQueue } from '../../src/frontend/frontend.js';
import type { QueueDriver } from '../../src/queue/queue-driver.js';
import { PackedQueueDriver } from '../../src/queue/packed-queue-driver.js';

/** The packed ring driver of a frontend queue (started with VIRTIO_F_RING_PACKED). */
export function packedDriver(q: FrontendQueue): PackedQueueDriver<number> {
  const d: QueueDriver<number> = q.driver;
  if (!(d instanceof PackedQueueDriver)) throw new Error(`queue ${q.index} is not a packed ring`);
  return d as PackedQueueDriver<number>;
}

// Tests that write malformed split rings need the raw accessors of `SplitQueueDriver`, which the frontend's
// layout-independent `QueueDriver` does not have.
import type { FrontendQueue } from '../../src/frontend/frontend.js';
import type { QueueDriver } from '../../src/queue/queue-driver.js';
import { SplitQueueDriver } from '../../src/queue/split-queue-driver.js';

/** The split ring driver of a frontend queue (started without VIRTIO_F_RING_PACKED). */
export function splitDriver(q: FrontendQueue): SplitQueueDriver<number> {
  const d: QueueDriver<number> = q.driver;
  if (!(d instanceof SplitQueueDriver)) throw new Error(`queue ${q.index} is not a split ring`);
  return d as SplitQueueDriver<number>;
}

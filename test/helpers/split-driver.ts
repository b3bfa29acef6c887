// Tests that write malformed split rings need the raw accessors of `SplitQueueDriver`, which the frontend's
// layout-independent `QueueDriver` does not have.
import type { FrontendQueue } from '../../src/frontend/frontend.js';
import { SplitQueueDriver } from '../../src/queue/split-queue-driver.js';

/** The split ring driver of a frontend queue (started without VIRTIO_F_RING_PACKED). */
export function splitDriver(q: FrontendQueue): SplitQueueDriver<number> {
  if (!(q.driver instanceof SplitQueueDriver)) throw new Error(`queue ${q.index} is not a split ring`);
  return q.driver;
}

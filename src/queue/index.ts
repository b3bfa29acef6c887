/** Virtqueues, split and packed: the device side (`DeviceQueue`), descriptor chains and their readers/writers, the driver side (`QueueDriver`). */
export * from './constants.js';
export { ChainReader, ChainWriter, DescriptorChain, copyFromGuest, copyToGuest } from './descriptor-chain.js';
export { SplitQueue, isValidQueueSize, type SplitQueueConfig } from './split-queue.js';
export {
  SplitQueueDriver,
  type AddChainOptions,
  type DescriptorValue,
  type RawDescriptor,
  type RingLayout,
  type Segment,
  type SplitQueueDriverConfig,
} from './split-queue-driver.js';
export { createDeviceQueue, type DeviceQueue, type DeviceQueueConfig } from './device-queue.js';
export { createQueueDriver, queueDriverLayout, type QueueDriver, type QueueDriverOptions } from './queue-driver.js';
export {
  MAX_PACKED_QUEUE_SIZE,
  PACKED_EVENT_ALIGN,
  PackedQueue,
  VRING_PACKED_DESC_F_AVAIL,
  VRING_PACKED_DESC_F_USED,
  VRING_PACKED_EVENT_FLAG_DESC,
  VRING_PACKED_EVENT_FLAG_DISABLE,
  VRING_PACKED_EVENT_FLAG_ENABLE,
  VRING_PACKED_EVENT_F_WRAP_CTR,
  isValidPackedQueueSize,
  packedLinear,
  packedNeedEvent,
  packedPosition,
  type PackedQueueConfig,
} from './packed-queue.js';
export {
  PackedQueueDriver,
  packedAvailBits,
  packedUsedBits,
  type PackedDescriptorValue,
  type PackedEvent,
  type PackedQueueDriverConfig,
  type PackedRawDescriptor,
  type PackedRingLayout,
} from './packed-queue-driver.js';

/** Split virtqueues: the device side (`SplitQueue`), descriptor chains and their readers/writers, the driver side. */
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

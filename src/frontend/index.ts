/** The vhost-user frontend (driver side): guest RAM, the protocol client, and virtio-blk, virtio-net and virtio-vsock drivers. */
export {
  GuestRam,
  UVA_BASE,
  type AddRegionOptions,
  type AllocOptions,
  type GuestRamFile,
  type GuestRamRegion,
} from './guest-ram.js';
export {
  DeviceStatus,
  FrontendErrorCode,
  FrontendQueue,
  SUPPORTED_PROTOCOL_FEATURES,
  VhostUserFrontend,
  packedRingFeature,
  type FrontendOptions,
  type QueueConfig,
  type RequestOptions,
  type StartOptions,
} from './frontend.js';
export { MigrationLog } from './migration-log.js';
export {
  BlkDriver,
  BlkDriverErrorCode,
  parseBlkConfig,
  RAW_FAILED,
  type BlkConfig,
  type BlkDriverOptions,
  type BlkIdResult,
  type BlkReadResult,
  type BlkRawCallback,
  type BlkStartOptions,
} from './blk-driver.js';
export {
  NetDriver,
  NetDriverErrorCode,
  parseNetConfig,
  type NetConfig,
  type NetDriverOptions,
  type NetStartOptions,
  type TxLayout,
} from './net-driver.js';
export { VsockDriver, VsockDriverErrorCode, type VsockStartOptions } from './vsock-driver.js';

// Types and constants that appear in the signatures above, so that a user of `vhost-user/frontend` can name them
// and fill in the numeric arguments (request codes, feature bits, status bytes) without reaching into dist/.
export { VhostError, ProtocolError, VirtioError, type SystemError } from '../errors.js';
export type { GuestMemory } from '../memory/guest-memory.js';
export type { Message } from '../protocol/message-reader.js';
export type { MemoryRegion } from '../protocol/payloads.js';
export { FrontendRequest, ProtocolFeature, VirtioFeature, featureBit, hasFeature } from '../protocol/constants.js';
export {
  SplitQueueDriver,
  type AddChainOptions,
  type DescriptorValue,
  type RawDescriptor,
  type RingLayout,
  type Segment,
  type SplitQueueDriverConfig,
} from '../queue/split-queue-driver.js';
export { PackedQueueDriver, type PackedQueueDriverConfig, type PackedRawDescriptor } from '../queue/packed-queue-driver.js';
export type { QueueDriver } from '../queue/queue-driver.js';
export { BlkFeature, BlkStatus, SECTOR_SIZE } from '../devices/blk/constants.js';
export { NetFeature } from '../devices/net/constants.js';

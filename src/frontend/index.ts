/** The vhost-user frontend (driver side): guest RAM, the protocol client, and virtio-blk and virtio-net drivers. */
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
  type FrontendOptions,
  type QueueConfig,
  type RequestOptions,
  type StartOptions,
} from './frontend.js';
export {
  BlkDriver,
  BlkDriverErrorCode,
  parseBlkConfig,
  type BlkConfig,
  type BlkDriverOptions,
  type BlkIdResult,
  type BlkReadResult,
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

/**
 * vhost-user protocol constants: message types, header flags, feature bits and size limits.
 *
 * Source: QEMU `docs/interop/vhost-user.rst` ("the spec" below; section names are quoted), cross-checked against
 * rust-vmm `vhost/src/vhost_user/message.rs`. Where rust-vmm knows a number the stored spec revision does not yet
 * list, the constant says so.
 *
 * Numbers are `as const` objects (the project compiles with `erasableSyntaxOnly`: no `enum`).
 */

/**
 * Front-end message types: requests the front-end (QEMU, our frontend) sends to the back-end on the main socket.
 * Spec: "Front-end message types".
 */
export const FrontendRequest = {
  /** Reply: u64 virtio feature bits. */
  GET_FEATURES: 1,
  /** Payload: u64 acknowledged virtio feature bits. */
  SET_FEATURES: 2,
  /** No payload. "Session start". */
  SET_OWNER: 3,
  /** Deprecated, no payload: back-ends ignore it or disable all rings. */
  RESET_OWNER: 4,
  /** Payload: multiple memory regions description; one fd per region. */
  SET_MEM_TABLE: 5,
  /** Payload: log description (QEMU sends `VhostUserLog`, the spec table says u64); one fd with LOG_SHMFD. */
  SET_LOG_BASE: 6,
  /** No payload; one fd (eventfd signalling log changes). */
  SET_LOG_FD: 7,
  /** Payload: vring state description (index, queue size). */
  SET_VRING_NUM: 8,
  /** Payload: vring address description. */
  SET_VRING_ADDR: 9,
  /** Payload: vring descriptor index (split) or indices (packed). */
  SET_VRING_BASE: 10,
  /** Payload: vring state description; reply: vring descriptor index/indices. Stops the ring. */
  GET_VRING_BASE: 11,
  /** Payload: u64 (bits 0-7 index, bit 8 no-fd); one fd unless bit 8 is set. */
  SET_VRING_KICK: 12,
  /** Payload: u64 (bits 0-7 index, bit 8 no-fd); one fd unless bit 8 is set. */
  SET_VRING_CALL: 13,
  /** Payload: u64 (bits 0-7 index, bit 8 no-fd); one fd unless bit 8 is set. */
  SET_VRING_ERR: 14,
  /** Reply: u64 protocol feature bits. Legal before SET_FEATURES. */
  GET_PROTOCOL_FEATURES: 15,
  /** Payload: u64 protocol feature bits. */
  SET_PROTOCOL_FEATURES: 16,
  /** Reply: u64 maximum number of queues (with MQ). */
  GET_QUEUE_NUM: 17,
  /** Payload: vring state description (num 1 = enable, 0 = disable). */
  SET_VRING_ENABLE: 18,
  /** Payload: u64 whose first 6 bytes are the guest MAC. */
  SEND_RARP: 19,
  /** Payload: u64 MTU. */
  NET_SET_MTU: 20,
  /** No payload; one fd: the back-end channel socket. Previous name SET_SLAVE_REQ_FD. */
  SET_BACKEND_REQ_FD: 21,
  /** Payload: IOTLB message; reply: u64. */
  IOTLB_MSG: 22,
  /** Payload: vring state description (num 0 = little endian, 1 = big endian). */
  SET_VRING_ENDIAN: 23,
  /** Payload and reply: virtio device config space. */
  GET_CONFIG: 24,
  /** Payload: virtio device config space. */
  SET_CONFIG: 25,
  /** Payload and reply: crypto session description. */
  CREATE_CRYPTO_SESSION: 26,
  /** Payload: u64 session id. */
  CLOSE_CRYPTO_SESSION: 27,
  /** No payload; reply carries the userfault fd. */
  POSTCOPY_ADVISE: 28,
  /** No payload. */
  POSTCOPY_LISTEN: 29,
  /** No payload; reply: u64. */
  POSTCOPY_END: 30,
  /** Payload: inflight description; reply: inflight description plus one fd. */
  GET_INFLIGHT_FD: 31,
  /** Payload: inflight description; one fd. */
  SET_INFLIGHT_FD: 32,
  /** No payload; one fd: the vhost-user-gpu socket. */
  GPU_SET_SOCKET: 33,
  /** No payload. Disable all rings and reset device state. */
  RESET_DEVICE: 34,
  /** Payload: vring state description (in-band kick, num reserved 0). */
  VRING_KICK: 35,
  /** Reply: u64 maximum number of memory slots. */
  GET_MAX_MEM_SLOTS: 36,
  /** Payload: single memory region description; one fd. */
  ADD_MEM_REG: 37,
  /** Payload: single memory region description; no fd (one stray fd tolerated, see `optionalFdCount`). */
  REM_MEM_REG: 38,
  /** Payload: u64 virtio device status. */
  SET_STATUS: 39,
  /** Reply: u64 virtio device status. */
  GET_STATUS: 40,
  /** Payload: VhostUserShared (UUID); reply: optionally a dma-buf fd. */
  GET_SHARED_OBJECT: 41,
  /** Payload: device state transfer parameters; one fd; reply: u64 (bit 8: no fd) plus optionally one fd. */
  SET_DEVICE_STATE_FD: 42,
  /** No payload; reply: u64 (0 = success). */
  CHECK_DEVICE_STATE: 43,
  /** Reply: shared memory configuration. Known to rust-vmm; not yet in the stored spec revision. */
  GET_SHMEM_CONFIG: 44,
} as const;

/** One of the `FrontendRequest` numbers. */
export type FrontendRequestCode = (typeof FrontendRequest)[keyof typeof FrontendRequest];

/**
 * Back-end message types: requests the back-end sends to the front-end on the back-end channel (the socket passed
 * with SET_BACKEND_REQ_FD). Spec: "Back-end message types" (previous names `VHOST_USER_SLAVE_*`).
 */
export const BackendRequest = {
  /** Payload: IOTLB message (miss or access failure). */
  IOTLB_MSG: 1,
  /** No payload: the device configuration space changed. */
  CONFIG_CHANGE_MSG: 2,
  /** Payload: vring area description; one fd unless bit 8 of its u64 is set. */
  VRING_HOST_NOTIFIER_MSG: 3,
  /** Payload: vring state description (in-band call). */
  VRING_CALL: 4,
  /** Payload: vring state description (in-band error). */
  VRING_ERR: 5,
  /** Payload: VhostUserShared (UUID). */
  SHARED_OBJECT_ADD: 6,
  /** Payload: VhostUserShared (UUID). */
  SHARED_OBJECT_REMOVE: 7,
  /** Payload: VhostUserShared (UUID); reply: u64 plus a dma-buf fd on success. */
  SHARED_OBJECT_LOOKUP: 8,
  /** Map a file into a shared memory region; one fd. Known to rust-vmm; not yet in the stored spec revision. */
  SHMEM_MAP: 9,
  /** Unmap from a shared memory region. Known to rust-vmm; not yet in the stored spec revision. */
  SHMEM_UNMAP: 10,
} as const;

/** One of the `BackendRequest` numbers. */
export type BackendRequestCode = (typeof BackendRequest)[keyof typeof BackendRequest];

/** Spec "Header": `flags` bits. */
export const HeaderFlag = {
  /** The protocol version, the only one defined (stored in the lower 2 bits). */
  VERSION: 0x1,
  /** Mask of the version field (the lower 2 bits). */
  VERSION_MASK: 0x3,
  /** Bit 2: the message is a reply. */
  REPLY: 0x4,
  /** Bit 3: the sender wants a reply (REPLY_ACK), see spec "VHOST_USER_PROTOCOL_F_REPLY_ACK". */
  NEED_REPLY: 0x8,
} as const;

/** Size of the message header: request u32, flags u32, size u32 (spec "Header"). */
export const HEADER_SIZE = 12;

/**
 * Default cap on a message payload, in bytes (rust-vmm `MAX_MSG_SIZE` = 0x1000). The header's u32 size field would
 * allow 4 GiB; the largest messages we accept are GET/SET_CONFIG (12 + 256 bytes) and SET_MEM_TABLE (8 + 8 * 32).
 */
export const MAX_PAYLOAD_SIZE = 4096;

/** Most fds the reader keeps queued at once (rust-vmm `MAX_ATTACHED_FD_ENTRIES`). */
export const MAX_FDS = 32;

/**
 * Most regions in one SET_MEM_TABLE (spec "Multiple Memory regions description": region0 ... region7; QEMU
 * `VHOST_MEMORY_BASELINE_NREGIONS`). More regions need CONFIGURE_MEM_SLOTS and ADD_MEM_REG.
 */
export const MAX_MEM_TABLE_REGIONS = 8;

/** Size of one memory region description (guest address, size, user address, mmap offset: 4 x u64). */
export const MEMORY_REGION_SIZE = 32;

/** Largest virtio device config space access in GET_CONFIG/SET_CONFIG (QEMU `VHOST_USER_MAX_CONFIG_SIZE`). */
export const MAX_CONFIG_SIZE = 256;

/** Size of the offset/size/flags prefix of the config space payload (QEMU `VHOST_USER_CONFIG_HDR_SIZE`). */
export const CONFIG_HEADER_SIZE = 12;

/** Kick/call/err u64 payloads (spec SET_VRING_KICK): bits 0-7 hold the vring index. */
export const VRING_INDEX_MASK = 0xff;

/** Kick/call/err u64 payloads: bit 8 is the "invalid FD" flag: no fd is attached (polling). */
export const VRING_NOFD_BIT = 0x100;

/** Spec "Migration": dirty log page size. */
export const LOG_PAGE_SIZE = 0x1000;

/** Vring address description `flags` (spec "Migration"): log writes to the used ring (`VHOST_VRING_F_LOG`). */
export const VringAddrFlag = {
  LOG: 0x1,
} as const;

/**
 * Virtio device config space `flags` values (spec "Virtio device config space"). They are values, not bits:
 * QEMU's `VHOST_SET_CONFIG_TYPE_FRONTEND` = 0 and `VHOST_SET_CONFIG_TYPE_MIGRATION` = 1.
 */
export const ConfigFlag = {
  /** The front-end writes writable fields on behalf of the driver. */
  WRITABLE: 0,
  /** The front-end restores the config space during live migration. */
  MIGRATION: 1,
} as const;

/** IOTLB message `type` values (spec "An IOTLB message"). */
export const IotlbType = {
  MISS: 1,
  UPDATE: 2,
  INVALIDATE: 3,
  ACCESS_FAIL: 4,
} as const;

/** IOTLB message `perm` values (spec "An IOTLB message"). */
export const IotlbPerm = {
  NONE: 0,
  READ: 1,
  WRITE: 2,
  READ_WRITE: 3,
} as const;

/** Device state transfer `direction` (spec "Device state transfer parameters"). */
export const TransferDirection = {
  /** Back-end to front-end (migration source). */
  SAVE: 0,
  /** Front-end to back-end (migration destination). */
  LOAD: 1,
} as const;

/** Device state transfer `phase` (spec "Device state transfer parameters"). */
export const TransferPhase = {
  /** The VM is stopped and the device suspended. */
  STOPPED: 0,
} as const;

/**
 * Virtio feature bit numbers (not masks) that matter to the transport; device-specific bits live with each device.
 * Virtio 1.2 §6 "Reserved Feature Bits", plus the two bits vhost reuses (26 LOG_ALL, 30 PROTOCOL_FEATURES).
 * Feature sets are 64-bit: use `featureBit(n)` to get a `bigint` mask.
 */
export const VirtioFeature = {
  /** Legacy: notify when the available ring is empty. */
  NOTIFY_ON_EMPTY: 24,
  /** vhost: the front-end can log dirty pages (spec "Migration": `VHOST_F_LOG_ALL`). */
  LOG_ALL: 26,
  /** Legacy: any descriptor layout. */
  ANY_LAYOUT: 27,
  /** Indirect descriptor tables. */
  RING_INDIRECT_DESC: 28,
  /** used_event / avail_event notification suppression. */
  RING_EVENT_IDX: 29,
  /** vhost-user: the back-end supports GET/SET_PROTOCOL_FEATURES (`VHOST_USER_F_PROTOCOL_FEATURES`). */
  VHOST_USER_F_PROTOCOL_FEATURES: 30,
  /** Virtio 1.0+ device (non-legacy). */
  VERSION_1: 32,
  /** Addresses are IOVAs behind an IOMMU (formerly IOMMU_PLATFORM). */
  ACCESS_PLATFORM: 33,
  /** Packed virtqueue layout. */
  RING_PACKED: 34,
  /** Buffers are used in the order they were made available. */
  IN_ORDER: 35,
  /** Memory accesses are ordered as the platform orders them. */
  ORDER_PLATFORM: 36,
  /** Single root I/O virtualization. */
  SR_IOV: 37,
  /** The driver passes extra data in notifications. */
  NOTIFICATION_DATA: 38,
  /** The device provides the notification config data. */
  NOTIF_CONFIG_DATA: 39,
  /** Individual virtqueues can be reset. */
  RING_RESET: 40,
  /** Administration virtqueue. */
  ADMIN_VQ: 41,
} as const;

/**
 * vhost-user protocol feature bit numbers (spec "Protocol features"), negotiated with GET/SET_PROTOCOL_FEATURES.
 * Use `featureBit(n)` for the `bigint` mask.
 */
export const ProtocolFeature = {
  MQ: 0,
  LOG_SHMFD: 1,
  RARP: 2,
  REPLY_ACK: 3,
  /** QEMU calls it `NET_MTU`. */
  MTU: 4,
  /** Previous name SLAVE_REQ. */
  BACKEND_REQ: 5,
  CROSS_ENDIAN: 6,
  CRYPTO_SESSION: 7,
  PAGEFAULT: 8,
  CONFIG: 9,
  /** Previous name SLAVE_SEND_FD. */
  BACKEND_SEND_FD: 10,
  HOST_NOTIFIER: 11,
  INFLIGHT_SHMFD: 12,
  RESET_DEVICE: 13,
  INBAND_NOTIFICATIONS: 14,
  CONFIGURE_MEM_SLOTS: 15,
  STATUS: 16,
  /** Memory region descriptions grow two u32 fields (not supported by the codecs here). */
  XEN_MMAP: 17,
  SHARED_OBJECT: 18,
  DEVICE_STATE: 19,
  /** Known to rust-vmm; not yet in the stored spec revision. */
  SHMEM: 20,
} as const;

/** The `bigint` mask of feature bit `bit` (virtio or protocol feature). */
export function featureBit(bit: number): bigint {
  if (!Number.isInteger(bit) || bit < 0 || bit > 63) throw new RangeError(`feature bit out of range: ${bit}`);
  return 1n << BigInt(bit);
}

/** Whether the 64-bit feature set `features` has bit `bit`. */
export function hasFeature(features: bigint, bit: number): boolean {
  return (features & featureBit(bit)) !== 0n;
}

/**
 * Stable error codes the protocol layer throws (`ProtocolError.code`). All mean "the peer sent something we cannot
 * frame or decode": the connection is answered with a NACK or dropped.
 */
export const ProtocolErrorCode = {
  /** A header shorter than 12 bytes was given to `decodeHeader`. */
  BAD_HEADER: 'VHOST_PROTOCOL_BAD_HEADER',
  /** The header's version field is not 1. */
  BAD_VERSION: 'VHOST_PROTOCOL_BAD_VERSION',
  /** A request (front-end to back-end) has the REPLY bit set. */
  UNEXPECTED_REPLY: 'VHOST_PROTOCOL_UNEXPECTED_REPLY',
  /** A message on a reply stream lacks the REPLY bit. */
  NOT_A_REPLY: 'VHOST_PROTOCOL_NOT_A_REPLY',
  /** The header announces a payload larger than the cap. */
  MESSAGE_TOO_LARGE: 'VHOST_PROTOCOL_MESSAGE_TOO_LARGE',
  /** A payload's length or content does not match its type. */
  BAD_PAYLOAD: 'VHOST_PROTOCOL_BAD_PAYLOAD',
  /** A message needs more fds than arrived with it. */
  MISSING_FDS: 'VHOST_PROTOCOL_MISSING_FDS',
  /** fds arrived that no message takes. */
  UNEXPECTED_FDS: 'VHOST_PROTOCOL_UNEXPECTED_FDS',
  /** More than `MAX_FDS` fds are queued. */
  TOO_MANY_FDS: 'VHOST_PROTOCOL_TOO_MANY_FDS',
} as const;

/** One of the `ProtocolErrorCode` strings. */
export type ProtocolErrorCodeValue = (typeof ProtocolErrorCode)[keyof typeof ProtocolErrorCode];

const frontendNames: ReadonlyMap<number, string> = new Map(
  Object.entries(FrontendRequest).map(([name, code]) => [code, name]),
);
const backendNames: ReadonlyMap<number, string> = new Map(
  Object.entries(BackendRequest).map(([name, code]) => [code, name]),
);

/** The name of front-end request `request` for logs, e.g. `GET_FEATURES`, or `UNKNOWN(99)`. */
export function requestName(request: number): string {
  return frontendNames.get(request) ?? `UNKNOWN(${request})`;
}

/** The name of back-end channel request `request` for logs, e.g. `CONFIG_CHANGE_MSG`, or `UNKNOWN(99)`. */
export function backendRequestName(request: number): string {
  return backendNames.get(request) ?? `UNKNOWN(${request})`;
}

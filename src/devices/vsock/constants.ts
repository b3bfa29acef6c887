/**
 * virtio-vsock (VIRTIO 1.2 §5.10 "Socket Device"): the packet header, operations, socket types, shutdown flags and
 * events. Numbers are `as const` objects (the project compiles with `erasableSyntaxOnly`: no `enum`).
 */

export const VIRTIO_ID_VSOCK = 19;

/** Virtqueues (§5.10.2): the device puts packets for the driver on rx, takes the driver's from tx. */
export const VsockQueue = {
  RX: 0,
  TX: 1,
  EVENT: 2,
} as const;

/** Feature bit numbers (§5.10.3). With none negotiated, stream sockets are implied: all this host supports. */
export const VsockFeature = {
  STREAM: 0,
  SEQPACKET: 1,
  NO_IMPLIED_STREAM: 2,
} as const;

/** Well-known CIDs (§5.10.4): 0, 1, 0xffffffff and 2^64-1 are reserved, 2 is the host; a guest's CID is >= 3. */
export const VMADDR_CID_HOST = 2;
/** Largest CID a guest may have: the upper 32 bits are reserved and zero, 0xffffffff is reserved (§5.10.4). */
export const VSOCK_MAX_GUEST_CID = 0xffff_fffe;

/**
 * struct virtio_vsock_hdr (§5.10.6), 44 bytes, little endian:
 * src_cid u64 | dst_cid u64 | src_port u32 | dst_port u32 | len u32 | type u16 | op u16 | flags u32 | buf_alloc u32 |
 * fwd_cnt u32. The upper 32 bits of the CIDs are reserved and zeroed. The payload (len bytes) follows the header.
 */
export const VsockHdr = {
  srcCid: 0,
  dstCid: 8,
  srcPort: 16,
  dstPort: 20,
  len: 24,
  type: 28,
  op: 30,
  flags: 32,
  bufAlloc: 36,
  fwdCnt: 40,
  size: 44,
} as const;

/** `op` (§5.10.6). 0 is VIRTIO_VSOCK_OP_INVALID: never valid on the wire. */
export const VsockOp = {
  /** Connect operations (§5.10.6, "Stream Sockets"). */
  REQUEST: 1,
  RESPONSE: 2,
  /** Aborts a connection attempt or a connection; also the answer that completes a clean disconnect. */
  RST: 3,
  /** flags: VsockShutdown bits; the hints are permanent once sent. */
  SHUTDOWN: 4,
  /** Payload (the only op with len != 0). */
  RW: 5,
  /** "Tell the peer our credit info" (§5.10.6, "Buffer Space Management"). */
  CREDIT_UPDATE: 6,
  /** "Request the peer to send the credit info to us": answered by CREDIT_UPDATE. */
  CREDIT_REQUEST: 7,
} as const;

/**
 * `type` (§5.10.6, "Addressing"). Only STREAM is supported: a packet of another type gets RST (§5.10.6, "Receive and
 * Transmit").
 */
export const VsockType = {
  STREAM: 1,
  SEQPACKET: 2,
} as const;

/** SHUTDOWN `flags` (§5.10.6, "Stream Sockets"): VIRTIO_VSOCK_SHUTDOWN_F_RECEIVE is bit 0, ..._F_SEND bit 1. */
export const VsockShutdown = {
  /** The sender receives no more data. */
  RCV: 1,
  /** The sender sends no more data. */
  SEND: 2,
  BOTH: 3,
} as const;

/** Event ids (§5.10.6, "Device Events"): struct virtio_vsock_event { le32 id; }. */
export const VsockEvent = {
  /** Communication was interrupted: the driver shuts down its connections and reads guest_cid again. */
  TRANSPORT_RESET: 0,
} as const;

/** Largest payload of one packet: Linux's VIRTIO_VSOCK_MAX_PKT_BUF_SIZE; larger ones from the guest are malformed. */
export const VSOCK_MAX_PAYLOAD = 64 * 1024;
/** Default buf_alloc we advertise per connection (Linux's default socket buffer, VIRTIO_VSOCK_DEFAULT_BUF_SIZE). */
export const VSOCK_DEFAULT_BUF_ALLOC = 256 * 1024;

/** virtio-net (VIRTIO 1.2 §5.1): device ID, feature bits, configuration layout and the per-frame header. */

export const VIRTIO_ID_NET = 1;

/** Device feature bit numbers (§5.1.3). */
export const NetFeature = {
  CSUM: 0,
  GUEST_CSUM: 1,
  MTU: 3,
  MAC: 5,
  GUEST_TSO4: 7,
  GUEST_TSO6: 8,
  GUEST_ECN: 9,
  GUEST_UFO: 10,
  HOST_TSO4: 11,
  HOST_TSO6: 12,
  HOST_ECN: 13,
  HOST_UFO: 14,
  MRG_RXBUF: 15,
  STATUS: 16,
  CTRL_VQ: 17,
  CTRL_RX: 18,
  GUEST_ANNOUNCE: 21,
  MQ: 22,
} as const;

/** Configuration space offsets (§5.1.4). */
export const NetConfigOffset = {
  mac: 0,
  status: 6,
  maxVirtqueuePairs: 8,
  mtu: 10,
  /** The bytes this device exposes (mac, status, max_virtqueue_pairs, mtu). */
  size: 12,
} as const;

/** config.status bits. */
export const NET_S_LINK_UP = 1;

/**
 * struct virtio_net_hdr (§5.1.6): flags u8, gso_type u8, hdr_len u16, gso_size u16, csum_start u16,
 * csum_offset u16, then num_buffers u16 with VERSION_1 or MRG_RXBUF (12 bytes; 10 without).
 */
export const NetHdr = {
  flags: 0,
  gsoType: 1,
  numBuffers: 10,
  /** Size with num_buffers (VERSION_1 or MRG_RXBUF). */
  size: 12,
  /** Size of the legacy header without num_buffers. */
  legacySize: 10,
} as const;


/** Receive queue of pair p: 2p; transmit queue: 2p + 1 (§5.1.2). */
export function isReceiveQueue(queueIndex: number): boolean {
  return queueIndex % 2 === 0;
}

/** Smallest Ethernet frame a port generates or accepts from the CLI (no FCS), and the largest (jumbo). */
export const MIN_FRAME = 60;
export const MAX_FRAME = 9000 + 14;
/**
 * Largest frame the transmit path accepts from a driver: a 64 KiB IP packet (a GSO frame) behind an Ethernet header
 * and a VLAN tag.
 */
export const MAX_TX_FRAME = 65535 + 14 + 4;

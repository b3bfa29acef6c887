/**
 * Split virtqueue constants (VIRTIO 1.2 §2.7). All multi-byte ring fields are little-endian.
 *
 * Layout of the three areas for a queue of `size` entries (§2.7, table "Virtqueue Part Alignment and Size"):
 *
 * | area       | alignment | size in bytes  | contents                                                     |
 * |------------|-----------|----------------|--------------------------------------------------------------|
 * | descriptor | 16        | 16 * size      | `{ le64 addr; le32 len; le16 flags; le16 next; }[size]`       |
 * | available  | 2         | 6 + 2 * size   | `le16 flags; le16 idx; le16 ring[size]; le16 used_event;`     |
 * | used       | 4         | 6 + 8 * size   | `le16 flags; le16 idx; { le32 id; le32 len; }[size]; le16 avail_event;` |
 */

/** Descriptor flag: the buffer continues via the `next` field (§2.7.5). */
export const VRING_DESC_F_NEXT = 1;
/** Descriptor flag: the buffer is device write-only (otherwise device read-only) (§2.7.5). */
export const VRING_DESC_F_WRITE = 2;
/** Descriptor flag: the buffer holds a table of indirect descriptors (§2.7.5.3). */
export const VRING_DESC_F_INDIRECT = 4;

/** Available ring flag: the driver asks the device not to send used buffer notifications (§2.7.7). */
export const VRING_AVAIL_F_NO_INTERRUPT = 1;
/** Used ring flag: the device asks the driver not to send available buffer notifications (§2.7.10). */
export const VRING_USED_F_NO_NOTIFY = 1;

/** Size of one descriptor (and of one indirect table entry) in bytes. */
export const DESC_SIZE = 16;
/** Required alignment of the descriptor table (§2.7). */
export const DESC_ALIGN = 16;
/** Required alignment of the available ring (§2.7). */
export const AVAIL_ALIGN = 2;
/** Required alignment of the used ring (§2.7). */
export const USED_ALIGN = 4;
/** Size of one used ring element (`le32 id; le32 len`). */
export const USED_ELEM_SIZE = 8;

/** Largest queue size of a split virtqueue (§2.7: "Queue Size ... maximum 32768"). */
export const MAX_QUEUE_SIZE = 32768;

/**
 * Lower bound on the descriptor budget of one chain (direct plus indirect descriptors). A chain may hold at most
 * `max(queueSize, MIN_CHAIN_BUDGET)` descriptors, so an indirect table may describe up to 1024 buffers even on a small
 * queue (libvhost-user caps indirect tables at 1024 entries; Linux at 65536; rust-vmm at 65535).
 */
export const MIN_CHAIN_BUDGET = 1024;

/** Largest indirect table accepted, in entries: `next` is a u16, so entries past 65536 are unreachable (Linux' bound). */
export const MAX_INDIRECT_ENTRIES = 65536;

/** Largest total byte length of a chain (§2.7.5.2: "Drivers MUST NOT add a descriptor chain longer than 2^32 bytes"). */
export const MAX_CHAIN_BYTES = 0xffff_ffff;

/** Byte sizes of the three ring areas for a queue of `size` entries. */
export function descTableSize(size: number): number {
  return DESC_SIZE * size;
}
/** Byte size of a packed ring's driver or device event suppression area (`off_wrap` u16, `flags` u16). */
export const PACKED_EVENT_SIZE = 4;
/** Byte size of the available ring including `used_event`. */
export function availRingSize(size: number): number {
  return 6 + 2 * size;
}
/** Byte size of the used ring including `avail_event`. */
export function usedRingSize(size: number): number {
  return 6 + USED_ELEM_SIZE * size;
}

/**
 * `vring_need_event` from the spec / Linux `include/uapi/linux/virtio_ring.h`: true when `newIdx` has moved past
 * `eventIdx` since `oldIdx`, i.e. `(u16)(new - event - 1) < (u16)(new - old)`. All arguments are u16.
 */
export function vringNeedEvent(eventIdx: number, newIdx: number, oldIdx: number): boolean {
  return ((newIdx - eventIdx - 1) & 0xffff) < ((newIdx - oldIdx) & 0xffff);
}

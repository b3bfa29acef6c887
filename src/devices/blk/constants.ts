/** virtio-blk constants (VIRTIO 1.2 §5.2). */

export const VIRTIO_ID_BLOCK = 2;
export const SECTOR_SIZE = 512;
export const SECTOR_SHIFT = 9;

/** Feature bits (§5.2.3). */
export const BlkFeature = {
  SIZE_MAX: 1,
  SEG_MAX: 2,
  GEOMETRY: 4,
  RO: 5,
  BLK_SIZE: 6,
  FLUSH: 9,
  TOPOLOGY: 10,
  CONFIG_WCE: 11,
  MQ: 12,
  DISCARD: 13,
  WRITE_ZEROES: 14,
} as const;

/** Request types (§5.2.6). */
export const BlkRequestType = {
  IN: 0,
  OUT: 1,
  FLUSH: 4,
  GET_ID: 8,
  GET_LIFETIME: 10,
  DISCARD: 11,
  WRITE_ZEROES: 13,
  SECURE_ERASE: 14,
} as const;

/** Status byte values (§5.2.6). */
export const BlkStatus = {
  OK: 0,
  IOERR: 1,
  UNSUPP: 2,
} as const;

/** Size of the request header: type u32, reserved (ioprio) u32, sector u64. */
export const REQUEST_HEADER_SIZE = 16;
/** Size of one discard / write-zeroes segment: sector u64, num_sectors u32, flags u32. */
export const DISCARD_SEGMENT_SIZE = 16;
/** Length of the GET_ID answer. */
export const BLK_ID_BYTES = 20;
/** write-zeroes segment flag: the device may unmap (discard) instead of writing zeroes. */
export const WRITE_ZEROES_FLAG_UNMAP = 1;

/** Offsets in `struct virtio_blk_config` (§5.2.4). */
export const BlkConfigOffset = {
  capacity: 0, // u64, in 512-byte sectors
  sizeMax: 8, // u32
  segMax: 12, // u32
  geometry: 16, // u16 cylinders, u8 heads, u8 sectors
  blkSize: 20, // u32
  topology: 24, // u8 physical_block_exp, u8 alignment_offset, u16 min_io_size, u32 opt_io_size
  writeback: 32, // u8
  numQueues: 34, // u16
  maxDiscardSectors: 36, // u32
  maxDiscardSeg: 40, // u32
  discardSectorAlignment: 44, // u32
  maxWriteZeroesSectors: 48, // u32
  maxWriteZeroesSeg: 52, // u32
  writeZeroesMayUnmap: 56, // u8
  /** Through secure-erase limits (u32 x 3 at 60, 64, 68). */
  size: 72,
} as const;

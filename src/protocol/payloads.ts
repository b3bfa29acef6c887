/**
 * Payload codecs, one per payload type of the spec ("Message Specification" / "Payload").
 *
 * Shaped like compact-encoding: each codec knows its encoded `size`, writes with `encodeInto` (so a header and a
 * payload can share one buffer) or `encode`, and `decode` starts with a length check. A payload whose length does
 * not match its type throws `ProtocolError('VHOST_PROTOCOL_BAD_PAYLOAD')`; encoders throw `RangeError` for values
 * that do not fit their fields (that is a bug on our side, not the peer's).
 *
 * Codecs check structure only (lengths, reserved bits the spec defines). Whether a value makes sense (a queue index
 * in range, an address inside guest memory) is the back-end's business. 64-bit fields are `bigint`s.
 */
import { ProtocolError } from '../errors.js';
import {
  CONFIG_HEADER_SIZE,
  MAX_CONFIG_SIZE,
  MAX_MEM_TABLE_REGIONS,
  MEMORY_REGION_SIZE,
  ProtocolErrorCode,
  VRING_INDEX_MASK,
  VRING_NOFD_BIT,
} from './constants.js';
import { checkU16, checkU32, checkU64, readU16, readU32, readU64, writeU16, writeU32, writeU64 } from './wire.js';

/** A payload codec. Its functions do not use `this`: `messages.map(u64Payload.decode)` is fine. */
export interface Codec<T> {
  /** The payload type's name, as in the spec's "Payload" section; used in error messages. */
  readonly name: string;
  /** Encoded size of `value` in bytes. */
  size(this: void, value: T): number;
  /** Writes `value` into `target` at `offset`; returns the offset after the written bytes. */
  encodeInto(this: void, value: T, target: Uint8Array, offset: number): number;
  /** `value` in a new buffer of exactly `size(value)` bytes. */
  encode(this: void, value: T): Uint8Array;
  /** Decodes a whole payload. Throws `VHOST_PROTOCOL_BAD_PAYLOAD` if its length does not fit the type. */
  decode(this: void, bytes: Uint8Array): T;
}

interface CodecParts<T> {
  name: string;
  size(this: void, value: T): number;
  /** Range-checks `value` (throws `RangeError`). */
  check(this: void, value: T): void;
  /** Writes a checked `value`; `target` has room. */
  write(this: void, value: T, target: Uint8Array, offset: number): void;
  /** Decodes `bytes`, checking the length first. */
  read(this: void, bytes: Uint8Array): T;
}

function defineCodec<T>(parts: CodecParts<T>): Codec<T> {
  const codec: Codec<T> = {
    name: parts.name,
    size: parts.size,
    encodeInto(value, target, offset) {
      parts.check(value);
      const size = parts.size(value);
      if (!Number.isInteger(offset) || offset < 0 || target.length - offset < size) {
        throw new RangeError(`${parts.name}: ${size} bytes do not fit at offset ${offset} of ${target.length}`);
      }
      parts.write(value, target, offset);
      return offset + size;
    },
    encode(value) {
      const bytes = new Uint8Array(parts.size(value));
      codec.encodeInto(value, bytes, 0);
      return bytes;
    },
    decode: parts.read,
  };
  return Object.freeze(codec);
}

/** Throws `VHOST_PROTOCOL_BAD_PAYLOAD` with `message`, prefixed by the payload type. */
export function badPayload(name: string, message: string): never {
  throw new ProtocolError(ProtocolErrorCode.BAD_PAYLOAD, `${name}: ${message}`);
}

function expectLength(bytes: Uint8Array, name: string, expected: number): void {
  if (bytes.length !== expected) badPayload(name, `expected ${expected} bytes, got ${bytes.length}`);
}

// ---------------------------------------------------------------------------------------------------------------
// No payload and u64

/** No payload (e.g. GET_FEATURES, SET_OWNER): the size must be 0. */
export const emptyPayload: Codec<undefined> = defineCodec<undefined>({
  name: 'empty payload',
  size: () => 0,
  check: () => undefined,
  write: () => undefined,
  read(bytes) {
    expectLength(bytes, 'empty payload', 0);
    return undefined;
  },
});

/** Spec "A single 64-bit integer": features, REPLY_ACK status, queue counts, MTU, ... */
export const u64Payload: Codec<bigint> = defineCodec<bigint>({
  name: 'u64',
  size: () => 8,
  check: (value) => checkU64(value, 'u64'),
  write: (value, target, offset) => writeU64(target, offset, value),
  read(bytes) {
    expectLength(bytes, 'u64', 8);
    return readU64(bytes, 0);
  },
});

/**
 * Device status (SET_STATUS / GET_STATUS): a u64 on the wire holding the virtio status byte (virtio 1.2 §2.1).
 * Decoding rejects values above 0xff.
 */
export const statusPayload: Codec<number> = defineCodec<number>({
  name: 'device status',
  size: () => 8,
  check(value) {
    if (!Number.isInteger(value) || value < 0 || value > 0xff) throw new RangeError(`status is not a u8: ${value}`);
  },
  write: (value, target, offset) => writeU64(target, offset, BigInt(value)),
  read(bytes) {
    expectLength(bytes, 'device status', 8);
    const value = readU64(bytes, 0);
    if (value > 0xffn) badPayload('device status', `0x${value.toString(16)} does not fit the 8-bit status`);
    return Number(value);
  },
});

// ---------------------------------------------------------------------------------------------------------------
// Vrings

/**
 * Spec "A vring state description": `index` u32, `num` u32 (8 bytes). Used by SET_VRING_NUM (num = queue size),
 * SET/GET_VRING_BASE (num = descriptor index or indices, see `splitVringBase` / `packedVringBase`),
 * SET_VRING_ENABLE (num = 0/1), SET_VRING_ENDIAN, VRING_KICK and the back-end's VRING_CALL/VRING_ERR.
 */
export interface VringState {
  readonly index: number;
  readonly num: number;
}

/** Codec of `VringState`. */
export const vringStatePayload: Codec<VringState> = defineCodec<VringState>({
  name: 'vring state description',
  size: () => 8,
  check(value) {
    checkU32(value.index, 'index');
    checkU32(value.num, 'num');
  },
  write(value, target, offset) {
    writeU32(target, offset, value.index);
    writeU32(target, offset + 4, value.num);
  },
  read(bytes) {
    expectLength(bytes, 'vring state description', 8);
    return { index: readU32(bytes, 0), num: readU32(bytes, 4) };
  },
});

/**
 * The `num` of SET/GET_VRING_BASE for a split virtqueue (spec "A vring descriptor index for split virtqueues"):
 * bits 0-15 are the next available ring index, bits 16-31 are reserved and must be zero (`VHOST_PROTOCOL_BAD_PAYLOAD`
 * otherwise).
 */
export function splitVringBase(num: number): number {
  if (num > 0xffff) badPayload('vring descriptor index', `reserved bits 16-31 are set in 0x${num.toString(16)}`);
  return num;
}

/** The `num` of SET/GET_VRING_BASE for a packed virtqueue (spec "Vring descriptor indices for packed virtqueues"). */
export interface PackedVringBase {
  /** Bits 0-14: next available descriptor index. */
  readonly availIndex: number;
  /** Bit 15: driver (available) ring wrap counter. */
  readonly availWrapCounter: boolean;
  /** Bits 16-30: next used descriptor index. */
  readonly usedIndex: number;
  /** Bit 31: device (used) ring wrap counter. */
  readonly usedWrapCounter: boolean;
}

/** Splits the packed-virtqueue `num` of SET/GET_VRING_BASE into its fields. */
export function packedVringBase(num: number): PackedVringBase {
  return {
    availIndex: num & 0x7fff,
    availWrapCounter: (num & 0x8000) !== 0,
    usedIndex: (num >>> 16) & 0x7fff,
    usedWrapCounter: (num & 0x8000_0000) !== 0,
  };
}

/** Packs a `PackedVringBase` into the u32 `num` of SET/GET_VRING_BASE. */
export function encodePackedVringBase(base: PackedVringBase): number {
  if (!Number.isInteger(base.availIndex) || base.availIndex < 0 || base.availIndex > 0x7fff) {
    throw new RangeError(`availIndex is not a 15-bit index: ${base.availIndex}`);
  }
  if (!Number.isInteger(base.usedIndex) || base.usedIndex < 0 || base.usedIndex > 0x7fff) {
    throw new RangeError(`usedIndex is not a 15-bit index: ${base.usedIndex}`);
  }
  return (
    (base.availIndex | (base.availWrapCounter ? 0x8000 : 0) | (base.usedIndex << 16)) +
    (base.usedWrapCounter ? 0x8000_0000 : 0)
  );
}

/**
 * Spec "A vring address description" (40 bytes): `index` u32, `flags` u32 (`VringAddrFlag.LOG`), then the u64
 * addresses of the descriptor table, used ring, available ring and the log. Ring addresses are front-end user
 * addresses (IOVAs with ACCESS_PLATFORM); `log` is a guest physical address. The spec's table shows a `size`
 * column that no implementation has: the layout is index, flags, desc, used, avail, log.
 */
export interface VringAddr {
  readonly index: number;
  readonly flags: number;
  readonly desc: bigint;
  readonly used: bigint;
  readonly avail: bigint;
  readonly log: bigint;
}

/** Codec of `VringAddr`. */
export const vringAddrPayload: Codec<VringAddr> = defineCodec<VringAddr>({
  name: 'vring address description',
  size: () => 40,
  check(value) {
    checkU32(value.index, 'index');
    checkU32(value.flags, 'flags');
    checkU64(value.desc, 'desc');
    checkU64(value.used, 'used');
    checkU64(value.avail, 'avail');
    checkU64(value.log, 'log');
  },
  write(value, target, offset) {
    writeU32(target, offset, value.index);
    writeU32(target, offset + 4, value.flags);
    writeU64(target, offset + 8, value.desc);
    writeU64(target, offset + 16, value.used);
    writeU64(target, offset + 24, value.avail);
    writeU64(target, offset + 32, value.log);
  },
  read(bytes) {
    expectLength(bytes, 'vring address description', 40);
    return {
      index: readU32(bytes, 0),
      flags: readU32(bytes, 4),
      desc: readU64(bytes, 8),
      used: readU64(bytes, 16),
      avail: readU64(bytes, 24),
      log: readU64(bytes, 32),
    };
  },
});

/**
 * The u64 payload of SET_VRING_KICK / SET_VRING_CALL / SET_VRING_ERR (spec SET_VRING_KICK): bits 0-7 the vring index,
 * bit 8 the "invalid FD" flag (no fd attached: poll instead). Decoding rejects any other set bit.
 */
export interface VringFile {
  readonly index: number;
  /** Bit 8: no fd is attached. */
  readonly noFd: boolean;
}

function decodeVringFileWord(value: bigint, name: string): VringFile {
  if ((value & ~BigInt(VRING_INDEX_MASK | VRING_NOFD_BIT)) !== 0n) {
    badPayload(name, `bits other than 0-8 are set in 0x${value.toString(16)}`);
  }
  const word = Number(value);
  return { index: word & VRING_INDEX_MASK, noFd: (word & VRING_NOFD_BIT) !== 0 };
}

function checkVringFile(value: VringFile): void {
  if (!Number.isInteger(value.index) || value.index < 0 || value.index > VRING_INDEX_MASK) {
    throw new RangeError(`vring index does not fit 8 bits: ${value.index}`);
  }
}

function vringFileWord(value: VringFile): bigint {
  return BigInt(value.index | (value.noFd ? VRING_NOFD_BIT : 0));
}

/** Codec of `VringFile` (kick/call/err). */
export const vringFilePayload: Codec<VringFile> = defineCodec<VringFile>({
  name: 'vring fd description',
  size: () => 8,
  check: checkVringFile,
  write: (value, target, offset) => writeU64(target, offset, vringFileWord(value)),
  read(bytes) {
    expectLength(bytes, 'vring fd description', 8);
    return decodeVringFileWord(readU64(bytes, 0), 'vring fd description');
  },
});

/**
 * Spec "Vring area description" (24 bytes), payload of the back-end's VRING_HOST_NOTIFIER_MSG: a u64 holding the
 * vring index (bits 0-7) and the no-fd flag (bit 8), then the u64 size and offset of the area in the attached fd.
 */
export interface VringArea {
  readonly index: number;
  readonly noFd: boolean;
  readonly size: bigint;
  readonly offset: bigint;
}

/** Codec of `VringArea`. */
export const vringAreaPayload: Codec<VringArea> = defineCodec<VringArea>({
  name: 'vring area description',
  size: () => 24,
  check(value) {
    checkVringFile(value);
    checkU64(value.size, 'size');
    checkU64(value.offset, 'offset');
  },
  write(value, target, offset) {
    writeU64(target, offset, vringFileWord(value));
    writeU64(target, offset + 8, value.size);
    writeU64(target, offset + 16, value.offset);
  },
  read(bytes) {
    expectLength(bytes, 'vring area description', 24);
    const { index, noFd } = decodeVringFileWord(readU64(bytes, 0), 'vring area description');
    return { index, noFd, size: readU64(bytes, 8), offset: readU64(bytes, 16) };
  },
});

// ---------------------------------------------------------------------------------------------------------------
// Memory

/**
 * Spec "Memory region description" (32 bytes): where a region of guest memory is, in the guest (`guestPhysAddr`),
 * in the front-end's address space (`userspaceAddr`, used to translate ring addresses) and in the attached fd
 * (`mmapOffset`). The XEN_MMAP variant (40 bytes) is not supported.
 */
export interface MemoryRegion {
  readonly guestPhysAddr: bigint;
  readonly memorySize: bigint;
  readonly userspaceAddr: bigint;
  readonly mmapOffset: bigint;
}

function checkRegion(region: MemoryRegion): void {
  checkU64(region.guestPhysAddr, 'guestPhysAddr');
  checkU64(region.memorySize, 'memorySize');
  checkU64(region.userspaceAddr, 'userspaceAddr');
  checkU64(region.mmapOffset, 'mmapOffset');
}

function writeRegion(region: MemoryRegion, target: Uint8Array, offset: number): void {
  writeU64(target, offset, region.guestPhysAddr);
  writeU64(target, offset + 8, region.memorySize);
  writeU64(target, offset + 16, region.userspaceAddr);
  writeU64(target, offset + 24, region.mmapOffset);
}

function readRegion(bytes: Uint8Array, offset: number): MemoryRegion {
  return {
    guestPhysAddr: readU64(bytes, offset),
    memorySize: readU64(bytes, offset + 8),
    userspaceAddr: readU64(bytes, offset + 16),
    mmapOffset: readU64(bytes, offset + 24),
  };
}

/** Codec of one `MemoryRegion` on its own (32 bytes). */
export const memoryRegionPayload: Codec<MemoryRegion> = defineCodec<MemoryRegion>({
  name: 'memory region description',
  size: () => MEMORY_REGION_SIZE,
  check: checkRegion,
  write: writeRegion,
  read(bytes) {
    expectLength(bytes, 'memory region description', MEMORY_REGION_SIZE);
    return readRegion(bytes, 0);
  },
});

/**
 * Spec "Single memory region description" (40 bytes): u64 padding, then a region. Payload of ADD_MEM_REG and
 * REM_MEM_REG (and of their postcopy replies). The padding is ignored on decode and written as zero.
 */
export const singleMemoryRegionPayload: Codec<MemoryRegion> = defineCodec<MemoryRegion>({
  name: 'single memory region description',
  size: () => 8 + MEMORY_REGION_SIZE,
  check: checkRegion,
  write(value, target, offset) {
    target.fill(0, offset, offset + 8);
    writeRegion(value, target, offset + 8);
  },
  read(bytes) {
    expectLength(bytes, 'single memory region description', 8 + MEMORY_REGION_SIZE);
    return readRegion(bytes, 8);
  },
});

/**
 * Spec "Multiple Memory regions description", payload of SET_MEM_TABLE: u32 `nregions`, u32 padding, then the
 * regions (32 bytes each). The fds in the ancillary data match the regions in number and order.
 */
export interface MemoryTable {
  readonly regions: readonly MemoryRegion[];
}

const MEM_TABLE_NAME = 'multiple memory regions description';

/**
 * The region count of a SET_MEM_TABLE payload, after the structural checks the fd accounting needs: at least the
 * 8-byte prefix, `nregions` at most `MAX_MEM_TABLE_REGIONS`, and a length of exactly `8 + 32 * nregions` (what QEMU
 * sends) or `8 + 32 * 8` (the full C struct, which other front-ends send). `nregions` 0 passes here (it takes no fds;
 * QEMU's postcopy acknowledgement is a SET_MEM_TABLE with a zero u64), `memoryTablePayload.decode` rejects it.
 */
export function memoryTableRegionCount(bytes: Uint8Array): number {
  if (bytes.length < 8) badPayload(MEM_TABLE_NAME, `expected at least 8 bytes, got ${bytes.length}`);
  const nregions = readU32(bytes, 0);
  if (nregions > MAX_MEM_TABLE_REGIONS) {
    badPayload(MEM_TABLE_NAME, `${nregions} regions, at most ${MAX_MEM_TABLE_REGIONS} are allowed`);
  }
  const exact = 8 + MEMORY_REGION_SIZE * nregions;
  const full = 8 + MEMORY_REGION_SIZE * MAX_MEM_TABLE_REGIONS;
  if (bytes.length !== exact && bytes.length !== full) {
    badPayload(MEM_TABLE_NAME, `${nregions} regions need ${exact} (or ${full}) bytes, got ${bytes.length}`);
  }
  return nregions;
}

/** Codec of `MemoryTable`: decode also rejects `nregions` 0. Encodes exactly `8 + 32 * nregions` bytes, as QEMU. */
export const memoryTablePayload: Codec<MemoryTable> = defineCodec<MemoryTable>({
  name: MEM_TABLE_NAME,
  size: (value) => 8 + MEMORY_REGION_SIZE * value.regions.length,
  check(value) {
    const n = value.regions.length;
    if (n === 0 || n > MAX_MEM_TABLE_REGIONS) {
      throw new RangeError(`a memory table holds 1 to ${MAX_MEM_TABLE_REGIONS} regions, got ${n}`);
    }
    for (const region of value.regions) checkRegion(region);
  },
  write(value, target, offset) {
    writeU32(target, offset, value.regions.length);
    writeU32(target, offset + 4, 0);
    let at = offset + 8;
    for (const region of value.regions) {
      writeRegion(region, target, at);
      at += MEMORY_REGION_SIZE;
    }
  },
  read(bytes) {
    const nregions = memoryTableRegionCount(bytes);
    if (nregions === 0) badPayload(MEM_TABLE_NAME, 'no regions');
    const regions: MemoryRegion[] = [];
    for (let i = 0; i < nregions; i++) regions.push(readRegion(bytes, 8 + MEMORY_REGION_SIZE * i));
    return { regions };
  },
});

/**
 * Spec "Log description" (16 bytes), payload of SET_LOG_BASE as QEMU sends it (QEMU's `VhostUserLog`; the spec's
 * message table says u64): size and offset of the dirty log in the attached fd.
 */
export interface Log {
  readonly mmapSize: bigint;
  readonly mmapOffset: bigint;
}

/** Codec of `Log`. */
export const logPayload: Codec<Log> = defineCodec<Log>({
  name: 'log description',
  size: () => 16,
  check(value) {
    checkU64(value.mmapSize, 'mmapSize');
    checkU64(value.mmapOffset, 'mmapOffset');
  },
  write(value, target, offset) {
    writeU64(target, offset, value.mmapSize);
    writeU64(target, offset + 8, value.mmapOffset);
  },
  read(bytes) {
    expectLength(bytes, 'log description', 16);
    return { mmapSize: readU64(bytes, 0), mmapOffset: readU64(bytes, 8) };
  },
});

// ---------------------------------------------------------------------------------------------------------------
// Config space, inflight, IOTLB, migration, shared objects

/**
 * Spec "Virtio device config space", payload of GET_CONFIG (request and reply) and SET_CONFIG: u32 `offset`,
 * u32 `size`, u32 `flags` (`ConfigFlag`), then `size` bytes. `size` must equal the bytes that follow and be at most
 * `MAX_CONFIG_SIZE` (256). A GET_CONFIG reply with an empty payload signals an error: that is not a config payload,
 * check `payload.length === 0` before decoding.
 */
export interface DeviceConfig {
  readonly offset: number;
  /** Always `data.length`. */
  readonly size: number;
  readonly flags: number;
  readonly data: Uint8Array;
}

const CONFIG_NAME = 'virtio device config space';

/** Codec of `DeviceConfig`; `decode` copies the data out of the payload. */
export const deviceConfigPayload: Codec<DeviceConfig> = defineCodec<DeviceConfig>({
  name: CONFIG_NAME,
  size: (value) => CONFIG_HEADER_SIZE + value.data.length,
  check(value) {
    checkU32(value.offset, 'offset');
    checkU32(value.flags, 'flags');
    if (value.size !== value.data.length) {
      throw new RangeError(`config size ${value.size} differs from the data length ${value.data.length}`);
    }
    if (value.size > MAX_CONFIG_SIZE) throw new RangeError(`config size ${value.size} is over ${MAX_CONFIG_SIZE}`);
  },
  write(value, target, offset) {
    writeU32(target, offset, value.offset);
    writeU32(target, offset + 4, value.size);
    writeU32(target, offset + 8, value.flags);
    target.set(value.data, offset + CONFIG_HEADER_SIZE);
  },
  read(bytes) {
    if (bytes.length < CONFIG_HEADER_SIZE) {
      badPayload(CONFIG_NAME, `expected at least ${CONFIG_HEADER_SIZE} bytes, got ${bytes.length}`);
    }
    const size = readU32(bytes, 4);
    if (size > MAX_CONFIG_SIZE) badPayload(CONFIG_NAME, `size ${size} is over ${MAX_CONFIG_SIZE}`);
    if (bytes.length - CONFIG_HEADER_SIZE !== size) {
      badPayload(CONFIG_NAME, `size ${size} but ${bytes.length - CONFIG_HEADER_SIZE} bytes follow the header`);
    }
    return {
      offset: readU32(bytes, 0),
      size,
      flags: readU32(bytes, 8),
      data: new Uint8Array(bytes.subarray(CONFIG_HEADER_SIZE)),
    };
  },
});

/**
 * Spec "Inflight description", payload of GET_INFLIGHT_FD (request and reply) and SET_INFLIGHT_FD: u64 mmap size,
 * u64 mmap offset, u16 number of queues, u16 queue size. The spec's table adds up to 20 bytes, but QEMU and rust-vmm
 * send the unpacked C struct: 24 bytes with 4 bytes of tail padding. Decode accepts both; encode writes 24.
 */
export interface Inflight {
  readonly mmapSize: bigint;
  readonly mmapOffset: bigint;
  readonly numQueues: number;
  readonly queueSize: number;
}

/** Size of `Inflight` as QEMU sends it (`sizeof(VhostUserInflight)`). */
export const INFLIGHT_SIZE = 24;
/** Size of `Inflight` without tail padding (the spec's table). */
export const INFLIGHT_PACKED_SIZE = 20;

/** Codec of `Inflight`. */
export const inflightPayload: Codec<Inflight> = defineCodec<Inflight>({
  name: 'inflight description',
  size: () => INFLIGHT_SIZE,
  check(value) {
    checkU64(value.mmapSize, 'mmapSize');
    checkU64(value.mmapOffset, 'mmapOffset');
    checkU16(value.numQueues, 'numQueues');
    checkU16(value.queueSize, 'queueSize');
  },
  write(value, target, offset) {
    writeU64(target, offset, value.mmapSize);
    writeU64(target, offset + 8, value.mmapOffset);
    writeU16(target, offset + 16, value.numQueues);
    writeU16(target, offset + 18, value.queueSize);
    target.fill(0, offset + 20, offset + INFLIGHT_SIZE);
  },
  read(bytes) {
    if (bytes.length !== INFLIGHT_SIZE && bytes.length !== INFLIGHT_PACKED_SIZE) {
      badPayload(
        'inflight description',
        `expected ${INFLIGHT_SIZE} (or ${INFLIGHT_PACKED_SIZE}) bytes, got ${bytes.length}`,
      );
    }
    return {
      mmapSize: readU64(bytes, 0),
      mmapOffset: readU64(bytes, 8),
      numQueues: readU16(bytes, 16),
      queueSize: readU16(bytes, 18),
    };
  },
});

/**
 * Spec "An IOTLB message", payload of IOTLB_MSG (both channels): u64 iova, u64 size, u64 user address, u8 `perm`
 * (`IotlbPerm`), u8 `type` (`IotlbType`). QEMU sends Linux's `struct vhost_iotlb_msg`, 32 bytes with tail padding;
 * decode accepts 32 or the 26 bytes of the spec's table, encode writes 32.
 */
export interface IotlbMsg {
  readonly iova: bigint;
  readonly size: bigint;
  readonly uaddr: bigint;
  readonly perm: number;
  readonly type: number;
}

/** Codec of `IotlbMsg`. */
export const iotlbPayload: Codec<IotlbMsg> = defineCodec<IotlbMsg>({
  name: 'IOTLB message',
  size: () => 32,
  check(value) {
    checkU64(value.iova, 'iova');
    checkU64(value.size, 'size');
    checkU64(value.uaddr, 'uaddr');
    if (!Number.isInteger(value.perm) || value.perm < 0 || value.perm > 0xff) throw new RangeError('perm is not a u8');
    if (!Number.isInteger(value.type) || value.type < 0 || value.type > 0xff) throw new RangeError('type is not a u8');
  },
  write(value, target, offset) {
    writeU64(target, offset, value.iova);
    writeU64(target, offset + 8, value.size);
    writeU64(target, offset + 16, value.uaddr);
    target[offset + 24] = value.perm;
    target[offset + 25] = value.type;
    target.fill(0, offset + 26, offset + 32);
  },
  read(bytes) {
    if (bytes.length !== 32 && bytes.length !== 26) {
      badPayload('IOTLB message', `expected 32 (or 26) bytes, got ${bytes.length}`);
    }
    return {
      iova: readU64(bytes, 0),
      size: readU64(bytes, 8),
      uaddr: readU64(bytes, 16),
      perm: bytes[24] ?? 0,
      type: bytes[25] ?? 0,
    };
  },
});

/**
 * Spec "Device state transfer parameters", payload of SET_DEVICE_STATE_FD: u32 `direction` (`TransferDirection`),
 * u32 `phase` (`TransferPhase`).
 */
export interface DeviceStateTransfer {
  readonly direction: number;
  readonly phase: number;
}

/** Codec of `DeviceStateTransfer`. */
export const deviceStateTransferPayload: Codec<DeviceStateTransfer> = defineCodec<DeviceStateTransfer>({
  name: 'device state transfer parameters',
  size: () => 8,
  check(value) {
    checkU32(value.direction, 'direction');
    checkU32(value.phase, 'phase');
  },
  write(value, target, offset) {
    writeU32(target, offset, value.direction);
    writeU32(target, offset + 4, value.phase);
  },
  read(bytes) {
    expectLength(bytes, 'device state transfer parameters', 8);
    return { direction: readU32(bytes, 0), phase: readU32(bytes, 4) };
  },
});

/**
 * Spec "VhostUserShared", payload of GET_SHARED_OBJECT and the back-end's SHARED_OBJECT_*: a 16-byte UUID, kept as
 * raw bytes (its first three fields are big endian).
 */
export interface SharedObject {
  readonly uuid: Uint8Array;
}

/** Codec of `SharedObject`; `decode` copies the UUID. */
export const sharedObjectPayload: Codec<SharedObject> = defineCodec<SharedObject>({
  name: 'VhostUserShared',
  size: () => 16,
  check(value) {
    if (value.uuid.length !== 16) throw new RangeError(`a UUID is 16 bytes, got ${value.uuid.length}`);
  },
  write: (value, target, offset) => target.set(value.uuid, offset),
  read(bytes) {
    expectLength(bytes, 'VhostUserShared', 16);
    return { uuid: new Uint8Array(bytes.subarray(0, 16)) };
  },
});

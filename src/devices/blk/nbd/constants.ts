/**
 * NBD protocol numbers.
 *
 * Source: the NBD protocol, NetworkBlockDevice/nbd `doc/proto.md` ("the spec" below; section names are quoted).
 * Every number on the wire is big endian ("Conventions"). Numbers are `as const` objects (the project compiles with
 * `erasableSyntaxOnly`: no `enum`). 64-bit magics are bigints (only the handshake reads them); the transmission
 * phase reads 32-bit magics.
 */

/** Handshake magics ("Oldstyle negotiation", "Newstyle negotiation", "Fixed newstyle negotiation"). */
export const NbdMagic = {
  /** 'NBDMAGIC': the first 8 bytes the server sends, old and new style (`INIT_PASSWD`). */
  INIT_PASSWD: 0x4e42444d41474943n,
  /** 'IHAVEOPT': second server magic of newstyle negotiation, and the magic of every option request. */
  IHAVEOPT: 0x49484156454f5054n,
  /** Second server magic of oldstyle negotiation (`cliserv_magic`); not supported by this client. */
  CLISERV_OLDSTYLE: 0x00420281861253n,
  /** Magic of each option reply (fixed newstyle). */
  OPTION_REPLY: 0x3e889045565a9n,
} as const;

/** Transmission-phase magics ("Request message", "Simple reply message", "Structured reply chunk message"). */
export const NbdTransmissionMagic = {
  /** `NBD_REQUEST_MAGIC`: every request header. */
  REQUEST: 0x25609513,
  /** `NBD_SIMPLE_REPLY_MAGIC` (formerly `NBD_REPLY_MAGIC`). */
  SIMPLE_REPLY: 0x67446698,
  /** `NBD_STRUCTURED_REPLY_MAGIC`: a structured reply chunk (only after `NBD_OPT_STRUCTURED_REPLY`). */
  STRUCTURED_REPLY: 0x668e33ef,
} as const;

/** Handshake flags, 16 bits sent by the server ("Values" / "Handshake flags"). */
export const NbdHandshakeFlag = {
  /** `NBD_FLAG_FIXED_NEWSTYLE` (bit 0): the server speaks fixed newstyle. This client requires it. */
  FIXED_NEWSTYLE: 1 << 0,
  /** `NBD_FLAG_NO_ZEROES` (bit 1): the server can omit the 124 zero bytes after `NBD_OPT_EXPORT_NAME`. */
  NO_ZEROES: 1 << 1,
} as const;

/** Client flags, 32 bits sent by the client after the handshake flags ("Values" / "Client flags"). */
export const NbdClientFlag = {
  /** `NBD_FLAG_C_FIXED_NEWSTYLE` (bit 0). */
  FIXED_NEWSTYLE: 1 << 0,
  /** `NBD_FLAG_C_NO_ZEROES` (bit 1): only if the server set `NBD_FLAG_NO_ZEROES`. */
  NO_ZEROES: 1 << 1,
} as const;

/** Transmission flags, 16 bits, in `NBD_INFO_EXPORT` or after `NBD_OPT_EXPORT_NAME` ("Transmission flags"). */
export const NbdFlag = {
  /** `NBD_FLAG_HAS_FLAGS` (bit 0): MUST always be 1. */
  HAS_FLAGS: 1 << 0,
  /** `NBD_FLAG_READ_ONLY` (bit 1): the server errors writes. */
  READ_ONLY: 1 << 1,
  /** `NBD_FLAG_SEND_FLUSH` (bit 2): `NBD_CMD_FLUSH` is supported. */
  SEND_FLUSH: 1 << 2,
  /** `NBD_FLAG_SEND_FUA` (bit 3): `NBD_CMD_FLAG_FUA` is supported. */
  SEND_FUA: 1 << 3,
  /** `NBD_FLAG_ROTATIONAL` (bit 4): a hint. */
  ROTATIONAL: 1 << 4,
  /** `NBD_FLAG_SEND_TRIM` (bit 5): `NBD_CMD_TRIM` is supported. */
  SEND_TRIM: 1 << 5,
  /** `NBD_FLAG_SEND_WRITE_ZEROES` (bit 6): `NBD_CMD_WRITE_ZEROES` and `NBD_CMD_FLAG_NO_HOLE` are supported. */
  SEND_WRITE_ZEROES: 1 << 6,
  /** `NBD_FLAG_SEND_DF` (bit 7): `NBD_CMD_FLAG_DF` on reads (structured replies only). */
  SEND_DF: 1 << 7,
  /** `NBD_FLAG_CAN_MULTI_CONN` (bit 8): flush and FUA are visible across all connections to the export. */
  CAN_MULTI_CONN: 1 << 8,
  /** `NBD_FLAG_SEND_RESIZE` (bit 9): the experimental RESIZE extension. */
  SEND_RESIZE: 1 << 9,
  /** `NBD_FLAG_SEND_CACHE` (bit 10): `NBD_CMD_CACHE`. */
  SEND_CACHE: 1 << 10,
  /** `NBD_FLAG_SEND_FAST_ZERO` (bit 11): `NBD_CMD_FLAG_FAST_ZERO`. */
  SEND_FAST_ZERO: 1 << 11,
  /** `NBD_FLAG_BLOCK_STAT_PAYLOAD` (bit 12): block status with a payload (extended headers only). */
  BLOCK_STAT_PAYLOAD: 1 << 12,
} as const;

/** Option types ("Option types"). */
export const NbdOpt = {
  /** Choose an export and enter transmission; no reply on failure (the server hangs up). */
  EXPORT_NAME: 1,
  ABORT: 2,
  LIST: 3,
  /** Withdrawn `PEEK_EXPORT` extension; not in use. */
  PEEK_EXPORT: 4,
  /** Upgrade the connection to TLS ("TLS support"). */
  STARTTLS: 5,
  /** Export details without entering transmission. */
  INFO: 6,
  /** Export details, then transmission on `NBD_REP_ACK`. */
  GO: 7,
  /** Ask for structured replies in the transmission phase. */
  STRUCTURED_REPLY: 8,
  LIST_META_CONTEXT: 9,
  SET_META_CONTEXT: 10,
  /** Extended headers (64-bit lengths); not used by this client. */
  EXTENDED_HEADERS: 11,
} as const;

/** Error option replies have bit 31 set ("Option reply types"). */
export const NBD_REP_ERR_BIT = 0x8000_0000;

/** Option reply types ("Option reply types"). */
export const NbdRep = {
  /** The option succeeded (no data). */
  ACK: 1,
  /** An export description (`NBD_OPT_LIST`). */
  SERVER: 2,
  /** An information item (`NBD_OPT_INFO`, `NBD_OPT_GO`): u16 type, then the payload. */
  INFO: 3,
  /** A metadata context. */
  META_CONTEXT: 4,
  /** Unknown option. */
  ERR_UNSUP: NBD_REP_ERR_BIT + 1,
  /** Forbidden by server policy. */
  ERR_POLICY: NBD_REP_ERR_BIT + 2,
  /** Syntactically or semantically invalid. */
  ERR_INVALID: NBD_REP_ERR_BIT + 3,
  /** Not supported on the server's platform (e.g. built without TLS). */
  ERR_PLATFORM: NBD_REP_ERR_BIT + 4,
  /** TLS must be initiated first. */
  ERR_TLS_REQD: NBD_REP_ERR_BIT + 5,
  /** The export is not available. */
  ERR_UNKNOWN: NBD_REP_ERR_BIT + 6,
  /** The server is shutting down. */
  ERR_SHUTDOWN: NBD_REP_ERR_BIT + 7,
  /** The client must request `NBD_INFO_BLOCK_SIZE`. */
  ERR_BLOCK_SIZE_REQD: NBD_REP_ERR_BIT + 8,
  /** Request or reply too large. */
  ERR_TOO_BIG: NBD_REP_ERR_BIT + 9,
  /** Extended headers are required. */
  ERR_EXT_HEADER_REQD: NBD_REP_ERR_BIT + 10,
} as const;

/** Information types in `NBD_REP_INFO` and the request list of `NBD_OPT_INFO` / `NBD_OPT_GO` ("NBD_REP_INFO"). */
export const NbdInfo = {
  /** Length 12: u16 type, u64 size, u16 transmission flags. Mandatory before `NBD_REP_ACK`. */
  EXPORT: 0,
  /** Length >= 2: the canonical export name. */
  NAME: 1,
  /** Length >= 2: a description for humans. */
  DESCRIPTION: 2,
  /** Length 14: u16 type, u32 minimum, u32 preferred, u32 maximum block size ("Block size constraints"). */
  BLOCK_SIZE: 3,
} as const;

/** Request types ("Request types"). */
export const NbdCmd = {
  READ: 0,
  WRITE: 1,
  /** Disconnect; no reply. */
  DISC: 2,
  FLUSH: 3,
  TRIM: 4,
  CACHE: 5,
  WRITE_ZEROES: 6,
  BLOCK_STATUS: 7,
  /** The experimental RESIZE extension. */
  RESIZE: 8,
} as const;

/** Command flags, 16 bits in each request ("Command flags"). */
export const NbdCmdFlag = {
  /** `NBD_CMD_FLAG_FUA` (bit 0): persist before replying (needs `NBD_FLAG_SEND_FUA`). */
  FUA: 1 << 0,
  /** `NBD_CMD_FLAG_NO_HOLE` (bit 1): write zeroes without punching a hole. */
  NO_HOLE: 1 << 1,
  /** `NBD_CMD_FLAG_DF` (bit 2): at most one content chunk in a read reply. */
  DF: 1 << 2,
  /** `NBD_CMD_FLAG_REQ_ONE` (bit 3): one extent per block status chunk. */
  REQ_ONE: 1 << 3,
  /** `NBD_CMD_FLAG_FAST_ZERO` (bit 4): fail write zeroes with ENOTSUP unless it is fast. */
  FAST_ZERO: 1 << 4,
  /** `NBD_CMD_FLAG_PAYLOAD_LEN` (bit 5): extended headers only. */
  PAYLOAD_LEN: 1 << 5,
} as const;

/** Structured reply flags ("Structured reply flags"). */
export const NbdReplyFlag = {
  /** `NBD_REPLY_FLAG_DONE` (bit 0): the final chunk of a reply. */
  DONE: 1 << 0,
} as const;

/** Chunk types with bit 15 set are error chunks ("Structured reply types"). */
export const NBD_REPLY_TYPE_ERROR_BIT = 0x8000;

/** Structured reply chunk types ("Structured reply types"). */
export const NbdReplyType = {
  /** Length 0, only with `NBD_REPLY_FLAG_DONE`. */
  NONE: 0,
  /** Length >= 9: u64 offset, then data (reads only). */
  OFFSET_DATA: 1,
  /** Length 12: u64 offset, u32 hole size (nonzero); reads as zeroes (reads only). */
  OFFSET_HOLE: 2,
  /** Block status; only after `NBD_OPT_SET_META_CONTEXT`, which this client never sends. */
  BLOCK_STATUS: 5,
  /** Extended block status; extended headers only. */
  BLOCK_STATUS_EXT: 6,
  /** Length >= 6: u32 error (nonzero), u16 message length, message. */
  ERROR: NBD_REPLY_TYPE_ERROR_BIT + 1,
  /** Length >= 14: u32 error (nonzero), u16 message length, message, u64 offset. */
  ERROR_OFFSET: NBD_REPLY_TYPE_ERROR_BIT + 2,
} as const;

/** Error values in replies ("Error values"). A client treats unknown values like EINVAL. */
export const NbdErrno = {
  EPERM: 1,
  EIO: 5,
  ENOMEM: 12,
  EINVAL: 22,
  ENOSPC: 28,
  EOVERFLOW: 75,
  ENOTSUP: 95,
  ESHUTDOWN: 108,
} as const;

/** Sizes of fixed wire structures, in bytes. */
export const NbdSize = {
  /** Server greeting: NBDMAGIC, IHAVEOPT, u16 handshake flags ("Newstyle negotiation"). */
  GREETING: 18,
  /** Option request header: IHAVEOPT, u32 option, u32 length. */
  OPTION_HEADER: 16,
  /** Option reply header: u64 magic, u32 option, u32 type, u32 length. */
  OPTION_REPLY_HEADER: 20,
  /** Reply to `NBD_OPT_EXPORT_NAME`: u64 size, u16 flags (then 124 zeroes unless NO_ZEROES). */
  EXPORT_NAME_REPLY: 10,
  /** The zero padding after the `NBD_OPT_EXPORT_NAME` reply. */
  EXPORT_NAME_PADDING: 124,
  /** Request: u32 magic, u16 flags, u16 type, u64 cookie, u64 offset, u32 length ("Request message"). */
  REQUEST: 28,
  /** Simple reply: u32 magic, u32 error, u64 cookie ("Simple reply message"). */
  SIMPLE_REPLY: 16,
  /** Structured reply chunk header: u32 magic, u16 flags, u16 type, u64 cookie, u32 length. */
  STRUCTURED_REPLY: 20,
  /** Longest string the spec allows (export names, error messages): "MUST be no longer than 4096 bytes". */
  MAX_STRING: 4096,
} as const;

/** The IANA port for NBD ("Newstyle negotiation"; URI spec "NBD URI authority"). */
export const NBD_DEFAULT_PORT = 10809;

/** Names of option reply error types, for messages. */
export function repName(type: number): string {
  for (const [name, value] of Object.entries(NbdRep)) if (value === type) return `NBD_REP_${name}`;
  return (type & NBD_REP_ERR_BIT) !== 0
    ? `NBD_REP_ERR(${type - NBD_REP_ERR_BIT})`
    : `reply type ${type}`;
}

/** Names of options, for messages. */
export function optName(option: number): string {
  for (const [name, value] of Object.entries(NbdOpt)) if (value === option) return `NBD_OPT_${name}`;
  return `option ${option}`;
}

/** Name of an NBD error number, for messages (e.g. `EIO`). */
export function errnoName(errno: number): string {
  for (const [name, value] of Object.entries(NbdErrno)) if (value === errno) return name;
  return `error ${errno}`;
}

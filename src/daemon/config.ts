/**
 * The configuration file of `vhost-user serve` (one daemon, many devices), and the device bodies of the management
 * API's `PUT /devices/{id}` (api-server.ts): zod schemas, the TypeScript types of the parsed result (defaults filled
 * in), and parsers that turn every problem into a `ConfigError` listing each issue with its path:
 *
 * ```json
 * {
 *   "threads": 4, "sync": "qsbr", "apiSocket": "/run/vhost-user/api.sock", "logLevel": "info",
 *   "devices": [
 *     { "id": "disk0", "type": "blk", "socket": "/run/vhost-user/disk0.sock", "image": "/var/lib/vm/disk0.img", "queues": 2 },
 *     { "id": "scratch", "type": "blk", "socket": "/run/vhost-user/scratch.sock", "null": "1G" },
 *     { "id": "net0", "type": "net", "socket": "/run/vhost-user/net0.sock", "port": "tap:vu0", "queues": 2 },
 *     { "id": "rng0", "type": "rng", "socket": "/run/vhost-user/rng0.sock", "maxBytes": 4096 }
 *   ]
 * }
 * ```
 *
 * Every option of the one-device commands (`vhost-user blk`, `net`, `rng`) is a camelCase field here with the same
 * range and default, except `--workers`, `--sync` and `--busy-poll`: a one-device command runs its own workers, while
 * the daemon has one worker pool shared by every device, so these are the daemon-wide `threads`, `sync` and
 * `busyPollUs`.
 *
 * Objects are strict at every level: an unknown field (a typo such as `qeues`) is an error naming it, never ignored.
 * A parsed configuration is plain JSON again (sizes become byte counts), so `GET /devices/{id}` can show it and it can
 * be sent back as it is.
 */
import { readFile } from 'node:fs/promises';
import * as z from 'zod';
import { VhostError } from '../errors.js';
import { MAX_FRAME, MIN_FRAME } from '../devices/net/constants.js';
import { parseNbdUri } from '../devices/blk/nbd/uri.js';

// ---- limits (the one-device commands' ranges) --------------------------------------------------------------------

/** The busy-poll window's range (MAX_BUSY_POLL_US of backend/worker-pool.ts, which a test checks). */
export const MAX_CONFIG_BUSY_POLL_US = 1_000_000;

/** Largest unix socket path in bytes (sun_path is 108 bytes with its NUL). */
export const MAX_SOCKET_PATH_BYTES = 107;
/** Memory slots offered with CONFIGURE_MEM_SLOTS (0: not offered). */
export const MAX_MEM_SLOTS = 509;
export const MAX_BLK_QUEUES = 64;
/** Queue pairs of a net device (MAX_QUEUE_PAIRS of devices/net/net-device.ts, which a test checks). */
export const MAX_NET_QUEUE_PAIRS = 32;
export const MAX_QUEUE_SIZE = 32768;
/** GET_ID serial of a blk device. */
export const MAX_SERIAL_BYTES = 20;
/** Worker threads of the daemon's pool. */
export const MAX_THREADS = 64;
/** rng: most bytes given per request (`vhost-user rng --max-bytes`), longest rate-limit period. */
export const MAX_RNG_BYTES_PER_REQUEST = 1 << 20;
export const MAX_RNG_RATE_PERIOD_MS = 3_600_000;
export const SECTOR_BYTES = 512;
/** vsock: the largest guest CID (2^32 - 2; -1 is VMADDR_CID_ANY). */
export const MAX_VSOCK_GUEST_CID = 0xffff_fffe;
/** How long NBD requests may wait for their server (seconds). */
export const DEFAULT_NBD_TIMEOUT_S = 30;
export const MAX_NBD_TIMEOUT_S = 3600;
const NBD_URI_MESSAGE = 'expected an NBD URI: nbd://HOST[:PORT]/EXPORT, nbd+unix:///EXPORT?socket=PATH, nbds://..., nbds+unix://...';

export const LOG_LEVELS = ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'] as const;
export type LogLevel = (typeof LOG_LEVELS)[number];
/** The memory synchronization modes of the worker pool (SYNC_MODES of backend/sync-block.ts, which a test checks). */
export const SYNC_MODE_NAMES = ['qsbr', 'lock', 'copy'] as const;
export type SyncModeName = (typeof SYNC_MODE_NAMES)[number];
export const BLK_IO_MODES = ['sync', 'async'] as const;

/** Device ids: 1..64 characters, letters, digits, '.', '_', '-', starting with a letter or a digit. */
export const DEVICE_ID_PATTERN = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;

// ---- the parsed types ---------------------------------------------------------------------------------------------

interface DeviceConfigBase {
  /** Unique in the daemon; the API's `/devices/{id}`. */
  id: string;
  /** The vhost-user socket the device listens on (a stale socket file is replaced). */
  socket: string;
  /** Memory slots offered to the frontend (0: CONFIGURE_MEM_SLOTS not offered). Default 509. */
  memSlots: number;
  /** This device's log level; absent: the daemon's. */
  logLevel?: LogLevel;
  /** Largest queue size the driver may use (a power of two). Default 1024. */
  queueSize: number;
}

/** `vhost-user blk`: exactly one of `image`, `null` and `nbd`. */
export interface BlkDeviceConfig extends DeviceConfigBase {
  type: 'blk';
  /** A raw image file (its size rounded down to 512 bytes is the capacity). */
  image?: string;
  /** A null device of this many bytes (a positive multiple of 512; "1G" in the file becomes 1073741824). */
  null?: number;
  /**
   * An NBD export (nbd://host[:port]/export, nbd+unix:///export?socket=PATH, nbds:// and nbds+unix:// for TLS):
   * its size is the capacity; it is read-only, has FLUSH, DISCARD and WRITE_ZEROES as the server says.
   */
  nbd?: string;
  /** TLS (nbds URIs): PEM files of the CA that signed the server's certificate, and a client certificate and key. */
  nbdTlsCa?: string;
  nbdTlsCert?: string;
  nbdTlsKey?: string;
  /** Seconds a request waits for a lost NBD server to come back before the guest gets an I/O error (absent: 30). */
  nbdTimeout?: number;
  /** Default false. */
  readOnly: boolean;
  /** Request queues, 1..64. Default 1. */
  queues: number;
  /** Reads and writes in the queue worker (sync) or an I/O thread per queue (async). Default sync. */
  io: 'sync' | 'async';
  /** GET_ID serial, at most 20 bytes. Default "vhost-user-ts". */
  serial: string;
}

/** `vhost-user net`. */
export interface NetDeviceConfig extends DeviceConfigBase {
  type: 'net';
  /** "loopback", "sink", "source" or "tap:NAME" (see `parseNetPort`). */
  port: string;
  /** Queue pairs, 1..32. Default 1. */
  queues: number;
  /** MAC address in the configuration space ("52:54:00:12:34:56"; not multicast). Absent: the device's default. */
  mac?: string;
  /** Length of the source port's frames (ignored by the other ports). Default 64. */
  frameLen: number;
}

/** `vhost-user rng`. */
export interface RngDeviceConfig extends DeviceConfigBase {
  type: 'rng';
  /** Most bytes given per request, 1..1048576. Default 65536. */
  maxBytes: number;
  /** Rate limit: at most this many bytes per `ratePeriodMs`, 1..2^31. Absent: no limit. */
  rateBytes?: number;
  /** The rate limit's period, 1..3600000 ms. Default 1000. */
  ratePeriodMs: number;
}

/** `vhost-user vsock`. */
export interface VsockDeviceConfig extends DeviceConfigBase {
  type: 'vsock';
  /** The guest's context ID, 3..4294967294. */
  guestCid: number;
  /** The hybrid unix socket: host programs connect here; guest connections to host port P go to `udsPath_P`. */
  udsPath: string;
}

export type DeviceConfig = BlkDeviceConfig | NetDeviceConfig | RngDeviceConfig | VsockDeviceConfig;

export interface DaemonConfig {
  /** Worker threads of the shared pool, 1..64. Absent: the daemon decides (one per CPU). Replaces `--workers`. */
  threads?: number;
  /** How the pool's workers are kept off memory being removed (docs/memory-sync.md). Default qsbr. Replaces `--sync`. */
  sync: SyncModeName;
  /** Busy-poll window of the pool's workers, microseconds (0..1000000, default 0). Replaces `--busy-poll`. */
  busyPollUs: number;
  /** The management API's unix socket (`--api-socket` overrides it). Absent: no API unless given on the command line. */
  apiSocket?: string;
  /** The daemon's log level. Absent: the daemon's default. */
  logLevel?: LogLevel;
  /** The devices started with the daemon (may be empty: devices can be added over the API). */
  devices: DeviceConfig[];
}

/** A net port, parsed from `NetDeviceConfig.port`. */
export type NetPortConfig = { kind: 'loopback' } | { kind: 'sink' } | { kind: 'source' } | { kind: 'tap'; name: string };

// ---- errors ---------------------------------------------------------------------------------------------------------

/** An invalid configuration (file or API body). `issues` name each problem with its path, e.g. `devices[2].queues: ...`. */
export class ConfigError extends VhostError {
  readonly issues: string[];

  constructor(issues: string[], what = 'invalid configuration', options?: ErrorOptions) {
    super('VHOST_CONFIG_INVALID', `${what}: ${issues.join('; ')}`, options);
    this.name = 'ConfigError';
    this.issues = issues;
  }
}

// ---- value parsers shared with the CLI ------------------------------------------------------------------------------

const UNITS: Record<string, number> = { '': 1, k: 1024, m: 1024 ** 2, g: 1024 ** 3, t: 1024 ** 4 };

/**
 * Parses sizes like "4096", "4k", "64M", "1G", "2T" (binary units; an optional "i" and "b" after the unit: "64MiB"),
 * the rules of the CLI's `--null`. Throws a RangeError naming the problem.
 */
export function parseSizeText(text: string): number {
  const m = /^(\d+)([kmgt]?)i?b?$/i.exec(text.trim());
  const unit = UNITS[(m?.[2] ?? '').toLowerCase()];
  if (m === null || unit === undefined) throw new RangeError('expected a size such as 4096, 4k, 64M or 1G');
  const n = Number(m[1]) * unit;
  if (!Number.isSafeInteger(n)) throw new RangeError('size too large');
  return n;
}

/** Parses a net port: loopback, sink, source, or tap:NAME with NAME a Linux interface name (1..15, no '/', ':' or space). */
export function parseNetPort(text: string): NetPortConfig {
  if (text === 'loopback' || text === 'sink' || text === 'source') return { kind: text };
  const tap = /^tap:([^/\s:]{1,15})$/.exec(text);
  if (tap !== null) return { kind: 'tap', name: tap[1] as string };
  throw new RangeError('expected "loopback", "sink", "source" or "tap:NAME" (NAME: an interface name of 1..15 characters without "/", ":" or whitespace)');
}

/** Whether `text` is a unicast MAC address of six hex bytes separated by ':' (what NetDevice accepts). */
export function isUnicastMac(text: string): boolean {
  if (!/^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$/.test(text)) return false;
  return (parseInt(text.slice(0, 2), 16) & 1) === 0;
}

// ---- schemas --------------------------------------------------------------------------------------------------------

/** An error message for a field: "required" when it is missing, `message` otherwise. */
function need(message: string): (issue: { input?: unknown }) => string {
  return (issue) => (issue.input === undefined ? 'required' : message);
}

function int(min: number, max: number) {
  const message = `expected an integer in ${min}..${max}`;
  return z.number({ error: need(message) }).refine((n) => Number.isInteger(n) && n >= min && n <= max, { error: message });
}

function powerOfTwo(min: number, max: number) {
  const message = `expected a power of two in ${min}..${max}`;
  return z.number({ error: need(message) }).refine((n) => Number.isInteger(n) && n >= min && n <= max && (n & (n - 1)) === 0, {
    error: message,
  });
}

function oneOf<const T extends readonly [string, ...string[]]>(values: T) {
  return z.enum(values, { error: need(`expected one of ${values.map((v) => JSON.stringify(v)).join(', ')}`) });
}

/** A string of 1..max bytes without NUL (a path handed to the kernel). */
function path(max = 4096) {
  const message = max === 4096 ? 'expected a non-empty path' : `expected a non-empty path of at most ${max} bytes`;
  return z.string({ error: need(message) }).refine((s) => s.length > 0 && !s.includes('\0') && Buffer.byteLength(s) <= max, {
    error: message,
  });
}

const SIZE_MESSAGE = 'expected a size in bytes: a number or a string such as "64M" or "1G"';

/** A size in bytes, a positive multiple of 512: a number, or a string with a binary unit ("1G"). Output: a number. */
const sizeSchema = z.union([z.number(), z.string()], { error: need(SIZE_MESSAGE) }).transform((value, ctx) => {
  let n: number;
  if (typeof value === 'number') {
    n = value;
  } else {
    try {
      n = parseSizeText(value);
    } catch (err) {
      ctx.issues.push({ code: 'custom', message: (err as Error).message, input: value });
      return z.NEVER;
    }
  }
  if (!Number.isSafeInteger(n) || n <= 0 || n % SECTOR_BYTES !== 0) {
    ctx.issues.push({ code: 'custom', message: `expected a positive multiple of ${SECTOR_BYTES} bytes, got ${n}`, input: value });
    return z.NEVER;
  }
  return n;
});

const strict = { error: need('expected an object') };

const commonFields = {
  id: z
    .string({ error: need('expected a string') })
    .regex(DEVICE_ID_PATTERN, {
      error: 'expected an id of 1..64 characters (letters, digits, ".", "_", "-"; the first a letter or a digit)',
    }),
  socket: path(MAX_SOCKET_PATH_BYTES),
  memSlots: int(0, MAX_MEM_SLOTS).default(MAX_MEM_SLOTS),
  logLevel: oneOf(LOG_LEVELS).exactOptional(),
};

const blkFields = {
  ...commonFields,
  type: z.literal('blk'),
  image: path().exactOptional(),
  null: sizeSchema.exactOptional(),
  nbd: z
    .string({ error: need(NBD_URI_MESSAGE) })
    .refine(
      (s) => {
        try {
          parseNbdUri(s);
          return true;
        } catch {
          return false;
        }
      },
      { error: NBD_URI_MESSAGE },
    )
    .exactOptional(),
  nbdTlsCa: path().exactOptional(),
  nbdTlsCert: path().exactOptional(),
  nbdTlsKey: path().exactOptional(),
  nbdTimeout: int(1, MAX_NBD_TIMEOUT_S).exactOptional(),
  readOnly: z.boolean({ error: need('expected true or false') }).default(false),
  queues: int(1, MAX_BLK_QUEUES).default(1),
  queueSize: powerOfTwo(1, MAX_QUEUE_SIZE).default(1024),
  io: oneOf(BLK_IO_MODES).default('sync'),
  serial: z
    .string({ error: need(`expected a string of at most ${MAX_SERIAL_BYTES} bytes`) })
    .refine((s) => Buffer.byteLength(s) <= MAX_SERIAL_BYTES, { error: `expected a string of at most ${MAX_SERIAL_BYTES} bytes` })
    .default('vhost-user-ts'),
};

/** A JSON object (not null, not an array). These refinements also see the raw input when parsing failed. */
function isRecord(value: unknown): value is Record<string, unknown> {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}

/** Runs even when other fields had errors, so that "exactly one of" is reported along with them. */
const always = { when: () => true };

export const BlkDeviceConfigSchema = z.strictObject(blkFields, strict).superRefine((value, ctx) => {
  if (!isRecord(value)) return; // reported already
  const given = (['image', 'null', 'nbd'] as const).filter((k) => value[k] !== undefined);
  if (given.length !== 1) {
    ctx.addIssue({
      code: 'custom',
      message:
        given.length === 0
          ? 'give exactly one of "image" (a file), "null" (a size) or "nbd" (a URI)'
          : `give one of ${given.map((k) => `"${k}"`).join(', ')}, not ${given.length === 2 ? 'both' : 'all'}`,
      input: value,
    });
  }
  for (const k of ['nbdTlsCa', 'nbdTlsCert', 'nbdTlsKey', 'nbdTimeout'] as const) {
    if (value[k] !== undefined && value.nbd === undefined) {
      ctx.addIssue({ code: 'custom', message: `"${k}" is for an "nbd" disk`, path: [k], input: value });
    }
  }
}, always);

export const NetDeviceConfigSchema = z.strictObject(
  {
    ...commonFields,
    type: z.literal('net'),
    port: z.string({ error: need('expected a string') }).refine(
      (s) => {
        try {
          parseNetPort(s);
          return true;
        } catch {
          return false;
        }
      },
      {
        error: 'expected "loopback", "sink", "source" or "tap:NAME" (NAME: 1..15 characters without "/", ":" or whitespace)',
      },
    ),
    queues: int(1, MAX_NET_QUEUE_PAIRS).default(1),
    mac: z
      .string({ error: need('expected a string') })
      .refine(isUnicastMac, { error: 'expected a unicast MAC address of six hex bytes such as "52:54:00:12:34:56"' })
      .exactOptional(),
    queueSize: powerOfTwo(2, MAX_QUEUE_SIZE).default(1024),
    frameLen: int(MIN_FRAME, MAX_FRAME).default(64),
  },
  strict,
);

export const RngDeviceConfigSchema = z.strictObject(
  {
    ...commonFields,
    type: z.literal('rng'),
    queueSize: powerOfTwo(1, MAX_QUEUE_SIZE).default(1024),
    maxBytes: int(1, MAX_RNG_BYTES_PER_REQUEST).default(65536),
    rateBytes: int(1, 2 ** 31).exactOptional(),
    ratePeriodMs: int(1, MAX_RNG_RATE_PERIOD_MS).default(1000),
  },
  strict,
);

export const VsockDeviceConfigSchema = z.strictObject(
  {
    ...commonFields,
    type: z.literal('vsock'),
    queueSize: powerOfTwo(1, MAX_QUEUE_SIZE).default(256),
    guestCid: int(3, MAX_VSOCK_GUEST_CID),
    // The unix socket and `udsPath_PORT` (up to 11 more bytes) must fit sun_path.
    udsPath: path(MAX_SOCKET_PATH_BYTES - 11),
  },
  strict,
);

const DEVICE_TYPES = '"blk", "net", "rng" or "vsock"';

export const DeviceConfigSchema = z.discriminatedUnion('type', [BlkDeviceConfigSchema, NetDeviceConfigSchema, RngDeviceConfigSchema, VsockDeviceConfigSchema], {
  error: (issue) => {
    if (!isRecord(issue.input)) return 'expected an object';
    return issue.input.type === undefined ? `required: ${DEVICE_TYPES}` : `expected ${DEVICE_TYPES}`;
  },
});

/** The same value twice in the devices: one issue per duplicate, naming both places. */
function checkUnique(devices: unknown[], field: 'id' | 'socket', ctx: z.RefinementCtx): void {
  const seen = new Map<string, number>();
  devices.forEach((device, index) => {
    const value = isRecord(device) ? device[field] : undefined;
    if (typeof value !== 'string') return;
    const first = seen.get(value);
    if (first === undefined) {
      seen.set(value, index);
    } else {
      ctx.addIssue({
        code: 'custom',
        message: `duplicate ${field} ${JSON.stringify(value)} (also devices[${first}].${field})`,
        path: ['devices', index, field],
        input: value,
      });
    }
  });
}

export const DaemonConfigSchema = z
  .strictObject(
    {
      threads: int(1, MAX_THREADS).exactOptional(),
      sync: oneOf(SYNC_MODE_NAMES).default('qsbr'),
      busyPollUs: int(0, MAX_CONFIG_BUSY_POLL_US).default(0),
      apiSocket: path(MAX_SOCKET_PATH_BYTES).exactOptional(),
      logLevel: oneOf(LOG_LEVELS).exactOptional(),
      devices: z.array(DeviceConfigSchema, { error: need('expected an array') }).default([]),
    },
    strict,
  )
  .superRefine((value, ctx) => {
    if (!isRecord(value) || !Array.isArray(value.devices)) return; // reported already
    const devices: unknown[] = value.devices;
    checkUnique(devices, 'id', ctx);
    checkUnique(devices, 'socket', ctx);
  }, always);

// The schemas' outputs are the interfaces above (checked here at compile time).
type Assert<T extends true> = T;
type Same<A, B> = [A] extends [B] ? ([B] extends [A] ? true : false) : false;
type _BlkMatches = Assert<Same<z.output<typeof BlkDeviceConfigSchema>, BlkDeviceConfig>>;
type _NetMatches = Assert<Same<z.output<typeof NetDeviceConfigSchema>, NetDeviceConfig>>;
type _RngMatches = Assert<Same<z.output<typeof RngDeviceConfigSchema>, RngDeviceConfig>>;
type _VsockMatches = Assert<Same<z.output<typeof VsockDeviceConfigSchema>, VsockDeviceConfig>>;
type _DaemonMatches = Assert<Same<z.output<typeof DaemonConfigSchema>, DaemonConfig>>;

// ---- parsing --------------------------------------------------------------------------------------------------------

/** `devices[2].queues` from ['devices', 2, 'queues']; `root` for the top level. */
function formatPath(path: readonly PropertyKey[], root: string): string {
  let out = '';
  for (const key of path) {
    if (typeof key === 'number') out += `[${key}]`;
    else out += out === '' ? String(key) : `.${String(key)}`;
  }
  return out === '' ? root : out;
}

/** One line per problem ("devices[0]: unknown field "qeues"", ...), in document order as zod reports them. */
export function formatIssues(error: z.ZodError, root: string): string[] {
  const lines: string[] = [];
  for (const issue of error.issues) {
    const where = formatPath(issue.path, root);
    if (issue.code === 'unrecognized_keys') {
      for (const key of issue.keys) lines.push(`${where}: unknown field ${JSON.stringify(key)}`);
    } else if (issue.code === 'invalid_value' && issue.values.length === 1 && issue.path.at(-1) === 'type') {
      lines.push(`${where}: expected ${JSON.stringify(issue.values[0])}`);
    } else {
      lines.push(`${where}: ${issue.message}`);
    }
  }
  return lines;
}

/**
 * A copy without the fields whose value is `undefined`, at every level: what JSON would give. The schemas take an
 * absent optional field, not an undefined one; callers that build objects in JavaScript (`{ mac: opts.mac }`) get
 * the same answer as from JSON.
 */
function withoutUndefined(value: unknown): unknown {
  if (Array.isArray(value)) return value.map(withoutUndefined);
  if (!isRecord(value) || ![Object.prototype, null].includes(Object.getPrototypeOf(value) as object | null)) return value;
  const out: Record<string, unknown> = {};
  for (const [key, v] of Object.entries(value)) if (v !== undefined) out[key] = withoutUndefined(v);
  return out;
}

function parseWith<T>(schema: z.ZodType<T>, json: unknown, root: string, what: string): T {
  const result = schema.safeParse(withoutUndefined(json));
  if (!result.success) throw new ConfigError(formatIssues(result.error, root), what, { cause: result.error });
  return result.data;
}

/** Validates a whole configuration (a parsed JSON value) and fills in defaults. Throws ConfigError. */
export function parseDaemonConfig(json: unknown): DaemonConfig {
  return parseWith(DaemonConfigSchema, json, 'config', 'invalid daemon configuration');
}

/** Validates one device (an element of `devices`, or an API body) and fills in defaults. Throws ConfigError. */
export function parseDeviceConfig(json: unknown): DeviceConfig {
  return parseWith(DeviceConfigSchema, json, 'device', 'invalid device configuration');
}

/**
 * Reads, parses and validates a configuration file. Invalid JSON or content: ConfigError (its message names the
 * file); a file that cannot be read: Node's error (ENOENT, EACCES, ...).
 */
export async function readDaemonConfig(file: string): Promise<DaemonConfig> {
  const text = await readFile(file, 'utf8');
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (err) {
    throw new ConfigError([`config: not valid JSON (${(err as Error).message})`], `invalid config file ${file}`, { cause: err });
  }
  try {
    return parseDaemonConfig(json);
  } catch (err) {
    if (err instanceof ConfigError) throw new ConfigError(err.issues, `invalid config file ${file}`, { cause: err.cause });
    throw err;
  }
}

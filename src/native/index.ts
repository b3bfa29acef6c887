/**
 * Typed wrapper of the native addon (native/vhost_user.cc): the syscalls Node lacks, and no logic.
 *
 * Every function throws a `SystemError` (`code` such as 'EBADF', `errno`, `syscall`) on failure; a bad fd is an
 * error, never a crash. The addon is context-aware: worker threads load it too, and each thread's fd watchers are
 * closed when that thread's environment goes away.
 */
import { readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { fileURLToPath } from 'node:url';
import { VhostError } from '../errors.js';

/** Result of `fstat`: enough to tell whether two fds are the same file (`dev` and `ino`) and how big it is. */
export interface FileStat {
  size: number;
  dev: bigint;
  ino: bigint;
  mode: number;
}

/** Result of `tunOpen`. */
export interface TapDevice {
  /** The queue fd (non-blocking, close-on-exec): read() returns one Ethernet frame, write() sends one. */
  fd: number;
  /** The interface name the kernel used (the requested one, or the one it picked for ''). */
  name: string;
}

interface Addon {
  memfdCreate(name: string, size: number | bigint): number;
  getSeals(fd: number): number;
  addSeals(fd: number, seals: number): void;
  mapShared(fd: number, offset: number | bigint, length: number | bigint, writable: boolean): SharedArrayBuffer;
  revoke(buffer: SharedArrayBuffer): void;
  isRevoked(buffer: SharedArrayBuffer): boolean;
  mappingCount(): number;
  fstat(fd: number): FileStat;
  close(fd: number): void;
  dup(fd: number): number;
  eventfd(initval: number, nonblocking: boolean): number;
  isEventfd(fd: number): boolean;
  eventfdRead(fd: number): number;
  eventfdWrite(fd: number, value?: number | bigint): void;
  timerfdCreate(): number;
  timerfdArm(fd: number, ms: number): void;
  poll(fds: Int32Array, revents: Int32Array, timeoutMs: number): number;
  tunOpen(name: string, multiQueue: boolean, vnetHdr: boolean): TapDevice;
  tunSetOffload(fd: number, flags: number): void;
  copy(dst: Uint8Array | ArrayBufferLike, dstOffset: number, src: Uint8Array | ArrayBufferLike, srcOffset: number, length: number): void;
  listen(path: string, backlog: number): number;
  accept(fd: number): number;
  connect(path: string): number;
  socketPair(): [number, number];
  recvmsg(fd: number, buffer: Uint8Array, fds: number[]): number;
  sendmsg(fd: number, buffer: Uint8Array, fds: readonly number[]): number;
  watch(fd: number, events: number, callback: (events: number) => void): number;
  rewatch(id: number, events: number): void;
  unwatch(id: number): void;
  pageSize: number;
}

// dist/src/native/index.js -> <package root>/build/Release/vhost_user.node
const ADDON_URL = new URL('../../../build/Release/vhost_user.node', import.meta.url);

/**
 * Loads the addon, or throws a VhostError that says how to fix it: `VHOST_NATIVE_ABI_MISMATCH` when it was built
 * for another Node (node-gyp builds it for the Node that runs `npm ci`; an addon works only with the Node major, and
 * NODE_MODULE_VERSION, it was built for), `VHOST_NATIVE_MISSING` when it was never built, `VHOST_NATIVE_LOAD_FAILED`
 * for anything else dlopen() refuses. The original error is the `cause`.
 */
function loadAddon(): Addon {
  const path = fileURLToPath(ADDON_URL);
  try {
    return createRequire(import.meta.url)(path) as Addon;
  } catch (err) {
    throw addonLoadError(path, err);
  }
}

const REBUILD_HINT =
  'Rebuild it with the Node you run it with (the `node` first on PATH): `npm rebuild vhost-user` in a project that ' +
  'depends on vhost-user, or `node scripts/build-native.js` (or `npm ci`) in a checkout of it.';

/** The error for a failed load of the addon at `path`. */
function addonLoadError(path: string, err: unknown): VhostError {
  const e = err as { code?: unknown; message?: unknown };
  const message = typeof e.message === 'string' ? e.message : String(err);
  const thisNode = `Node ${process.version} (NODE_MODULE_VERSION ${process.versions.modules})`;
  if (e.code === 'MODULE_NOT_FOUND') {
    return new VhostError(
      'VHOST_NATIVE_MISSING',
      `The native addon ${path} is not built. ${REBUILD_HINT}`,
      { cause: err },
    );
  }
  const abi = /NODE_MODULE_VERSION (\d+)\.[^]*NODE_MODULE_VERSION (\d+)/.exec(message);
  if (e.code === 'ERR_DLOPEN_FAILED' && abi !== null) {
    const built = builtFor(path);
    const forNode =
      built !== undefined && built.modules === abi[1]
        ? `Node ${built.node} (NODE_MODULE_VERSION ${abi[1]})`
        : `NODE_MODULE_VERSION ${abi[1]}`;
    return new VhostError(
      'VHOST_NATIVE_ABI_MISMATCH',
      `The native addon ${path} was built for ${forNode}, but this is ${thisNode} at ${process.execPath}. ${REBUILD_HINT}`,
      { cause: err },
    );
  }
  return new VhostError(
    'VHOST_NATIVE_LOAD_FAILED',
    `The native addon ${path} does not load in ${thisNode}: ${message.replace(/\s+/g, ' ')}. ${REBUILD_HINT}`,
    { cause: err },
  );
}

/** What scripts/build-native.js recorded next to the addon: the Node it was built for. */
function builtFor(path: string): { node: string; modules: string } | undefined {
  try {
    const info = JSON.parse(readFileSync(path.replace(/\.node$/, '.json'), 'utf8')) as { node?: unknown; modules?: unknown };
    return typeof info.node === 'string' && typeof info.modules === 'string' ? { node: info.node, modules: info.modules } : undefined;
  } catch {
    return undefined;
  }
}

const addon = loadAddon();

/** The system page size: mapping offsets must be multiples of it. */
export const PAGE_SIZE: number = addon.pageSize;

/** poll() revents bits (Linux values). */
export const POLLIN = 0x1;
export const POLLERR = 0x8;
export const POLLHUP = 0x10;
export const POLLNVAL = 0x20;

/** Events for `watch` (libuv's UV_READABLE / UV_WRITABLE). */
export const WATCH_READABLE = 1;
export const WATCH_WRITABLE = 2;

// ----- guest memory ---------------------------------------------------------------------------------------------

/** Creates an anonymous memory file (memfd, close-on-exec, sealable) of `size` bytes; returns its fd. */
export function memfdCreate(name: string, size: number | bigint): number {
  return addon.memfdCreate(name, size);
}

/** File seals (fcntl F_ADD_SEALS / F_GET_SEALS; Linux values). */
export const F_SEAL_SEAL = 0x1;
export const F_SEAL_SHRINK = 0x2;
export const F_SEAL_GROW = 0x4;
export const F_SEAL_WRITE = 0x8;
export const F_SEAL_FUTURE_WRITE = 0x10;

/**
 * The seals of a file (F_SEAL_* bits), or -1 when the file cannot be sealed at all (a regular file on disk, a
 * socket: anything but a memfd / shmem / hugetlbfs file). A memfd created without MFD_ALLOW_SEALING, or a file in
 * /dev/shm, reports F_SEAL_SEAL only.
 */
export function getSeals(fd: number): number {
  return addon.getSeals(fd);
}

/**
 * Adds seals (F_SEAL_* bits) to a memfd. EPERM once F_SEAL_SEAL is set, EBUSY for F_SEAL_WRITE while a writable
 * shared mapping exists, EINVAL for a file that cannot be sealed.
 */
export function addSeals(fd: number, seals: number): void {
  addon.addSeals(fd, seals);
}

/**
 * Maps `length` bytes of `fd` from the page-aligned file `offset` with MAP_SHARED into a real SharedArrayBuffer
 * (postable to workers without a copy). The file must already be at least `offset + length` long (ENXIO
 * otherwise): a mapping past the end of the file would SIGBUS. The mapping is undone when every thread has dropped
 * the buffer. Buffers over 4 GiB work, but typed-array views are limited to 2^32 elements: use windowed views.
 */
export function mapShared(fd: number, offset: number, length: number, writable = true): SharedArrayBuffer {
  return addon.mapShared(fd, offset, length, writable);
}

/**
 * Replaces a `mapShared` mapping in place with private anonymous memory (MAP_FIXED). Stale views, in any thread,
 * then read zeros and can never crash or reach the file; the file's memory is released once its fds are closed.
 * Idempotent. Throws EINVAL for a buffer that `mapShared` did not make.
 */
export function revoke(buffer: SharedArrayBuffer): void {
  addon.revoke(buffer);
}

export function isRevoked(buffer: SharedArrayBuffer): boolean {
  return addon.isRevoked(buffer);
}

/** Number of `mapShared` mappings alive in this process (revoked ones count until they are unmapped). */
export function mappingCount(): number {
  return addon.mappingCount();
}

export function fstat(fd: number): FileStat {
  return addon.fstat(fd);
}

export function close(fd: number): void {
  addon.close(fd);
}

/** Duplicates an fd (close-on-exec). */
export function dup(fd: number): number {
  return addon.dup(fd);
}

// ----- eventfd and poll -----------------------------------------------------------------------------------------

/** Creates an eventfd (close-on-exec). */
export function eventfdCreate(initval = 0, nonblocking = true): number {
  return addon.eventfd(initval, nonblocking);
}

/** True when `fd` is an eventfd (its /proc/self/fd link is "anon_inode:[eventfd]"); EBADF for a closed fd. */
export function isEventfd(fd: number): boolean {
  return addon.isEventfd(fd);
}

/**
 * A CLOCK_MONOTONIC timerfd (non-blocking, close-on-exec), disarmed: readable once it expires, read and reset with
 * `eventfdRead` (which returns the number of expiries). A worker can wait for it in poll() like any completion fd.
 */
export function timerfdCreate(): number {
  return addon.timerfdCreate();
}

/** Arms `fd` (from `timerfdCreate`) to expire once, `ms` milliseconds from now (0..86400000; 0 disarms it). */
export function timerfdArm(fd: number, ms: number): void {
  addon.timerfdArm(fd, ms);
}

/**
 * Reads and resets an eventfd's counter; returns 0 when it was not signalled. Never blocks, even on a blocking
 * eventfd (as QEMU's kick fds may be).
 */
export function eventfdRead(fd: number): number {
  return addon.eventfdRead(fd);
}

/** Adds `value` (default 1) to an eventfd's counter, waking its pollers. */
export function eventfdWrite(fd: number, value?: number): void {
  addon.eventfdWrite(fd, value);
}

/**
 * Blocks the calling thread until one of `fds` is readable or `timeoutMs` passes (-1: no limit); writes each fd's
 * revents into `revents` and returns how many are ready (0 on timeout or signal). Negative fds are ignored. For
 * worker threads only: always include an eventfd the controller can signal, or the worker cannot be stopped.
 */
export function poll(fds: Int32Array, revents: Int32Array, timeoutMs: number): number {
  return addon.poll(fds, revents, timeoutMs);
}

// ----- TAP devices ----------------------------------------------------------------------------------------------

/**
 * Opens a queue of TAP interface `name` (created if it does not exist; '' lets the kernel choose a name such as
 * tap0), in IFF_TAP | IFF_NO_PI mode, plus IFF_MULTI_QUEUE when `multiQueue` (open it once per queue with the same
 * name) and IFF_VNET_HDR with a 12-byte header when `vnetHdr` (every read and write then starts with a
 * virtio_net_hdr_mrg_rxbuf; see `tunSetOffload`). The fd is non-blocking and close-on-exec; it works with node:fs `readSync` (one frame per read, EAGAIN
 * when none is waiting) and `writeSync` (one frame per write), and with `watch`. The interface is not persistent:
 * it disappears when its last queue fd is closed. Needs CAP_NET_ADMIN to create an interface.
 */
export function tunOpen(name: string, multiQueue = false, vnetHdr = false): TapDevice {
  return addon.tunOpen(name, multiQueue, vnetHdr);
}

/** TUNSETOFFLOAD bits (linux/if_tun.h). */
export const TunOffload = { CSUM: 0x01, TSO4: 0x02, TSO6: 0x04, TSO_ECN: 0x08 } as const;

/**
 * TUNSETOFFLOAD on a vnet-header TAP queue: the offloads its reader takes (`TunOffload` bits). Frames the host sends
 * arrive as GSO frames or with partial checksums only where allowed; the kernel completes the rest before read().
 * Writes take every offload regardless. EINVAL for bits the kernel does not know.
 */
export function tunSetOffload(fd: number, flags: number): void {
  addon.tunSetOffload(fd, flags);
}

// ----- copying ---------------------------------------------------------------------------------------------------

/**
 * memmove of `length` bytes from `src` at `srcOffset` to `dst` at `dstOffset` (offsets relative to a view's start).
 * Both may be guest memory, ordinary buffers or views; both ranges are checked first and a bad one throws
 * (EINVAL, nothing copied). Unlike `TypedArray.prototype.set`, which copies into or out of shared memory with
 * relaxed atomic accesses (byte by byte when the two sides differ mod 8), this is libc memmove at any alignment:
 * 33-38 ns for 1500 bytes against 96-556 ns (Node 20, measured on a Zen 5 core). Costs ~15 ns a call, so a
 * copy of a few bytes is cheaper in JS.
 */
export function copy(dst: Uint8Array | ArrayBufferLike, dstOffset: number, src: Uint8Array | ArrayBufferLike, srcOffset: number, length: number): void {
  addon.copy(dst, dstOffset, src, srcOffset, length);
}

// ----- unix stream sockets with SCM_RIGHTS ----------------------------------------------------------------------

/** Creates a listening unix stream socket (non-blocking, close-on-exec) bound to `path`. */
export function listenUnix(path: string, backlog = 16): number {
  return addon.listen(path, backlog);
}

/** Accepts a pending connection (non-blocking, close-on-exec); -1 when none is pending. */
export function accept(listenFd: number): number {
  return addon.accept(listenFd);
}

/** Connects to a unix stream socket; the returned fd is non-blocking. */
export function connectUnix(path: string): number {
  return addon.connect(path);
}

/** A connected pair of unix stream sockets (non-blocking, close-on-exec). */
export function socketPair(): [number, number] {
  return addon.socketPair();
}

/**
 * Receives bytes into `buffer` and pushes any fds that came with them onto `fds`. Returns the byte count, 0 when the
 * peer has closed, or -1 when nothing is ready. The kernel may merge several fd-less messages with the next
 * fd-bearing one in one read, so callers keep the fds as a FIFO (see protocol/message-reader.ts).
 */
export function recvmsg(fd: number, buffer: Uint8Array, fds: number[]): number {
  return addon.recvmsg(fd, buffer, fds);
}

/** Sends `buffer` with up to 32 fds; returns the bytes sent or -1 when the socket buffer is full. Never SIGPIPE. */
export function sendmsg(fd: number, buffer: Uint8Array, fds: readonly number[] = []): number {
  return addon.sendmsg(fd, buffer, fds);
}

/**
 * Watches `fd` on the calling thread's event loop; `callback` receives the ready WATCH_* bits (or a negative libuv
 * status). Returns an id for `rewatch` / `unwatch`. The watcher keeps the event loop alive until unwatched; call
 * `unwatch` before closing the fd.
 */
export function watch(fd: number, events: number, callback: (events: number) => void): number {
  return addon.watch(fd, events, callback);
}

export function rewatch(id: number, events: number): void {
  addon.rewatch(id, events);
}

export function unwatch(id: number): void {
  addon.unwatch(id);
}

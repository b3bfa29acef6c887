/**
 * Boots a real Linux guest (Debian's kernel, a busybox initramfs) in QEMU under TCG, with its disks and NICs
 * served by external vhost-user-blk and vhost-user-net backends, and runs a shell script inside it. The scripts
 * are in test/guest/ (see its README.md for the guest side contract).
 *
 *     const r = await bootGuest({ blk: [{ socketPath }], script: { file: guestScript('blk-pattern.sh') } });
 *     assert.equal(r.exitCode, 0);
 *
 * The initramfs and the uncompressed kernel are built once per kernel and kept in
 * $VHOST_USER_GUEST_CACHE (default os.tmpdir()/vhost-user-guest-cache/<kernel version>/). Set
 * VHOST_USER_GUEST_LOG_DIR to keep every guest's console log there.
 */
import type { ChildProcess } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { accessSync, constants, createWriteStream, existsSync, readdirSync, statSync, type WriteStream } from 'node:fs';
import { mkdir, mkdtemp, readFile, readdir, rename, rm, rmdir, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { basename, dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { findBinary, type ToolRequirement } from './require-tool.js';
import { hasExited, spawnOwned, stopProcess } from './tmp.js';

// ------------------------------------------------------------------------------------------ locations

const BUSYBOX_PATHS = ['/bin/busybox', '/usr/bin/busybox'];

function isRepoRoot(dir: string): boolean {
  return existsSync(join(dir, 'package.json')) && existsSync(join(dir, 'test', 'guest', 'run-guest.sh'));
}

let cachedRoot: string | undefined;

/**
 * The repository root (the directory with package.json and test/guest/): $VHOST_USER_REPO if set, else the
 * first such directory above this compiled file, else the current directory.
 */
export function repoRoot(): string {
  if (cachedRoot !== undefined) return cachedRoot;
  const candidates: string[] = [];
  const env = process.env.VHOST_USER_REPO;
  if (env !== undefined && env !== '') candidates.push(resolve(env));
  for (let dir = dirname(fileURLToPath(import.meta.url)); ; dir = dirname(dir)) {
    candidates.push(dir);
    if (dirname(dir) === dir) break;
  }
  candidates.push(process.cwd());
  const found = candidates.find(isRepoRoot);
  if (found === undefined) {
    throw new Error('cannot find the repository root (package.json + test/guest/): set VHOST_USER_REPO');
  }
  cachedRoot = found;
  return found;
}

/** The absolute path of a file in test/guest/, e.g. guestScript('blk-pattern.sh'). */
export function guestScript(name: string): string {
  return join(repoRoot(), 'test', 'guest', name);
}

export interface GuestKernel {
  readonly version: string;
  /** /boot/vmlinuz-<version> */
  readonly vmlinuz: string;
}

function readable(path: string): boolean {
  try {
    accessSync(path, constants.R_OK);
    return true;
  } catch {
    return false;
  }
}

/** The newest kernel with a readable /boot/vmlinuz-V and /lib/modules/V/modules.dep (linux-image-amd64). */
export function findGuestKernel(): GuestKernel | undefined {
  let versions: string[];
  try {
    versions = readdirSync('/lib/modules');
  } catch {
    return undefined;
  }
  versions.sort((a, b) => b.localeCompare(a, 'en', { numeric: true }));
  for (const version of versions) {
    const vmlinuz = `/boot/vmlinuz-${version}`;
    if (readable(vmlinuz) && existsSync(`/lib/modules/${version}/modules.dep`)) return { version, vmlinuz };
  }
  return undefined;
}

/** What bootGuest needs on the host (pass to requireTools, together with the backend's tools). */
export const GUEST_TOOLS: readonly ToolRequirement[] = [
  { bin: 'qemu-system-x86_64', pkg: 'qemu-system-x86' },
  { check: () => BUSYBOX_PATHS.some((p) => existsSync(p)), what: 'busybox (static)', pkg: 'busybox-static' },
  {
    check: () => findGuestKernel() !== undefined,
    what: 'a readable /boot/vmlinuz-VERSION with /lib/modules/VERSION/modules.dep',
    pkg: 'linux-image-amd64',
  },
];

// ------------------------------------------------------------------------------------------ build cache

export interface GuestImage {
  readonly kernelVersion: string;
  /** The extracted vmlinux (PVH boot), or /boot/vmlinuz-* when it could not be extracted (slower boot). */
  readonly kernel: string;
  readonly initrd: string;
}

const BUILD_TIMEOUT_MS = 5 * 60_000;
const STALE_BUILD_MS = 60 * 60_000;

function statKey(path: string): string {
  const s = statSync(path);
  return `${path}:${s.size}:${s.mtimeMs}`;
}

function hash(parts: readonly (string | Buffer)[]): string {
  const h = createHash('sha256');
  for (const p of parts) h.update(p).update('\0');
  return h.digest('hex').slice(0, 16);
}

/** Runs a command, resolves with its stderr; rejects with it on a non-zero exit or after timeoutMs. */
async function run(command: string, args: readonly string[], timeoutMs: number): Promise<string> {
  const child = spawnOwned(command, args);
  let err = '';
  child.stdout?.resume();
  child.stderr?.on('data', (chunk: Buffer) => (err += chunk.toString('utf8')));
  const timer = setTimeout(() => void stopProcess(child), timeoutMs);
  try {
    const code = await new Promise<number | null>((res, rej) => {
      child.once('error', rej);
      child.once('close', (c) => res(c));
    });
    if (code !== 0) throw new Error(`${basename(args[0] ?? command)} failed (exit ${code}):\n${err}`);
    return err;
  } finally {
    clearTimeout(timer);
  }
}

/** Names this module creates in a cache directory; nothing else there is ever removed. */
const CACHE_ENTRY_RE = /^(initramfs-[0-9a-f]{16}\.cpio\.gz|vmlinux-[0-9a-f]{16}|\.build-[A-Za-z0-9]{6})$/;

/**
 * Called before a build: removes our files of kernels no longer installed, builds interrupted more than an
 * hour ago, and files of this kernel with another key (another build of the kernel, another version of the
 * scripts) that are older than a day.
 */
async function pruneCache(cacheRoot: string, dir: string, keep: readonly string[]): Promise<void> {
  const rmOld = async (path: string, ageMs: number): Promise<void> => {
    const s = await stat(path).catch(() => undefined);
    if (s !== undefined && Date.now() - s.mtimeMs > ageMs) await rm(path, { recursive: true, force: true });
  };
  const ours = async (d: string): Promise<string[]> =>
    (await readdir(d).catch(() => [])).filter((name) => CACHE_ENTRY_RE.test(name));
  for (const version of await readdir(cacheRoot).catch(() => [])) {
    if (existsSync(`/boot/vmlinuz-${version}`)) continue;
    const d = join(cacheRoot, version);
    for (const name of await ours(d)) await rmOld(join(d, name), STALE_BUILD_MS);
    await rmdir(d).catch(() => undefined); // only if now empty
  }
  for (const name of await ours(dir)) {
    if (keep.includes(name)) continue;
    await rmOld(join(dir, name), name.startsWith('.build-') ? STALE_BUILD_MS : 24 * STALE_BUILD_MS);
  }
}

/** Host programs packed into the guest with their libraries when installed (socat: the vsock tests' peer). */
const GUEST_BINARIES = ['socat'];

async function buildGuestImage(): Promise<GuestImage> {
  const k = findGuestKernel();
  if (k === undefined) throw new Error('no usable kernel in /boot: apt-get install -y linux-image-amd64');
  const guestDir = join(repoRoot(), 'test', 'guest');
  const buildScript = join(guestDir, 'build-initramfs.sh');
  const busybox = BUSYBOX_PATHS.find((p) => existsSync(p));
  if (busybox === undefined) throw new Error('busybox not found: apt-get install -y busybox-static');
  const cacheRoot = process.env.VHOST_USER_GUEST_CACHE ?? join(tmpdir(), 'vhost-user-guest-cache');
  const dir = join(cacheRoot, k.version);
  // The file names carry what the content depends on, so a stale entry is never used. Files are only ever
  // renamed into place complete, so an interrupted or concurrent build cannot leave a broken entry.
  const initrdKey = hash([
    await readFile(buildScript),
    await readFile(join(guestDir, 'init')),
    statKey(busybox),
    statKey(`/lib/modules/${k.version}/modules.dep`),
    ...GUEST_BINARIES.map((b) => {
      const path = findBinary(b);
      return path === undefined ? `${b}: absent` : statKey(path);
    }),
  ]);
  const initrd = join(dir, `initramfs-${initrdKey}.cpio.gz`);
  const vmlinux = join(dir, `vmlinux-${hash([statKey(k.vmlinuz)])}`);
  const have = (p: string): boolean => existsSync(p);
  if (!have(initrd) || !have(vmlinux)) {
    await mkdir(dir, { recursive: true });
    await pruneCache(cacheRoot, dir, [basename(initrd), basename(vmlinux)]);
    const work = await mkdtemp(join(dir, '.build-'));
    try {
      const args = [buildScript, '-k', k.version, '-o', join(work, 'initramfs.cpio.gz'), '--binaries', GUEST_BINARIES.join(' ')];
      if (!have(vmlinux)) args.push('--vmlinux', join(work, 'vmlinux'));
      await run('bash', args, BUILD_TIMEOUT_MS);
      await rename(join(work, 'initramfs.cpio.gz'), initrd);
      if (have(join(work, 'vmlinux'))) await rename(join(work, 'vmlinux'), vmlinux);
    } finally {
      await rm(work, { recursive: true, force: true });
    }
  }
  return { kernelVersion: k.version, kernel: have(vmlinux) ? vmlinux : k.vmlinuz, initrd };
}

let imagePromise: Promise<GuestImage> | undefined;

/** Builds (or finds in the cache) the guest kernel and initramfs; shared by all guests of this process. */
export function prepareGuestImage(): Promise<GuestImage> {
  imagePromise ??= buildGuestImage().catch((err: unknown) => {
    imagePromise = undefined; // let the next caller try again
    throw err;
  });
  return imagePromise;
}

// ------------------------------------------------------------------------------------------ guests

export interface BlkDeviceOptions {
  /** The backend's vhost-user socket; it must already accept connections. */
  readonly socketPath: string;
  /** The device's num-queues (default 1); must not exceed what the backend offers. */
  readonly numQueues?: number;
  /** reconnect=S on its chardev: QEMU connects again every S seconds when the backend goes away (default none). */
  readonly reconnectSeconds?: number;
  /** QEMU listens on `socketPath` (server=on,wait=off) and the backend connects to it (client mode). */
  readonly server?: boolean;
}

export interface NetDeviceOptions {
  /** The backend's vhost-user-net socket; it must already accept connections (unless `server`). */
  readonly socketPath: string;
  /** The NIC's MAC address (default 52:54:00:12:34:56 for the first NIC, ...:57 for the second, ...). */
  readonly mac?: string;
  /** Queue pairs (default 1); must not exceed what the backend offers. */
  readonly queuePairs?: number;
  /** QEMU listens on `socketPath` (server=on,wait=off) and the backend connects to it (client mode). */
  readonly server?: boolean;
  /** false: the NIC negotiates no checksum or segmentation offload (csum=off, guest_tso4=off, ...). Default true. */
  readonly offloads?: boolean;
}

/** The script run in the guest as /guest/test.sh: its text, or a file (e.g. guestScript('blk-pattern.sh')). */
export type GuestScript = string | { readonly file: string };

/** An extra file for /guest/<name>. */
export type GuestFile =
  | { readonly name: string; readonly content: string | Uint8Array }
  | { readonly file: string; readonly name?: string };

export interface GuestMemoryOptions {
  /** Boot RAM, a QEMU size such as '512M' (the default). Always a shared memfd, as vhost-user needs. */
  readonly size?: string;
  /** With maxmem: hotplug slots (default 4) for QMP object-add memory-backend-memfd + device_add pc-dimm. */
  readonly slots?: number;
  /** Enables memory hotplug up to this size, e.g. '2G'. */
  readonly maxmem?: string;
}

export interface BootGuestOptions {
  /** vhost-user-blk-pci disks, seen by the guest as /dev/vda, /dev/vdb, ... */
  readonly blk?: readonly BlkDeviceOptions[];
  /** vhost-user-rng-pci entropy sources: the backends' sockets (listening already); the guest sees /dev/hwrng. */
  readonly rng?: readonly string[];
  /** vhost-user-vsock-pci socket devices: the backends' sockets (listening already); the guest CID is theirs. */
  readonly vsock?: readonly string[];
  /** virtio-net-pci NICs (vhost-user netdevs, INTx only), seen by the guest as eth0, eth1, ... */
  readonly net?: readonly NetDeviceOptions[];
  /** Without a script, the guest lists its disks as GUEST-RESULT lines and exits 0. */
  readonly script?: GuestScript;
  readonly files?: readonly GuestFile[];
  /** Variables exported to the guest script. */
  readonly env?: Readonly<Record<string, string>>;
  /** Kills QEMU and rejects after this long (default 120 s). The build of the image is not included. */
  readonly timeoutMs?: number;
  readonly memory?: GuestMemoryOptions;
  /** vCPUs (default 1). */
  readonly smp?: number;
  /** packed=on on every disk and NIC (the backend must offer VIRTIO_F_RING_PACKED for it to be negotiated). */
  readonly packed?: boolean;
  /** More kernel arguments. */
  readonly append?: string;
  readonly extraQemuArgs?: readonly string[];
  /** QMP socket path (default <run dir>/qmp.sock; QMP is always enabled). */
  readonly qmpSocket?: string;
  /** Also write the console to this file (it is kept). */
  readonly serialLog?: string;
  /** Kills QEMU when aborted, e.g. the test's t.signal. */
  readonly signal?: AbortSignal;
}

export interface GuestResult {
  /** The guest script's exit status, from its "GUEST-EXIT: <rc>" line. */
  readonly exitCode: number;
  /** The whole console, with \r removed. */
  readonly serial: string;
  /** The text after "GUEST-RESULT: " of each such line. */
  readonly results: readonly string[];
  /** From spawning run-guest.sh (which execs QEMU) until QEMU exited. */
  readonly durationMs: number;
  readonly kernel: string;
}

export type GuestFailure = 'timeout' | 'killed' | 'aborted' | 'no-exit' | 'spawn';

/** A guest that did not reach GUEST-EXIT; serial holds its console so far. */
export class GuestError extends Error {
  readonly reason: GuestFailure;
  readonly serial: string;
  readonly stderr: string;

  constructor(reason: GuestFailure, message: string, serial: string, stderr: string) {
    super(message);
    this.name = 'GuestError';
    this.reason = reason;
    this.serial = serial;
    this.stderr = stderr;
  }
}

export interface RunningGuest {
  /** QEMU's PID. */
  readonly pid: number;
  readonly qmpSocket: string;
  /** Removed when QEMU has exited. */
  readonly runDir: string;
  /** The console so far (\r removed). */
  serial(): string;
  /**
   * Resolves with the first complete console line that contains marker (or matches it), also if it was
   * printed already; rejects after timeoutMs (default: until the guest ends) or when the guest ends first.
   */
  waitForMarker(marker: string | RegExp, timeoutMs?: number): Promise<string>;
  /** Settles when QEMU has exited and the run dir is removed. */
  readonly done: Promise<GuestResult>;
  /** Stops QEMU (SIGTERM, then SIGKILL) and waits until done has settled (it rejects with 'killed'). */
  kill(): Promise<void>;
}

const NAME_RE = /^[A-Za-z0-9][A-Za-z0-9._-]*$/;
const ENV_RE = /^[A-Za-z_][A-Za-z0-9_]*$/;
const MAC_RE = /^([0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2}$/;
const STDERR_LIMIT = 64 * 1024;

function tail(text: string, lines = 30): string {
  return text.split('\n').slice(-lines).join('\n');
}

function shellQuote(value: string): string {
  return `'${value.replaceAll("'", `'\\''`)}'`;
}

function lineMatches(line: string, marker: string | RegExp): boolean {
  if (typeof marker === 'string') return line.includes(marker);
  marker.lastIndex = 0; // a /g or /y regexp keeps state between test() calls
  return marker.test(line);
}

/** Starts QEMU and returns once it runs; see bootGuest for the common case. */
export async function startGuest(opts: BootGuestOptions): Promise<RunningGuest> {
  const image = await prepareGuestImage();
  const runDir = await mkdtemp(join(tmpdir(), 'vhost-user-guest-'));
  const serialStreams: WriteStream[] = [];
  try {
    const args = [join(repoRoot(), 'test', 'guest', 'run-guest.sh'), '--exec', '--run-dir', runDir];
    args.push('--kernel', image.kernel, '--initrd', image.initrd);
    const qmpSocket = opts.qmpSocket ?? join(runDir, 'qmp.sock');
    args.push('--qmp', qmpSocket, '--smp', String(opts.smp ?? 1), '--mem', opts.memory?.size ?? '512M');
    if (opts.memory?.maxmem !== undefined) {
      args.push('--maxmem', opts.memory.maxmem, '--slots', String(opts.memory.slots ?? 4));
    }
    if (opts.script !== undefined) {
      let path: string;
      if (typeof opts.script === 'string') {
        path = join(runDir, 'test.sh');
        await writeFile(path, opts.script);
      } else {
        path = opts.script.file;
      }
      args.push('--script', path);
    }
    const filesDir = join(runDir, 'files');
    await mkdir(filesDir);
    const guestFiles: string[] = [];
    for (const f of opts.files ?? []) {
      const name = f.name ?? basename('file' in f ? f.file : '');
      if (!NAME_RE.test(name) || name === 'test.sh' || name === 'env') throw new Error(`bad guest file name ${name}`);
      if ('content' in f) {
        await writeFile(join(filesDir, name), f.content);
        guestFiles.push(join(filesDir, name));
      } else if (basename(f.file) === name) {
        guestFiles.push(f.file);
      } else {
        await writeFile(join(filesDir, name), await readFile(f.file));
        guestFiles.push(join(filesDir, name));
      }
    }
    const env = Object.entries(opts.env ?? {});
    if (env.length > 0) {
      for (const [k] of env) if (!ENV_RE.test(k)) throw new Error(`bad guest variable name ${k}`);
      await writeFile(join(filesDir, 'env'), env.map(([k, v]) => `${k}=${shellQuote(v)}\n`).join(''));
      guestFiles.push(join(filesDir, 'env'));
    }
    for (const f of guestFiles) args.push('--guest-file', f);
    if (opts.packed === true) args.push('--packed');
    for (const d of opts.blk ?? []) {
      args.push('--blk-queues', String(d.numQueues ?? 1), '--blk-reconnect', String(d.reconnectSeconds ?? 0));
      if (d.server === true) args.push('--blk-server');
      args.push('--vhost-user-blk', d.socketPath);
    }
    for (const n of opts.net ?? []) {
      if (n.socketPath.includes(',')) throw new Error(`a net socket path cannot contain a comma: ${n.socketPath}`);
      if (n.mac !== undefined && !MAC_RE.test(n.mac)) throw new Error(`bad MAC address ${n.mac}`);
      if (n.queuePairs !== undefined && !(Number.isInteger(n.queuePairs) && n.queuePairs >= 1)) {
        throw new Error(`bad queuePairs ${n.queuePairs}`);
      }
      let spec = n.socketPath;
      if (n.mac !== undefined) spec += `,mac=${n.mac}`;
      if (n.queuePairs !== undefined) spec += `,queues=${n.queuePairs}`;
      if (n.server === true) spec += ',server=1';
      if (n.offloads === false) spec += ',offloads=off';
      args.push('--vhost-user-net', spec);
    }
    for (const socketPath of opts.rng ?? []) args.push('--vhost-user-rng', socketPath);
    for (const socketPath of opts.vsock ?? []) args.push('--vhost-user-vsock', socketPath);
    if (opts.append !== undefined) args.push('--append', opts.append);
    args.push('--', ...(opts.extraQemuArgs ?? []));

    const addLog = (path: string): void => {
      // A log that cannot be written must not crash the test process (an unhandled 'error' event would).
      const stream = createWriteStream(path).on('error', (err) => process.emitWarning(`serial log ${path}: ${err}`));
      serialStreams.push(stream);
    };
    if (opts.serialLog !== undefined) addLog(opts.serialLog);
    const logDir = process.env.VHOST_USER_GUEST_LOG_DIR;
    if (logDir !== undefined && logDir !== '') {
      await mkdir(logDir, { recursive: true });
      const stamp = new Date().toISOString().replaceAll(':', '-');
      addLog(join(logDir, `guest-${stamp}-${randomBytes(3).toString('hex')}.log`));
    }

    // run-guest.sh prepares the initrd and then execs QEMU, so this PID is QEMU's.
    const child = spawnOwned('bash', args);
    const pid = child.pid;
    if (pid === undefined) {
      const err = await new Promise<Error>((res) => child.once('error', res));
      throw new GuestError('spawn', `cannot start run-guest.sh: ${err.message}`, '', '');
    }
    return supervise(child, pid, qmpSocket, runDir, image.kernel, serialStreams, opts);
  } catch (err) {
    for (const s of serialStreams) s.end();
    await rm(runDir, { recursive: true, force: true });
    throw err;
  }
}

function supervise(
  child: ChildProcess,
  pid: number,
  qmpSocket: string,
  runDir: string,
  kernel: string,
  serialStreams: readonly WriteStream[],
  opts: BootGuestOptions,
): RunningGuest {
  const started = Date.now();
  let serial = '';
  let stderr = '';
  let failure: { reason: GuestFailure; message: string } | undefined;
  let ended = false;
  type Waiter = { marker: string | RegExp; resolve: (line: string) => void; reject: (err: Error) => void };
  const waiters = new Set<Waiter>();

  const completeLines = (): string[] => {
    const end = serial.lastIndexOf('\n');
    return end < 0 ? [] : serial.slice(0, end).split('\n');
  };
  const checkWaiters = (): void => {
    if (waiters.size === 0) return;
    const lines = completeLines();
    for (const w of waiters) {
      const line = lines.find((l) => lineMatches(l, w.marker));
      if (line !== undefined) {
        waiters.delete(w);
        w.resolve(line);
      }
    }
  };

  child.stdout?.setEncoding('utf8');
  child.stdout?.on('data', (chunk: string) => {
    for (const s of serialStreams) s.write(chunk);
    serial += chunk.replaceAll('\r', '');
    checkWaiters();
  });
  child.stderr?.on('data', (chunk: Buffer) => {
    stderr += chunk.toString('utf8');
    if (stderr.length > STDERR_LIMIT) stderr = stderr.slice(-STDERR_LIMIT);
  });

  const fail = (reason: GuestFailure, message: string): void => {
    if (ended || failure !== undefined || hasExited(child)) return;
    failure = { reason, message };
    void stopProcess(child).catch(() => undefined);
  };
  const timeoutMs = opts.timeoutMs ?? 120_000;
  const timer = setTimeout(() => fail('timeout', `guest timed out after ${timeoutMs} ms`), timeoutMs);
  const onAbort = (): void => fail('aborted', 'guest aborted');
  if (opts.signal?.aborted === true) onAbort();
  opts.signal?.addEventListener('abort', onAbort, { once: true });

  const done = new Promise<GuestResult>((resolveDone, rejectDone) => {
    let spawnError: Error | undefined;
    child.on('error', (err) => (spawnError ??= err));
    child.once('close', (code, sig) => {
      ended = true;
      clearTimeout(timer);
      opts.signal?.removeEventListener('abort', onAbort);
      const durationMs = Date.now() - started;
      checkWaiters();
      const finish = async (): Promise<GuestResult> => {
        await Promise.all(serialStreams.map((s) => new Promise<void>((r) => s.end(r))));
        await rm(runDir, { recursive: true, force: true });
        const context = `\n--- stderr:\n${tail(stderr, 15)}\n--- last console lines:\n${tail(serial)}`;
        if (failure !== undefined) throw new GuestError(failure.reason, failure.message + context, serial, stderr);
        if (spawnError !== undefined) throw new GuestError('spawn', spawnError.message + context, serial, stderr);
        const exits = [...serial.matchAll(/^GUEST-EXIT: (\d+)/gm)];
        const last = exits.at(-1)?.[1];
        if (last === undefined) {
          const how = sig !== null ? `signal ${sig}` : `exit code ${code}`;
          const message = `run-guest.sh/QEMU ended (${how}) without a GUEST-EXIT line${context}`;
          throw new GuestError('no-exit', message, serial, stderr);
        }
        const results = [...serial.matchAll(/^GUEST-RESULT: (.*)$/gm)].map((m) => (m[1] ?? '').trim());
        return { exitCode: Number(last), serial, results, durationMs, kernel };
      };
      finish().then(resolveDone, rejectDone);
      for (const w of waiters) w.reject(new Error(`guest ended before printing ${String(w.marker)}`));
      waiters.clear();
    });
  });
  done.catch(() => undefined); // callers that only use waitForMarker/kill must not get an unhandled rejection

  return {
    pid,
    qmpSocket,
    runDir,
    serial: () => serial,
    waitForMarker(marker: string | RegExp, markerTimeoutMs?: number): Promise<string> {
      const now = completeLines().find((l) => lineMatches(l, marker));
      if (now !== undefined) return Promise.resolve(now);
      if (ended) return Promise.reject(new Error(`guest ended before printing ${String(marker)}`));
      return new Promise<string>((res, rej) => {
        let t: NodeJS.Timeout | undefined;
        const w: Waiter = {
          marker,
          resolve: (line) => {
            clearTimeout(t);
            res(line);
          },
          reject: (err) => {
            clearTimeout(t);
            rej(err);
          },
        };
        if (markerTimeoutMs !== undefined) {
          t = setTimeout(() => {
            waiters.delete(w);
            rej(new Error(`marker ${String(marker)} not seen after ${markerTimeoutMs} ms\n${tail(serial)}`));
          }, markerTimeoutMs);
        }
        waiters.add(w);
      });
    },
    done,
    async kill(): Promise<void> {
      fail('killed', 'guest killed');
      await done.catch(() => undefined);
    },
  };
}

/** Boots a guest, runs its script, and resolves when QEMU has exited; see BootGuestOptions. */
export async function bootGuest(opts: BootGuestOptions): Promise<GuestResult> {
  const guest = await startGuest(opts);
  return guest.done;
}

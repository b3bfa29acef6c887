/**
 * Shared pieces of the fuzz tests that talk to a real backend over a real socket: a server whose pino logs are
 * captured (to find crashed workers and internal errors), a raw client that frames the backend's replies, resource
 * baselines (fds and mappings, as in test/integration/backend-protocol.test.ts), small ring helpers, and the set-up
 * and checks of the guest-error tests (`GuestErrorRig`).
 */
import assert from 'node:assert/strict';
import { mkdtempSync, readdirSync, readlinkSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import pino, { type Logger } from 'pino';
import { VhostUserServer } from '../../src/backend/server.js';
import type { SyncMode } from '../../src/backend/sync-block.js';
import { BlkDevice } from '../../src/devices/blk/blk-device.js';
import { BlkRequestType } from '../../src/devices/blk/constants.js';
import { VhostUserFrontend, type FrontendQueue, type StartOptions } from '../../src/frontend/frontend.js';
import { GuestRam } from '../../src/frontend/guest-ram.js';
import * as native from '../../src/native/index.js';
import { FrontendRequest } from '../../src/protocol/constants.js';
import { vringFilePayload } from '../../src/protocol/payloads.js';
import type { Message } from '../../src/protocol/message-reader.js';
import { collectGarbage, openFdCount } from '../helpers/fds.js';

export type LogLine = Record<string, unknown>;

/** A pino logger (debug level) whose lines are parsed into `lines`. */
export function captureLogger(): { logger: Logger; lines: LogLine[] } {
  const lines: LogLine[] = [];
  const logger = pino({ level: 'debug' }, { write: (line: string) => lines.push(JSON.parse(line) as LogLine) });
  return { logger, lines };
}

/** Log lines that show a bug rather than a refused input: a crashed worker, an internal error, an escaped exception. */
export function bugLines(lines: readonly LogLine[]): LogLine[] {
  return lines.filter((l) => {
    const code = typeof l.code === 'string' ? l.code : (l.err as { code?: unknown } | undefined)?.code;
    return code === 'VHOST_WORKER_CRASHED' || code === 'VHOST_INTERNAL' || code === 'VHOST_WORKER_STUCK';
  });
}

export interface ServerOptions {
  queues?: number;
  workers?: number;
  io?: 'sync' | 'async';
  completionDelayMs?: number;
  memSlots?: number;
  sync?: SyncMode;
  maxQueueSize?: number;
}

export interface TestServer {
  readonly server: VhostUserServer;
  readonly socketPath: string;
  readonly lines: LogLine[];
  close(): Promise<void>;
}

/** A blk backend (null device of 1 MiB) on a socket in a fresh temporary directory. */
export function startServer(options: ServerOptions = {}): TestServer {
  const dir = mkdtempSync(join(tmpdir(), 'vu-fuzz-'));
  const socketPath = join(dir, 'sock');
  const { logger, lines } = captureLogger();
  const device = new BlkDevice({
    backend: { kind: 'null', size: 1024 * 1024 },
    queues: options.queues ?? 2,
    ...(options.maxQueueSize !== undefined ? { maxQueueSize: options.maxQueueSize } : {}),
    ...(options.io !== undefined ? { io: options.io } : {}),
    ...(options.completionDelayMs !== undefined ? { completionDelayMs: options.completionDelayMs } : {}),
  });
  const server = new VhostUserServer({
    socketPath,
    device,
    logger,
    ...(options.workers !== undefined ? { workers: options.workers } : {}),
    ...(options.memSlots !== undefined ? { memSlots: options.memSlots } : {}),
    ...(options.sync !== undefined ? { sync: options.sync } : {}),
  });
  server.listen();
  return {
    server,
    socketPath,
    lines,
    close: async () => {
      await server.close();
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

/**
 * A hostile frontend's end of the socket: sends raw bytes with any fds, frames what comes back. Fds passed to `send`
 * stay the caller's (the kernel duplicates them when they go out). Unlike `FdSocket`, a failed send (the backend
 * already hung up) does not close the socket: the replies the backend sent before hanging up are still read.
 */
export class RawClient {
  readonly replies: Message[] = [];
  readonly #fd: number;
  readonly #watchId: number;
  readonly #buffer = new Uint8Array(64 * 1024);
  readonly #outbox: { bytes: Uint8Array; fds: readonly number[] }[] = [];
  /** Bytes of an incomplete reply. Replies are framed here (header, `size` bytes), not with src/'s fd rules. */
  #pending = new Uint8Array(0);
  #closed = false;
  #released = false;
  #error: unknown;
  #wake: (() => void) | undefined;

  constructor(socketPath: string) {
    this.#fd = native.connectUnix(socketPath);
    this.#watchId = native.watch(this.#fd, native.WATCH_READABLE, (events) => this.#onEvents(events));
  }

  /** The backend closed the connection. */
  get closed(): boolean {
    return this.#closed;
  }

  /** A reply stream the client could not frame (a backend bug). */
  get error(): unknown {
    return this.#error;
  }

  send(bytes: Uint8Array, fds: readonly number[] = []): void {
    if (this.#closed) return;
    this.#outbox.push({ bytes, fds });
    if (this.#outbox.length === 1) this.#flush();
  }

  #flush(): void {
    while (this.#outbox.length > 0 && !this.#closed) {
      const next = this.#outbox[0] as { bytes: Uint8Array; fds: readonly number[] };
      let n: number;
      try {
        n = native.sendmsg(this.#fd, next.bytes, next.fds);
      } catch {
        this.#outbox.length = 0; // EPIPE: the backend is gone; what it sent before is still to be read
        break;
      }
      if (n === next.bytes.length) {
        this.#outbox.shift();
        continue;
      }
      if (n > 0) this.#outbox[0] = { bytes: next.bytes.subarray(n), fds: [] };
      native.rewatch(this.#watchId, native.WATCH_READABLE | native.WATCH_WRITABLE);
      return;
    }
    if (!this.#released) native.rewatch(this.#watchId, native.WATCH_READABLE);
  }

  #onEvents(events: number): void {
    if (this.#released) return;
    // A negative status is libuv reporting POLLERR (the backend closed with our later messages unread: ECONNRESET):
    // what it sent before is still in the socket, so read until the error like a plain recvmsg loop would.
    if (events >= 0 && events & native.WATCH_WRITABLE) this.#flush();
    if (events >= 0 && !(events & native.WATCH_READABLE)) return;
    for (;;) {
      const fds: number[] = [];
      let n: number;
      try {
        n = native.recvmsg(this.#fd, this.#buffer, fds);
      } catch {
        n = 0;
      }
      if (n < 0) {
        if (events < 0) this.#markClosed(); // libuv stopped watching: nothing more will come
        break;
      }
      if (n === 0) {
        for (const fd of fds) native.close(fd);
        this.#markClosed();
        break;
      }
      for (const fd of fds) native.close(fd); // no reply of this backend carries fds
      if (fds.length > 0) this.#error ??= new Error(`${fds.length} fd(s) arrived with a reply`);
      this.#frame(this.#buffer.subarray(0, n));
    }
    this.#wake?.();
  }

  #frame(bytes: Uint8Array): void {
    const all = new Uint8Array(this.#pending.length + bytes.length);
    all.set(this.#pending);
    all.set(bytes, this.#pending.length);
    let at = 0;
    while (all.length - at >= 12) {
      const v = new DataView(all.buffer, at, 12);
      const request = v.getUint32(0, true);
      const flags = v.getUint32(4, true);
      const size = v.getUint32(8, true);
      if ((flags & 0x7) !== 0x5 || size > 4096) {
        this.#error ??= new Error(`bad reply header: request ${request}, flags 0x${flags.toString(16)}, size ${size}`);
        this.#pending = new Uint8Array(0);
        return;
      }
      if (all.length - at - 12 < size) break;
      this.replies.push({ request, flags, payload: all.slice(at + 12, at + 12 + size), fds: [] });
      at += 12 + size;
    }
    this.#pending = all.slice(at);
  }

  #markClosed(): void {
    if (this.#closed) return;
    this.#closed = true;
    this.#outbox.length = 0;
    native.rewatch(this.#watchId, 0);
    this.#wake?.();
  }

  /** Resolves when `done()` holds, the backend closed, or `timeoutMs` passed; returns whether `done()` held. */
  async until(done: () => boolean, timeoutMs: number): Promise<boolean> {
    const deadline = Date.now() + timeoutMs;
    while (!done()) {
      if (this.#closed || Date.now() >= deadline) return done();
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, Math.max(1, Math.min(50, deadline - Date.now())));
        this.#wake = () => {
          clearTimeout(timer);
          resolve();
        };
      });
      this.#wake = undefined;
    }
    return true;
  }

  /** Hangs up and releases the socket. Idempotent. */
  close(): void {
    if (this.#released) return;
    this.#released = true;
    this.#closed = true;
    native.unwatch(this.#watchId);
    native.close(this.#fd);
  }
}

/** Encodes a request: header (request, flags, size) and payload; `size` may lie about the payload's length. */
export function encodeRaw(request: number, flags: number, payload: Uint8Array, size = payload.length): Uint8Array {
  const out = new Uint8Array(12 + payload.length);
  const v = new DataView(out.buffer);
  v.setUint32(0, request >>> 0, true);
  v.setUint32(4, flags >>> 0, true);
  v.setUint32(8, size >>> 0, true);
  out.set(payload, 12);
  return out;
}

// ---- resources ----------------------------------------------------------------------------------------------------

export interface Baseline {
  fds: number;
  mappings: number;
  /** What each fd was at the time (readlink of /proc/self/fd/N), to name what leaked. */
  names?: ReadonlySet<string>;
}

export function snapshot(): Baseline {
  return { fds: openFdCount(), mappings: native.mappingCount() };
}

function fdNames(): Set<string> {
  const names = new Set<string>();
  for (const fd of readdirSync('/proc/self/fd')) {
    try {
      names.add(`${fd} -> ${readlinkSync(`/proc/self/fd/${fd}`)}`);
    } catch {
      // closed meanwhile (the directory's own fd)
    }
  }
  return names;
}

/** The process's fds and mappings once earlier garbage (SharedArrayBuffers of earlier sessions) is collected. */
export async function settledBaseline(): Promise<Baseline> {
  let prev = snapshot();
  for (let i = 0; i < 20; i++) {
    collectGarbage();
    await sleep(10);
    const now = snapshot();
    if (now.fds === prev.fds && now.mappings === prev.mappings) return { ...now, names: fdNames() };
    prev = now;
  }
  return { ...prev, names: fdNames() };
}

/**
 * Waits (gc between tries, up to `ms`) until fds and mappings are back to `baseline`; returns what is left over.
 * Generous: a mapping is released only once every thread that held it (queue workers, I/O threads) has exited and
 * collected it, which takes seconds on a loaded 2-core machine.
 */
export async function leftOver(baseline: Baseline, ms = 10_000): Promise<(Baseline & { extra: string[] }) | undefined> {
  const deadline = Date.now() + ms;
  let now = snapshot();
  while (now.fds !== baseline.fds || now.mappings !== baseline.mappings) {
    if (Date.now() > deadline) {
      const extra = baseline.names === undefined ? [] : [...fdNames()].filter((n) => !baseline.names?.has(n));
      return { fds: now.fds - baseline.fds, mappings: now.mappings - baseline.mappings, extra };
    }
    collectGarbage();
    await sleep(10);
    now = snapshot();
  }
  return undefined;
}

// ---- rings --------------------------------------------------------------------------------------------------------

/** A blk request's guest memory: 16-byte header, then a status byte, in `ram`. */
export interface BlkSlot {
  readonly header: number;
  readonly status: number;
}

export function blkSlot(ram: GuestRam, type: number = BlkRequestType.FLUSH): BlkSlot {
  const header = ram.alloc(32, { align: 16 });
  const h = ram.bytes(header, 16);
  new DataView(h.buffer, h.byteOffset, 16).setUint32(0, type, true);
  return { header, status: header + 16 };
}

/** Adds a FLUSH (or the slot's type) request to a queue and publishes it; returns the head, -1 if the ring is full. */
export function submit(ram: GuestRam, q: FrontendQueue, slot: BlkSlot, token: number): number {
  ram.bytes(slot.status, 1)[0] = 0xff;
  const head = q.driver.addChain(
    [
      { addr: slot.header, len: 16, writable: false },
      { addr: slot.status, len: 1, writable: true },
    ],
    token,
  );
  if (head >= 0) {
    q.driver.publish();
    q.kick();
  }
  return head;
}

/** Waits (polling the used ring) until `q` has `n` completions to collect; returns them (token, len, ms). */
export async function collect(q: FrontendQueue, n: number, timeoutMs: number): Promise<number[]> {
  const tokens: number[] = [];
  const deadline = Date.now() + timeoutMs;
  while (tokens.length < n && Date.now() < deadline) {
    q.driver.pollUsed((token) => tokens.push(token));
    if (tokens.length < n) await sleep(1);
  }
  return tokens;
}

/** Polls `cond` (every 2 ms) until it holds or `ms` have passed; returns whether it held. */
export async function until(cond: () => boolean | Promise<boolean>, ms: number): Promise<boolean> {
  const deadline = Date.now() + ms;
  for (;;) {
    if (await cond()) return true;
    if (Date.now() > deadline) return false;
    await sleep(2);
  }
}

// ---- guest errors -------------------------------------------------------------------------------------------------

/** The log line of a queue stopped by an error (session.ts). */
const QUEUE_STOPPED = 'queue stopped by an error: device needs reset';

/**
 * What the guest-error tests (guest-errors.test.ts, packed-guest-errors.test.ts) run against: backend A (blk, 2
 * queues on one worker, an err eventfd per queue) whose queue 0 gets the malformed chains, and backend B (blk, 1
 * queue), each with its frontend and guest RAM. `close` releases all of it.
 */
export class GuestErrorRig {
  /**
   * Starts both backends and connects to them. `reserve`: bytes at the start of A's RAM kept out of the allocator
   * (the test's scratch area) at every `startA`.
   */
  static async open(options: { ramSize: number; reserve: number; serverA?: ServerOptions }): Promise<GuestErrorRig> {
    const a = startServer({ queues: 2, ...options.serverA, workers: 1 });
    const b = startServer({ queues: 1 });
    const ramA = GuestRam.create(options.ramSize);
    const ramB = GuestRam.create(options.ramSize);
    const errFds = [native.eventfdCreate(0, true), native.eventfdCreate(0, true)];
    let fa: VhostUserFrontend | undefined;
    try {
      fa = await VhostUserFrontend.connect(a.socketPath);
      const fb = await VhostUserFrontend.connect(b.socketPath);
      return new GuestErrorRig(a, b, ramA, ramB, fa, fb, errFds, options.reserve);
    } catch (err) {
      fa?.close();
      ramA.close();
      ramB.close();
      for (const fd of errFds) native.close(fd);
      await a.close();
      await b.close();
      throw err;
    }
  }

  readonly a: TestServer;
  readonly b: TestServer;
  readonly ramA: GuestRam;
  readonly ramB: GuestRam;
  readonly fa: VhostUserFrontend;
  readonly fb: VhostUserFrontend;
  /** A's err eventfds, by queue index. */
  readonly errFds: readonly number[];
  readonly #reserve: number;
  #slotB: BlkSlot | undefined;
  #token = 0;

  private constructor(
    a: TestServer,
    b: TestServer,
    ramA: GuestRam,
    ramB: GuestRam,
    fa: VhostUserFrontend,
    fb: VhostUserFrontend,
    errFds: readonly number[],
    reserve: number,
  ) {
    this.a = a;
    this.b = b;
    this.ramA = ramA;
    this.ramB = ramB;
    this.fa = fa;
    this.fb = fb;
    this.errFds = errFds;
    this.#reserve = reserve;
  }

  /** Starts device A on fresh rings (the allocator starts over past the reserved area) with its err eventfds. */
  async startA(options: Omit<StartOptions, 'memory'>): Promise<void> {
    this.ramA.resetAllocator();
    this.ramA.alloc(this.#reserve);
    await this.fa.start({ ...options, memory: this.ramA });
    for (const q of options.queues) {
      const fd = this.errFds[q.index];
      if (fd === undefined) continue;
      await this.fa.requestWithAck(FrontendRequest.SET_VRING_ERR, vringFilePayload.encode({ index: q.index, noFd: false }), [fd]);
    }
  }

  /** Starts device B (its queue 0 gets a well-formed request at every `expectStopped`). */
  async startB(options: Omit<StartOptions, 'memory'>): Promise<void> {
    await this.fb.start({ ...options, memory: this.ramB });
    this.#slotB = blkSlot(this.ramB);
  }

  /** Before planting a malformed chain: drains the err eventfds; returns where A's log stands. */
  beginCase(): number {
    for (const fd of this.errFds) native.eventfdRead(fd);
    return this.a.lines.length;
  }

  /**
   * After a malformed chain on A's queue 0 (kicked): NEEDS_RESET is set, queue 0's err eventfd fired and the log
   * (from `logStart`) names a code matching `expected`; queue 1 of A (same worker) and queue 0 of B still complete
   * a request, queue 1's err eventfd stays quiet, B has no NEEDS_RESET, and A logged no bug. Returns the log line.
   */
  async expectStopped(label: string, logStart: number, expected: RegExp): Promise<LogLine> {
    const { a, fa, fb, ramA, ramB, errFds } = this;
    assert.ok(await until(async () => ((await fa.getStatus()) & 0x40) !== 0, 5000), `${label}: NEEDS_RESET was not set`);
    assert.ok(native.eventfdRead(errFds[0] as number) > 0, `${label}: queue 0's err eventfd did not fire`);
    const failure = a.lines.slice(logStart).find((l: LogLine) => l.msg === QUEUE_STOPPED);
    assert.ok(failure !== undefined, `${label}: the failure is logged`);
    assert.equal(failure.queue, 0);
    assert.match(String(failure.code), expected, `${label}: logged ${String(failure.code)}: ${String(failure.message)}`);
    // Queue 1 on the same worker and the other device keep working.
    const slot = blkSlot(ramA);
    assert.ok(submit(ramA, fa.queue(1), slot, ++this.#token) >= 0);
    assert.deepEqual(await collect(fa.queue(1), 1, 5000), [this.#token], `${label}: queue 1 stalled`);
    assert.equal(ramA.bytes(slot.status, 1)[0], 0);
    const slotB = this.#slotB;
    assert.ok(slotB !== undefined, 'startB first');
    assert.ok(submit(ramB, fb.queue(0), slotB, ++this.#token) >= 0);
    assert.deepEqual(await collect(fb.queue(0), 1, 5000), [this.#token], `${label}: the other device stalled`);
    assert.equal(ramB.bytes(slotB.status, 1)[0], 0);
    assert.equal(native.eventfdRead(errFds[1] as number), 0, `${label}: queue 1's err eventfd fired`);
    assert.equal((await fb.getStatus()) & 0x40, 0);
    assert.deepEqual(bugLines(a.lines.slice(logStart)), []);
    return failure;
  }

  /** RESET_DEVICE on A: NEEDS_RESET is cleared; A's log is emptied. Start A again with `startA`. */
  async resetA(): Promise<void> {
    await this.fa.resetDevice();
    assert.equal((await this.fa.getStatus()) & 0x40, 0, 'RESET_DEVICE clears NEEDS_RESET');
    this.a.lines.length = 0;
  }

  /** Closes the frontends, the guest RAM, the err eventfds and both backends. */
  async close(): Promise<void> {
    this.fa.close();
    this.fb.close();
    this.ramA.close();
    this.ramB.close();
    for (const fd of this.errFds) native.close(fd);
    await this.a.close();
    await this.b.close();
  }
}

/**
 * The TypeScript frontend as a busy-polling virtio-net driver, for `npm run bench -- net --logging`: what DPDK's
 * testpmd with net_virtio_user is to the other contenders, but with dirty-page logging, which virtio_user cannot do
 * (it never sends SET_LOG_BASE). bench/net.ts runs it as its own process pinned to the CPU testpmd's forwarding lcore
 * would use (taskset); it prints one JSON result line (`NetFrontendResult`) on stdout.
 *
 *   node dist/bench/net-frontend.js --socket SOCK --mode tx|rx --pktlen N --seconds S [--warmup S] [--packed]
 *     [--queue-size N] [--logging] [--log-take-ms MS] [--backend-pid PID]
 *
 * One queue pair (receive queue 0, transmit queue 1), VERSION_1, MRG_RXBUF and EVENT_IDX when offered (testpmd's
 * defaults but in_order), 256 entries. Like testpmd it polls the used rings in a loop and never asks for a used
 * buffer notification; the loop yields to the event loop every few milliseconds (the timers below). Split rings are
 * driven as DPDK's in-order path drives them: descriptor i is set up once for buffer i, and a used buffer goes back
 * by writing its id into the avail ring (`FastSplitRing`: a few ns per frame, so that the backend, not this driver,
 * sets the rate). Packed rings go through the package's generic driver (`QueueDriver`: addChain per frame, several
 * times slower; this frontend may then be what limits the rate).
 * - tx (testpmd txonly): every ring entry holds a frame of `pktlen` bytes behind a zero virtio-net header (one
 *   descriptor); each used one is put back at once. The backend's sink drops them: it writes nothing but used rings.
 * - rx (testpmd rxonly): every entry holds a 2048-byte receive buffer (one descriptor), put back as soon as used;
 *   the backend's source writes a frame into each. This is the direction where logging marks data pages.
 * `--logging` does what QEMU does at a migration's start after the device runs: a log over the guest RAM
 * (SET_LOG_BASE), SET_FEATURES | VHOST_F_LOG_ALL, SET_VRING_ADDR | VHOST_VRING_F_LOG; then every `--log-take-ms` (100)
 * the bitmap is taken and cleared, as a migration's iterations do, so the backend keeps setting cleared bits.
 */
import { parseArgs } from 'node:util';
import { NetFeature } from '../src/devices/net/constants.js';
import { GuestRam } from '../src/frontend/guest-ram.js';
import { MigrationLog } from '../src/frontend/migration-log.js';
import { VhostUserFrontend, type FrontendQueue } from '../src/frontend/frontend.js';
import type { GuestRamRegion } from '../src/frontend/guest-ram.js';
import { VirtioFeature, featureBit } from '../src/protocol/constants.js';
import { processCpuSeconds } from '../test/helpers/dpdk.js';

export interface NetFrontendResult {
  readonly mode: 'tx' | 'rx';
  /** Frames per second over the measured window, in millions. */
  readonly mpps: number;
  readonly frames: number;
  readonly seconds: number;
  /** Per-second rates within the window (Mpps). */
  readonly intervals: number[];
  /** Frame length seen (rx: used length minus the header, of the last frame; tx: what was sent). */
  readonly pktlen: number;
  /** Polls of the used ring that found frames, and kicks sent, in the window: frames per batch, kicks per frame. */
  readonly batches: number;
  readonly kicks: number;
  /** Received frames whose length was not `pktlen` or that spanned several buffers. */
  readonly badFrames: number;
  /** CPU share of this process over the window (1 = one core). */
  readonly cpu: number;
  /** With --backend-pid: the backend's CPU share over the same window (all its threads). */
  readonly backendCpu?: number;
  /** With --logging: takes of the bitmap in the window and the dirty pages they returned. */
  readonly dirtyLog?: { readonly takes: number; readonly pages: number };
}

const HEADER = 12; // virtio_net_hdr_mrg_rxbuf (VERSION_1)
/**
 * Buffers as DPDK's virtio PMD lays them out in its mbufs (2176 bytes: 128 of headroom, 2048 of data): the frame
 * starts at the 128-byte boundary and the header is just before it, so a receive descriptor is 2060 bytes from
 * offset 116. Where the frame lands matters: V8 copies into guest memory word by word only when source and
 * destination agree modulo 8 (see SourcePort), and the source's frames are 8-aligned.
 */
const MBUF = 2176;
const HEADROOM = 128;
const RX_BUFFER = MBUF - HEADROOM + HEADER;
/** The polling loop yields to the event loop this often (ms). */
const SLICE_MS = 2;

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

async function main(): Promise<void> {
  const { values } = parseArgs({
    options: {
      socket: { type: 'string' },
      mode: { type: 'string', default: 'rx' },
      pktlen: { type: 'string', default: '64' },
      seconds: { type: 'string', default: '10' },
      warmup: { type: 'string', default: '1' },
      packed: { type: 'boolean', default: false },
      'queue-size': { type: 'string', default: '256' },
      logging: { type: 'boolean', default: false },
      'log-take-ms': { type: 'string', default: '100' },
      'backend-pid': { type: 'string' },
    },
  });
  const socket = values.socket;
  if (socket === undefined) throw new Error('--socket is required');
  const mode = values.mode;
  if (mode !== 'tx' && mode !== 'rx') throw new Error(`--mode tx or rx: ${mode}`);
  const pktlen = Number(values.pktlen);
  const size = Number(values['queue-size']);
  const seconds = Number(values.seconds);
  const warmup = Number(values.warmup);
  const backendPid = values['backend-pid'] === undefined ? undefined : Number(values['backend-pid']);
  if (!(pktlen >= 60 && pktlen + HEADER <= RX_BUFFER)) throw new Error(`--pktlen 60..${RX_BUFFER - HEADER}: ${pktlen}`);

  const memory = GuestRam.create(8 * 1024 * 1024);
  const fe = await VhostUserFrontend.connect(socket, { connectTimeoutMs: 10_000 });
  let log: MigrationLog | undefined;
  try {
    const offered = fe.backendFeatures;
    let features =
      (featureBit(VirtioFeature.VERSION_1) | featureBit(NetFeature.MRG_RXBUF) | featureBit(VirtioFeature.RING_EVENT_IDX)) & offered;
    if (values.packed) features |= featureBit(VirtioFeature.RING_PACKED);
    await fe.start({ features, memory, queues: [{ index: 0, size }, { index: 1, size }], queueNumUnit: 2 });
    const rx = fe.queue(0);
    const tx = fe.queue(1);
    if (values.logging) {
      log = MigrationLog.create(Math.max(...memory.regions.map((r) => r.gpa + r.size)));
      await fe.setLogBase(log);
      await fe.setLogging(true);
      log.takeDirty();
    }
    const eventIdx = fe.hasFeature(VirtioFeature.RING_EVENT_IDX);
    const result = await run(mode === 'rx' ? rx : tx, mode, memory, { pktlen, seconds, warmup, log, logTakeMs: Number(values['log-take-ms']), backendPid, eventIdx });
    process.stdout.write(`${JSON.stringify(result)}\n`);
  } finally {
    fe.close();
    log?.close();
    memory.close();
  }
}

/** One buffer per ring entry: where it is (GPA), its length, whether the device writes it. */
interface Buffer1 {
  readonly addr: number;
  readonly len: number;
  readonly writable: boolean;
}

/** What the polling loop needs of a ring: hand every buffer over, then take used ones back and re-post them. */
interface Ring {
  /** Posts every buffer (ids 0..n-1) and kicks. */
  start(): void;
  /** Takes what the device used (`onUsed(id, len)` each), re-posts those buffers; returns how many. */
  poll(onUsed: (id: number, len: number) => void): number;
  /** Kicks sent so far. */
  readonly kicks: number;
}

const VRING_DESC_F_WRITE = 2;
const VRING_USED_F_NO_NOTIFY = 1;

/**
 * A split ring driven in place, as DPDK's in-order virtio path does: descriptor i is written once for buffer i
 * (nothing chained), and a used buffer is re-posted by writing its id into the next avail slot; avail.idx is stored
 * once per poll, and the device is kicked only when it asked (EVENT_IDX avail_event, or no NO_NOTIFY). used_event is
 * never moved, so the device signals nothing (the driver polls). Works on the ring `VhostUserFrontend.start` set up
 * (zeroed, nothing posted); its own driver object is left unused.
 */
class FastSplitRing implements Ring {
  readonly #q: FrontendQueue;
  readonly #size: number;
  readonly #mask: number;
  readonly #buffers: readonly Buffer1[];
  readonly #region: GuestRamRegion;
  readonly #eventIdx: boolean;
  #avail!: Uint16Array;
  #usedIdx!: Uint16Array; // flags, idx
  #used!: Uint32Array; // (id, len) per entry
  #availEvent!: Uint16Array;
  #availIdx = 0;
  #lastUsed = 0;
  kicks = 0;

  constructor(q: FrontendQueue, region: GuestRamRegion, buffers: readonly Buffer1[], eventIdx: boolean) {
    if (q.driver.packed) throw new Error('FastSplitRing drives split rings');
    if (buffers.length !== q.size) throw new Error(`${buffers.length} buffers for a ring of ${q.size}`);
    this.#q = q;
    this.#size = q.size;
    this.#mask = q.size - 1;
    this.#buffers = buffers;
    this.#region = region;
    this.#eventIdx = eventIdx;
  }

  start(): void {
    const { descAddr, availAddr, usedAddr } = this.#q.layout;
    const buf = this.#region.buffer;
    const off = (gpa: number): number => gpa - this.#region.gpa;
    const size = this.#size;
    const desc = new DataView(buf, off(descAddr), 16 * size);
    for (const [i, b] of this.#buffers.entries()) {
      desc.setBigUint64(16 * i, BigInt(b.addr), true);
      desc.setUint32(16 * i + 8, b.len, true);
      desc.setUint16(16 * i + 12, b.writable ? VRING_DESC_F_WRITE : 0, true);
      desc.setUint16(16 * i + 14, 0, true);
    }
    this.#avail = new Uint16Array(buf, off(availAddr), 2 + size + 1); // flags, idx, ring[size], used_event
    this.#usedIdx = new Uint16Array(buf, off(usedAddr), 2);
    this.#used = new Uint32Array(buf, off(usedAddr) + 4, 2 * size);
    this.#availEvent = new Uint16Array(buf, off(usedAddr) + 4 + 8 * size, 1);
    for (let i = 0; i < size; i++) this.#avail[2 + i] = i;
    this.#publish(0, size);
  }

  poll(onUsed: (id: number, len: number) => void): number {
    const usedIdx = Atomics.load(this.#usedIdx, 1);
    const n = (usedIdx - this.#lastUsed) & 0xffff;
    if (n === 0) return 0;
    if (n > this.#size) throw new Error(`used.idx ${usedIdx} is ${n} ahead of ${this.#lastUsed} in a ring of ${this.#size}`);
    const old = this.#availIdx;
    const mask = this.#mask;
    const used = this.#used;
    const avail = this.#avail;
    let at = this.#lastUsed;
    let next = old;
    for (let k = 0; k < n; k++) {
      const e = 2 * (at & mask);
      const id = used[e] as number;
      if (id >= this.#size) throw new Error(`used id ${id} out of range`);
      onUsed(id, used[e + 1] as number);
      avail[2 + (next & mask)] = id;
      next = (next + 1) & 0xffff;
      at = (at + 1) & 0xffff;
    }
    this.#lastUsed = at;
    this.#publish(old, n);
    return n;
  }

  /** Stores avail.idx (`n` entries after `old`), then kicks if the device asked for it. */
  #publish(old: number, n: number): void {
    const next = (old + n) & 0xffff;
    this.#availIdx = next;
    Atomics.store(this.#avail, 1, next); // SC store, then SC loads below: the driver's half of the notification race
    let kick: boolean;
    if (this.#eventIdx) {
      const event = Atomics.load(this.#availEvent, 0);
      kick = ((next - event - 1) & 0xffff) < ((next - old) & 0xffff); // vring_need_event
    } else {
      kick = (Atomics.load(this.#usedIdx, 0) & VRING_USED_F_NO_NOTIFY) === 0;
    }
    if (kick) {
      this.kicks++;
      this.#q.kick();
    }
  }
}

/** Any ring through the package's generic driver (`QueueDriver.addChain` / `pollUsed`): packed rings here. */
class DriverRing implements Ring {
  readonly #q: FrontendQueue;
  readonly #segments: { addr: number; len: number; writable: boolean }[][];
  #onUsed: (id: number, len: number) => void = () => undefined;
  readonly #cb = (token: number, len: number): void => {
    this.#onUsed(token, len);
    this.#q.driver.addChain(this.#segments[token] as { addr: number; len: number; writable: boolean }[], token);
  };
  kicks = 0;

  constructor(q: FrontendQueue, buffers: readonly Buffer1[]) {
    this.#q = q;
    this.#segments = buffers.map((b) => [{ ...b }]);
  }

  start(): void {
    this.#q.driver.disableInterrupts(); // polled (packed: the driver area's flags say so)
    for (const [i, seg] of this.#segments.entries()) if (this.#q.driver.addChain(seg, i) < 0) throw new Error(`ring full at ${i}`);
    if (this.#q.publishAndKick()) this.kicks++;
  }

  poll(onUsed: (id: number, len: number) => void): number {
    this.#onUsed = onUsed;
    const n = this.#q.driver.pollUsed(this.#cb);
    if (n > 0 && this.#q.publishAndKick()) this.kicks++;
    return n;
  }
}

async function run(
  q: FrontendQueue,
  mode: 'tx' | 'rx',
  memory: GuestRam,
  o: { pktlen: number; seconds: number; warmup: number; log: MigrationLog | undefined; logTakeMs: number; backendPid: number | undefined; eventIdx: boolean },
): Promise<NetFrontendResult> {
  const entries = q.size;
  // One single-descriptor buffer per ring entry (an "mbuf"; the descriptor starts at the header).
  const base = memory.alloc(entries * MBUF, { align: 4096 });
  const at = (i: number): number => base + i * MBUF + HEADROOM - HEADER;
  const descs: Buffer1[] = Array.from({ length: entries }, (_, i) =>
    mode === 'rx' ? { addr: at(i), len: RX_BUFFER, writable: true } : { addr: at(i), len: HEADER + o.pktlen, writable: false },
  );
  const buffers = Array.from({ length: entries }, (_, i) => memory.bytes(at(i), RX_BUFFER));
  if (mode === 'tx') {
    for (const b of buffers) {
      b.fill(0, 0, HEADER); // no offloads
      const f = b.subarray(HEADER, HEADER + o.pktlen);
      f.fill(0xff, 0, 6); // broadcast
      f.set([0x02, 0, 0, 0, 0, 1], 6);
      f[12] = 0x88; // EtherType 0x88b5 (local experimental)
      f[13] = 0xb5;
      for (let i = 14; i < f.length; i++) f[i] = i & 0xff;
    }
  }
  const region = memory.regions[0];
  if (region === undefined || memory.regions.length !== 1) throw new Error('one RAM region expected');
  const ring: Ring = q.driver.packed ? new DriverRing(q, descs) : new FastSplitRing(q, region, descs, o.eventIdx);
  ring.start();

  let frames = 0;
  let badFrames = 0;
  let lastLen = mode === 'tx' ? o.pktlen : 0;
  const want = o.pktlen + HEADER;
  const onUsed =
    mode === 'rx'
      ? (id: number, len: number): void => {
          frames++;
          if (len !== want) badFrames++;
          else {
            // num_buffers (bytes 10-11 of the header) must be 1: the frame is in this one buffer.
            const b = buffers[id] as Uint8Array;
            if (b[10] !== 1 || b[11] !== 0) badFrames++;
          }
          lastLen = len - HEADER;
        }
      : (): void => {
          frames++;
        };

  let stopped = false;
  /** Why the polling loop stopped (an object: set from the loop, read after awaits). */
  const stop: { failure: Error | undefined } = { failure: undefined };
  const check = (): void => {
    if (stop.failure !== undefined) throw stop.failure;
  };
  let batches = 0;
  const spin = (): void => {
    try {
      const until = performance.now() + SLICE_MS;
      for (let k = 1; ; k++) {
        if (ring.poll(onUsed) > 0) batches++;
        if ((k & 127) === 0 && performance.now() >= until) break;
      }
    } catch (err) {
      stop.failure = err instanceof Error ? err : new Error(String(err));
      stopped = true;
    }
    if (!stopped) setImmediate(spin);
  };
  setImmediate(spin);

  // The migration's iterations: take and clear the bitmap (counted once the window is open).
  let measuring = false;
  let takes = 0;
  let pages = 0;
  const log = o.log;
  const stopTaking = log?.takeEvery(o.logTakeMs, (taken) => {
    if (!measuring) return;
    takes++;
    pages += taken.length;
  });
  try {
    await sleep(o.warmup * 1000);
    check();
    const cpu0 = process.cpuUsage();
    const be0 = o.backendPid === undefined ? undefined : processCpuSeconds(o.backendPid);
    const f0 = frames;
    const b0 = batches;
    const k0 = ring.kicks;
    const t0 = performance.now();
    measuring = true;
    const intervals: number[] = [];
    let lastFrames = f0;
    let lastT = t0;
    const end = t0 + o.seconds * 1000;
    while (performance.now() < end - 1) {
      await sleep(Math.min(1000, end - performance.now()));
      const now = performance.now();
      if (now - lastT >= 500) intervals.push((frames - lastFrames) / ((now - lastT) * 1000));
      lastFrames = frames;
      lastT = now;
      check();
    }
    measuring = false;
    const elapsed = (performance.now() - t0) / 1000;
    const n = frames - f0;
    const cpu = process.cpuUsage(cpu0);
    const be1 = o.backendPid === undefined ? undefined : processCpuSeconds(o.backendPid);
    return {
      mode,
      mpps: n / elapsed / 1e6,
      frames: n,
      seconds: elapsed,
      intervals,
      batches: batches - b0,
      kicks: ring.kicks - k0,
      pktlen: lastLen,
      badFrames,
      cpu: (cpu.user + cpu.system) / 1e6 / elapsed,
      ...(be0 !== undefined && be1 !== undefined ? { backendCpu: (be1 - be0) / elapsed } : {}),
      ...(log !== undefined ? { dirtyLog: { takes, pages } } : {}),
    };
  } finally {
    stopped = true;
    stopTaking?.();
  }
}

main().then(
  () => process.exit(0),
  (err: unknown) => {
    process.stderr.write(`net-frontend: ${err instanceof Error ? (err.stack ?? err.message) : String(err)}\n`);
    process.exit(1);
  },
);

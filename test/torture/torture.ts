/**
 * A torture run of live memory-map changes on the real code, in the spirit of rcutorture: our backend (in this
 * process, with its worker threads) serves a TypeScript frontend that keeps the queues busy with writes and
 * verified reads whose data buffers live in hot-pluggable regions, while a second task adds, removes and replaces
 * regions and moves rings, as fast as the backend acknowledges. What catches a stale or wrong access:
 * - every read is checked against a mirror of the disk (its buffer is pre-filled with a canary the device must
 *   overwrite), every status byte and used length is checked;
 * - every request completes exactly once (a token state machine), none is lost (drained at the end);
 * - a removed region's memfd is filled with a canary right after the backend acknowledged the removal and checked
 *   later: a write through a stale mapping would change it;
 * - the session must not have marked the device broken; fds and mappings return to the baseline (checked by the
 *   test that calls this).
 */
import { mkdtempSync, readFileSync, rmSync, truncateSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { VhostUserServer } from '../../src/backend/server.js';
import type { SyncMode } from '../../src/backend/sync-block.js';
import { BlkDevice } from '../../src/devices/blk/blk-device.js';
import { BlkRequestType } from '../../src/devices/blk/constants.js';
import { BlkDriver } from '../../src/frontend/blk-driver.js';
import { VhostUserFrontend, type FrontendQueue } from '../../src/frontend/frontend.js';
import { GuestRam, type GuestRamRegion } from '../../src/frontend/guest-ram.js';
import * as native from '../../src/native/index.js';

export interface TortureOptions {
  seconds: number;
  sync: SyncMode;
  io: 'sync' | 'async';
  /** Memory changes by ADD/REM_MEM_REG ('regions') or whole SET_MEM_TABLEs ('table', at most 8 regions). */
  memory: 'regions' | 'table';
  /** Packed rings (VIRTIO_F_RING_PACKED) of PACKED_RING_SIZE entries instead of split rings of RING_SIZE. */
  packed?: boolean;
  queues?: number;
  workers?: number;
  seed?: number;
}

export interface TortureReport {
  requests: number;
  reads: number;
  writes: number;
  changes: { add: number; remove: number; replace: number; ringMove: number };
  /** Latency of each memory-change message (send -> acknowledgement), ms. */
  changeLatencyMs: number[];
  errors: string[];
}

const KiB = 1024;
const MiB = 1024 * KiB;
const DISK = 8 * MiB;
const HOT_SLOTS = 4;
const HOT_BASE = 0x1_0000_0000;
const HOT_STRIDE = 16 * MiB;
const HOT_SIZE = 1 * MiB;
const BUF = 64 * KiB; // data buffer granule in a region
const DEPTH = 24; // requests in flight per queue
const RING_SIZE = 128;
/** Not a power of two: packed rings take any size, and their positions then wrap at odd multiples. */
const PACKED_RING_SIZE = 100;

/** A small deterministic PRNG (mulberry32): runs are reproducible from their seed. */
function prng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

interface Hot {
  slot: number;
  region: GuestRamRegion;
  state: 'active' | 'draining';
  inflight: number;
  freeBuffers: number[]; // offsets in the region
}

interface Request {
  token: number;
  queue: number;
  op: 'read' | 'write';
  pos: number;
  len: number;
  hot: Hot | undefined; // undefined: the buffer is in the base region
  bufGpa: number;
  data: Uint8Array | undefined; // what a write wrote
  done: boolean;
}

export async function runTorture(opts: TortureOptions): Promise<TortureReport> {
  const rand = prng(opts.seed ?? 1);
  const queues = opts.queues ?? 2;
  const report: TortureReport = {
    requests: 0,
    reads: 0,
    writes: 0,
    changes: { add: 0, remove: 0, replace: 0, ringMove: 0 },
    changeLatencyMs: [],
    errors: [],
  };
  const fail = (msg: string): void => {
    if (report.errors.length < 20) report.errors.push(msg);
  };

  const dir = mkdtempSync(join(tmpdir(), 'vhost-user-torture-'));
  const image = join(dir, 'disk.img');
  writeFileSync(image, '');
  truncateSync(image, DISK);
  const mirror = new Uint8Array(DISK);
  const server = new VhostUserServer({
    socketPath: join(dir, 'sock'),
    device: new BlkDevice({
      backend: { kind: 'file', path: image },
      queues,
      io: opts.io,
      completionDelayMs: opts.io === 'async' ? 1 : 0,
    }),
    sync: opts.sync,
    workers: opts.workers ?? 2,
    memSlots: opts.memory === 'table' ? 0 : 509,
  });
  server.listen();
  const memory = GuestRam.create(8 * MiB);
  let frontend: VhostUserFrontend | undefined;
  try {
    frontend = await VhostUserFrontend.connect(server.socketPath);
    const fe = frontend;
    // The blk driver negotiates features and sets the queues up; its own request slots are not used.
    const packed = opts.packed ?? false;
    const queueSize = packed ? PACKED_RING_SIZE : RING_SIZE;
    const setup = await BlkDriver.start(fe, { memory, queues, queueSize, maxRequestBytes: 4096, slotsPerQueue: 1, packed });
    if (fe.queue(0).driver.packed !== packed) fail(`the rings are not ${packed ? 'packed' : 'split'}`);
    setup.close();

    // Per-request header and status bytes in the base region; two ring areas per queue to move between.
    const meta = memory.alloc(queues * DEPTH * 64, { align: 64, region: 0 });
    const ringAreas = Array.from({ length: queues }, () => [0, 1].map(() => memory.alloc(64 * KiB, { align: 4096, region: 0 })));
    const ringArea = Array.from({ length: queues }, () => 0);
    const baseBuffers = Array.from({ length: queues * DEPTH }, () => memory.alloc(BUF, { align: 4096, region: 0 }));

    const hot: (Hot | undefined)[] = Array.from({ length: HOT_SLOTS }, () => undefined);
    /** Removed regions under watch: our own mapping of their memfd (the guest RAM let go of them). */
    const graveyard: { gpa: number; fd: number; bytes: Uint8Array; until: number }[] = [];
    const requests: (Request | undefined)[] = Array.from({ length: queues * DEPTH }, () => undefined);
    const busyRanges = new Set<number>(); // 64 KiB-aligned disk blocks used by requests in flight
    const paused = Array.from({ length: queues }, () => false);
    const qobj: FrontendQueue[] = Array.from({ length: queues }, (_, q) => fe.queue(q));
    const deadline = Date.now() + opts.seconds * 1000;
    let stopping = false;
    let wake: () => void = () => undefined;

    const inflightOf = (q: number): number => requests.filter((r) => r !== undefined && r.queue === q).length;

    const complete = (q: number): void => {
      const driver = (qobj[q] as FrontendQueue).driver;
      do driver.pollUsed((token, len) => onUsed(q, token, len));
      while (driver.enableInterrupts()); // re-armed; completions that raced in are collected now
      wake();
    };
    const onUsed = (q: number, token: number, len: number): void => {
      {
        const r = requests[token];
        if (r === undefined || r.done) {
          fail(`completion of token ${token} that is not in flight (duplicate)`);
          return;
        }
        r.done = true;
        const status = memory.view(meta + token * 64 + 16, 1)[0];
        if (status !== 0) fail(`${r.op} at ${r.pos} (+${r.len}) on queue ${q}: status ${status}`);
        const expectLen = r.op === 'read' ? r.len + 1 : 1;
        if (len !== expectLen) fail(`${r.op} used length ${len}, expected ${expectLen}`);
        const buf = memory.view(r.bufGpa, r.len);
        if (r.op === 'read') {
          report.reads++;
          const want = mirror.subarray(r.pos, r.pos + r.len);
          if (!Buffer.from(buf).equals(want)) fail(`read at ${r.pos} (+${r.len}) returned wrong data (buffer in ${r.hot ? `hot slot ${r.hot.slot}` : 'base'})`);
        } else {
          report.writes++;
          mirror.set(r.data as Uint8Array, r.pos);
        }
        report.requests++;
        busyRanges.delete(r.pos / BUF);
        if (r.hot !== undefined) {
          r.hot.inflight--;
          r.hot.freeBuffers.push(r.bufGpa - r.hot.region.gpa);
        }
        requests[token] = undefined;
      }
    };
    const watch = (q: number): void => (qobj[q] as FrontendQueue).watchCall(() => complete(q));
    for (let q = 0; q < queues; q++) watch(q);

    /** Submits requests on queue q until DEPTH are in flight. */
    const fill = (q: number): void => {
      if (paused[q] || stopping) return;
      const queue = qobj[q] as FrontendQueue;
      let added = false;
      for (let slot = q * DEPTH; slot < (q + 1) * DEPTH; slot++) {
        if (requests[slot] !== undefined) continue;
        const len = 512 * (1 + Math.floor(rand() * (BUF / 512)));
        const block = Math.floor(rand() * (DISK / BUF));
        if (busyRanges.has(block)) continue;
        const pos = block * BUF;
        const op = rand() < 0.5 ? 'read' : 'write';
        const active = hot.filter((h): h is Hot => h !== undefined && h.state === 'active' && h.freeBuffers.length > 0);
        const h = active.length > 0 && rand() < 0.8 ? active[Math.floor(rand() * active.length)] : undefined;
        const bufGpa = h !== undefined ? h.region.gpa + (h.freeBuffers.pop() as number) : (baseBuffers[slot] as number);
        const buf = memory.view(bufGpa, len);
        let data: Uint8Array | undefined;
        if (op === 'write') {
          data = new Uint8Array(len);
          for (let i = 0; i < len; i += 4) data[i] = (rand() * 256) | 0;
          buf.set(data);
        } else {
          buf.fill(0xa5); // the device must overwrite all of it
        }
        const hdrGpa = meta + slot * 64;
        const hdr = Buffer.alloc(16);
        hdr.writeUInt32LE(op === 'read' ? BlkRequestType.IN : BlkRequestType.OUT, 0);
        hdr.writeBigUInt64LE(BigInt(pos / 512), 8);
        memory.view(hdrGpa, 16).set(hdr);
        memory.view(hdrGpa + 16, 1)[0] = 0xff;
        const head = queue.driver.addChain(
          [
            { addr: hdrGpa, len: 16, writable: false },
            { addr: bufGpa, len, writable: op === 'read' },
            { addr: hdrGpa + 16, len: 1, writable: true },
          ],
          slot,
        );
        if (head < 0) {
          if (h !== undefined) h.freeBuffers.push(bufGpa - h.region.gpa);
          break;
        }
        if (h !== undefined) h.inflight++;
        busyRanges.add(block);
        requests[slot] = { token: slot, queue: q, op, pos, len, hot: h, bufGpa, data, done: false };
        added = true;
      }
      if (added) queue.publishAndKick();
    };

    const load = async (): Promise<void> => {
      while (Date.now() < deadline && report.errors.length === 0) {
        for (let q = 0; q < queues; q++) fill(q);
        await new Promise<void>((resolve) => {
          wake = resolve;
          setTimeout(resolve, 20);
        });
      }
    };

    const timed = async (what: () => Promise<void>): Promise<void> => {
      const t0 = performance.now();
      await what();
      report.changeLatencyMs.push(performance.now() - t0);
    };

    const waitIdle = async (cond: () => boolean, what: string): Promise<void> => {
      const end = Date.now() + 10_000;
      while (!cond()) {
        if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
        await sleep(1);
      }
    };

    const publishTable = (): Promise<void> => timed(() => fe.setMemTable(memory));

    const addHot = async (slot: number): Promise<void> => {
      const region = memory.addRegion({ gpa: HOT_BASE + slot * HOT_STRIDE, size: HOT_SIZE });
      if (opts.memory === 'table') await publishTable();
      else await timed(() => fe.addMemoryRegion(region));
      const freeBuffers = Array.from({ length: HOT_SIZE / BUF }, (_, i) => i * BUF);
      hot[slot] = { slot, region, state: 'active', inflight: 0, freeBuffers };
    };

    const removeHot = async (h: Hot): Promise<void> => {
      h.state = 'draining'; // as a guest offlines memory before unplug: no new buffers there
      await waitIdle(() => h.inflight === 0, `hot slot ${h.slot} to drain`);
      if (opts.memory === 'table') {
        // The whole table without it; the frontend keeps its own mapping for the canary check below.
        memory.removeRegion(h.region);
        await publishTable();
        hot[h.slot] = undefined;
        return;
      }
      await timed(() => fe.removeMemoryRegion(h.region));
      hot[h.slot] = undefined;
      // The backend said it no longer uses this memory: fill it with a canary and check it later, through a mapping
      // of our own (the guest RAM gives the addresses back, so a new region may be plugged in at the same place).
      const fd = native.dup(h.region.file.fd);
      const bytes = new Uint8Array(native.mapShared(fd, 0, HOT_SIZE));
      bytes.fill(0xc5);
      memory.removeRegion(h.region);
      graveyard.push({ gpa: h.region.gpa, fd, bytes, until: report.changeLatencyMs.length + 20 });
    };

    const checkGraveyard = (all: boolean): void => {
      for (let i = graveyard.length - 1; i >= 0; i--) {
        const g = graveyard[i] as (typeof graveyard)[number];
        if (!all && g.until > report.changeLatencyMs.length) continue;
        if (!g.bytes.every((b) => b === 0xc5)) fail(`removed region at 0x${g.gpa.toString(16)} was written after its removal`);
        native.revoke(g.bytes.buffer as SharedArrayBuffer);
        native.close(g.fd);
        graveyard.splice(i, 1);
      }
    };

    const moveRing = async (q: number): Promise<void> => {
      paused[q] = true;
      await waitIdle(() => inflightOf(q) === 0, `queue ${q} to drain`);
      await timed(async () => {
        await fe.stopQueue(q);
      });
      ringArea[q] = 1 - (ringArea[q] as number);
      const moved = await fe.moveQueue(q, ringAreas[q]?.[ringArea[q]] as number);
      qobj[q] = moved;
      watch(q);
      paused[q] = false;
    };

    const changes = async (): Promise<void> => {
      while (Date.now() < deadline && report.errors.length === 0) {
        const r = rand();
        const present = hot.filter((h): h is Hot => h !== undefined);
        const free = hot.flatMap((h, i) => (h === undefined ? [i] : []));
        if (r < 0.1) {
          await moveRing(Math.floor(rand() * queues));
          report.changes.ringMove++;
        } else if (r < 0.4 && present.length > 0) {
          // replace: the same guest addresses, a new memfd
          const h = present[Math.floor(rand() * present.length)] as Hot;
          await removeHot(h);
          await addHot(h.slot);
          report.changes.replace++;
        } else if ((r < 0.7 && free.length > 0) || present.length === 0) {
          await addHot(free[Math.floor(rand() * free.length)] as number);
          report.changes.add++;
        } else {
          await removeHot(present[Math.floor(rand() * present.length)] as Hot);
          report.changes.remove++;
        }
        checkGraveyard(false);
      }
    };

    await Promise.all([load(), changes()]);
    stopping = true;
    await waitIdle(() => requests.every((r) => r === undefined), 'every request in flight to complete');
    checkGraveyard(true);
    if (server.session?.needsReset) fail('the backend marked the device as needing reset');
    for (let q = 0; q < queues; q++) qobj[q]?.watchCall(undefined);
    // The disk holds exactly what the mirror says.
    if (!readFileSync(image).equals(mirror)) fail('the image differs from what the completed writes wrote');
  } finally {
    frontend?.close();
    memory.close();
    await server.close();
    rmSync(dir, { recursive: true, force: true });
  }
  return report;
}

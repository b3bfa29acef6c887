/**
 * The racing-driver fuzzer for packed rings: a worker thread (ring-mutator.ts, packed mode) rewrites packed
 * descriptors (flags with the AVAIL / USED bits of either wrap counter, ids in and out of range, lengths, addresses),
 * the entries of an indirect table (mostly at 2^53 - 16, so that the length alone decides whether an entry is valid),
 * the event suppression areas and request headers while this thread runs the worker's loop
 * over `PackedQueue` and the blk handler, on rings of 16 and 5 (not a power of two), with cached ring views and with
 * per-access translation (`--sync copy`) in turn, some chains held in flight and completed in a random order. Each
 * round the driver offers the whole ring again from the device's position (every slot's AVAIL / USED bits set for
 * its wrap counter), so chains run round the ring onto slots in flight unless the device stops them.
 *
 * Whatever the interleaving, only VirtioErrors may come out, and every chain the device accepts satisfies the bounds
 * it validated: a field fetched twice (once to check, once to use) would let a torn value through (an address that
 * ends past 2^53, a chain over 2^32 - 1 bytes, an id >= size or one in flight, an indirect flag that disagrees with
 * the slots the chain took, a chain longer than the slots the device did not hold).
 */
import { Worker } from 'node:worker_threads';
import { VirtioError } from '../../src/errors.js';
import { PackedQueue, PackedQueueDriver } from '../../src/queue/index.js';
import { B, ChainRig, HEADERS, RING_BASE, checkChainBounds, fuzzMemory } from './chain-fuzz.js';
import { prng, type FuzzReport } from './config.js';
import type { MutatorInit } from './ring-mutator.js';

const F_AVAIL = 1 << 7;
const F_USED = 1 << 15;

/** The rings: two sizes, each with cached views and without, eventIdx on one of each. */
const RINGS = [
  { size: 16, base: RING_BASE },
  { size: 5, base: RING_BASE + 0x400 },
] as const;

function linearOf(pos: number, size: number): number {
  return (pos & 0x8000) !== 0 ? pos & 0x7fff : size + (pos & 0x7fff);
}

function encodePos(lin: number, size: number): number {
  return lin < size ? lin | 0x8000 : lin - size;
}

export async function racePackedChains(options: { ms: number; seed: number }): Promise<FuzzReport> {
  const t0 = Date.now();
  const mem = fuzzMemory(0);
  const rig = new ChainRig();
  const a = mem.regions[0];
  const b = mem.regions[1];
  if (a === undefined || b === undefined) throw new Error('memory layout');
  const tableAddr = B + 0x100;
  const layouts = RINGS.map((r) => PackedQueueDriver.layout(r.size, r.base));
  const control = new SharedArrayBuffer(8);
  const init: MutatorInit = {
    descAreas: layouts.map((l, i) => ({ buffer: a.buffer, offset: l.descAddr, length: 16 * (RINGS[i]?.size ?? 0) })),
    headers: { buffer: a.buffer, offset: HEADERS, count: 16 },
    tableAddr,
    bufferAddr: HEADERS,
    control,
    seed: options.seed,
    // 4 table entries toggled by the mutator; a 1024-entry table continues with zeroes (valid empty buffers).
    packed: {
      idRange: 8,
      tableArea: { buffer: b.buffer, offset: tableAddr - B, length: 16 * 4 },
      eventAreas: layouts.map((l) => ({ buffer: a.buffer, offset: l.driverAddr })),
    },
  };
  const worker = new Worker(new URL('./ring-mutator.js', import.meta.url), { workerData: init });
  const exited = new Promise<number>((resolve) => worker.once('exit', resolve));
  const queues = [true, false].flatMap((cacheViews) =>
    RINGS.map((r, i) => {
      const l = layouts[i] as (typeof layouts)[number];
      const q = new PackedQueue({ size: r.size, descAddr: l.descAddr, driverAddr: l.driverAddr, deviceAddr: l.deviceAddr, eventIdx: cacheViews === (i === 0), indirect: true, cacheViews });
      q.attach(mem);
      return { q, flags: new Uint16Array(a.buffer, l.descAddr, 8 * r.size) };
    }),
  );
  const rnd = prng(options.seed ^ 0x5bd1e995);
  const counts: Record<string, number> = { rounds: 0, popped: 0, completed: 0, indirect: 0, straddled: 0, outOfOrder: 0 };
  const bump = (code: string): void => {
    counts[code] = (counts[code] ?? 0) + 1;
  };
  try {
    const deadline = Date.now() + options.ms;
    for (let round = 0; Date.now() < deadline; round++) {
      counts.rounds = round + 1;
      const { q: queue, flags } = queues[round % queues.length] as (typeof queues)[number];
      const size = queue.size;
      const period = 2 * size;
      const chain = queue.createChain();
      // The driver offers the whole ring from the device's position: each slot's AVAIL / USED bits for its wrap
      // counter and NEXT on half of them (the mutator decides the rest, and keeps changing these too). In one round
      // of 8 every slot gets NEXT: chains that run round the ring. Offered again in the middle of a round, the slots
      // in flight become available for the next lap.
      const loopy = rnd() < 0.125;
      const offer = (): void => {
        const from = linearOf(queue.getBase(), size);
        for (let k = 0; k < size; k++) {
          const lin = (from + k) % period;
          const wrap = lin < size;
          const i = 8 * (wrap ? lin : lin - size) + 7;
          const next = loopy || rnd() < 0.5 ? 1 : 0;
          Atomics.store(flags, i, (Atomics.load(flags, i) & 0x7f7e) | (wrap ? F_AVAIL : F_USED) | next);
        }
      };
      offer();
      const inFlight = new Map<number, number>(); // id -> slots
      let inFlightSlots = 0;
      const held: { id: number; len: number }[] = [];
      const hold = Math.floor(rnd() * 4);
      const completeOne = (k: number): void => {
        const h = held.splice(k, 1)[0] as { id: number; len: number };
        if (k > 0) bump('outOfOrder');
        queue.pushUsed(h.id, h.len);
        inFlightSlots -= inFlight.get(h.id) ?? 0;
        inFlight.delete(h.id);
        bump('completed');
      };
      let failed = false;
      queue.disableNotification();
      for (let n = 0; n < 4 * size; n++) {
        const before = linearOf(queue.getBase(), size);
        const room = size - inFlightSlots;
        let ok: boolean;
        try {
          ok = queue.popChain(mem, chain);
        } catch (err) {
          if (!(err instanceof VirtioError)) throw err;
          bump(err.code);
          failed = true;
          break;
        }
        if (!ok) break;
        bump('popped');
        checkChainBounds(chain, size, queue.maxChainLength);
        const slots = (linearOf(queue.getBase(), size) - before + period) % period;
        if (chain.indirect ? slots !== 1 : slots !== chain.count) {
          throw new Error(`a chain of ${chain.count} segments (indirect ${chain.indirect}) took ${slots} ring slots`);
        }
        if (slots > room) throw new Error(`a chain took ${slots} slots with ${room} not in flight`);
        if (inFlight.has(chain.head)) throw new Error(`id ${chain.head} accepted while in flight`);
        if (queue.inFlightSlots !== inFlightSlots + slots) throw new Error(`${queue.inFlightSlots} slots in flight, expected ${inFlightSlots + slots}`);
        if (chain.indirect) bump('indirect');
        if (!chain.indirect && (before < size) !== ((before + slots - 1) % period < size)) bump('straddled');
        inFlight.set(chain.head, slots);
        inFlightSlots += slots;
        let len = 0;
        try {
          len = rig.handler.process(mem, chain);
          if (len < 1 || len > chain.writableBytes) throw new Error(`used length ${len} of ${chain.writableBytes}`);
        } catch (err) {
          if (!(err instanceof VirtioError)) throw err;
          bump(err.code);
        }
        held.push({ id: chain.head, len });
        while (held.length > hold) completeOne(Math.floor(rnd() * held.length));
        if (rnd() < 0.25) offer();
      }
      while (held.length > 0) completeOne(Math.floor(rnd() * held.length));
      queue.publishUsed();
      queue.needsNotification();
      if (failed) {
        // Skip the bad chain, as a reset device would start over (nothing is in flight any more).
        queue.resume(encodePos((linearOf(queue.getBase(), size) + 1) % period, size));
      } else {
        queue.enableNotification();
      }
      if (round % 64 === 0) await new Promise((r) => setImmediate(r));
    }
  } finally {
    Atomics.store(new Int32Array(control), 0, 1);
    await exited;
    rig.close();
  }
  counts.mutatorWrites = new Int32Array(control)[1] ?? 0;
  if (mem.violations.length > 0) throw new Error(`impossible view calls: ${mem.violations.slice(0, 3).join('; ')}`);
  if ((counts.mutatorWrites ?? 0) === 0) throw new Error('the mutator did not run');
  if ((counts.popped ?? 0) === 0) throw new Error('no chain was accepted while the driver raced');
  return { target: 'packedRace', seed: options.seed, ms: Date.now() - t0, runs: counts.rounds ?? 0, counts };
}

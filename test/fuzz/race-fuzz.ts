/**
 * The racing-driver fuzzer: a worker thread (ring-mutator.ts) rewrites descriptors, indirect tables, avail ring
 * entries and request headers while this thread pops and processes chains (TOCTOU / double fetch, DPDK
 * CVE-2020-14375), with cached ring views and with per-access translation (`--sync copy`) in turn. Whatever the
 * interleaving, only VirtioErrors may come out, and every chain the device accepts satisfies the bounds it validated:
 * a field fetched twice (once to check, once to use) would let a torn value through (an address that ends past
 * 2^53, a chain over 2^32 - 1 bytes, a head past the queue size).
 */
import { Worker } from 'node:worker_threads';
import { VirtioError } from '../../src/errors.js';
import { SplitQueue } from '../../src/queue/split-queue.js';
import { SplitQueueDriver } from '../../src/queue/split-queue-driver.js';
import { B, ChainRig, HEADERS, RING_BASE, checkChainBounds, fuzzMemory } from './chain-fuzz.js';
import type { FuzzReport } from './config.js';
import type { MutatorInit } from './ring-mutator.js';

const SIZE = 16;

export async function raceChains(options: { ms: number; seed: number }): Promise<FuzzReport> {
  const t0 = Date.now();
  const mem = fuzzMemory(0);
  const rig = new ChainRig();
  const layout = SplitQueueDriver.layout(SIZE, RING_BASE);
  const a = mem.regions[0];
  const b = mem.regions[1];
  if (a === undefined || b === undefined) throw new Error('memory layout');
  const tableAddr = B + 0x100;
  const control = new SharedArrayBuffer(8);
  const init: MutatorInit = {
    descAreas: [
      { buffer: a.buffer, offset: layout.descAddr, length: 16 * SIZE },
      { buffer: b.buffer, offset: tableAddr - B, length: 16 * 64 },
    ],
    availRing: { buffer: a.buffer, offset: layout.availAddr + 4, size: SIZE },
    headers: { buffer: a.buffer, offset: HEADERS, count: 16 },
    tableAddr,
    bufferAddr: HEADERS,
    control,
    seed: options.seed,
  };
  const worker = new Worker(new URL('./ring-mutator.js', import.meta.url), { workerData: init });
  const exited = new Promise<number>((resolve) => worker.once('exit', resolve));
  const availIdx = new Uint16Array(a.buffer, layout.availAddr + 2, 1);
  const queues = [true, false].map((cacheViews) => {
    const q = new SplitQueue({ size: SIZE, ...layout, eventIdx: false, indirect: true, cacheViews });
    q.attach(mem);
    return q;
  });
  const counts: Record<string, number> = { rounds: 0, popped: 0, completed: 0 };
  const bump = (code: string): void => {
    counts[code] = (counts[code] ?? 0) + 1;
  };
  try {
    const deadline = Date.now() + options.ms;
    for (let round = 0; Date.now() < deadline; round++) {
      counts.rounds = round + 1;
      const queue = queues[round % 2] as SplitQueue;
      const chain = queue.createChain();
      // The device always has a full ring of work; the mutator decides what it contains.
      Atomics.store(availIdx, 0, (queue.lastAvailIdx + SIZE) & 0xffff);
      try {
        while (queue.popChain(mem, chain)) {
          bump('popped');
          checkChainBounds(chain, SIZE, queue.maxChainLength);
          try {
            const len = rig.handler.process(mem, chain);
            if (len < 1 || len > chain.writableBytes) throw new Error(`used length ${len} of ${chain.writableBytes}`);
            queue.pushUsed(chain.head, len);
            bump('completed');
          } catch (err) {
            if (!(err instanceof VirtioError)) throw err;
            bump(err.code);
          }
        }
        queue.publishUsed();
      } catch (err) {
        if (!(err instanceof VirtioError)) throw err;
        bump(err.code);
        queue.setBase((queue.lastAvailIdx + 1) & 0xffff); // skip the bad chain, as a reset device would start over
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
  return { target: 'race', seed: options.seed, ms: Date.now() - t0, runs: counts.rounds ?? 0, counts };
}

/**
 * `vhost-user demo` (`npm start`): the whole system in one process, needing nothing but `npm ci`. Our vhost-user-blk
 * backend listens on a temporary socket; the TypeScript frontend connects as a VMM would, gives it memfd guest
 * memory, writes a random pattern over the disk through two queues, hot-plugs and unplugs guest memory while
 * requests run, reads everything back and verifies it.
 */
import { Command } from 'commander';
import { randomFillSync } from 'node:crypto';
import { mkdtempSync, rmSync, truncateSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { VhostUserServer } from '../backend/server.js';
import { BlkDevice } from '../devices/blk/blk-device.js';
import { BlkDriver } from '../frontend/blk-driver.js';
import { VhostUserFrontend } from '../frontend/frontend.js';
import { GuestRam } from '../frontend/guest-ram.js';
import { parseInteger, parseSize } from './parse.js';

const MiB = 1024 * 1024;

interface DemoOptions {
  size: number;
  chunk: number;
  depth: number;
}

function progress(line: string): void {
  if (process.stdout.isTTY) process.stdout.write(`\r${line.padEnd(78)}`);
}

export function demoCommand(): Command {
  return new Command('demo')
    .description('Run the backend and the TypeScript frontend in this process: write, hot-plug memory, read back, verify')
    .option('--size <bytes>', 'disk size', parseSize, 64 * MiB)
    .option('--chunk <bytes>', 'bytes per request (a multiple of 512, up to 128k)', parseSize, 64 * 1024)
    .option('--depth <n>', 'requests in flight per queue', parseInteger(1, 128), 16)
    .action(async (opts: DemoOptions) => {
      if (opts.chunk % 512 !== 0 || opts.chunk > 128 * 1024 || opts.size % opts.chunk !== 0) {
        throw new Error('--chunk must be a multiple of 512 up to 128k that divides --size');
      }
      const dir = mkdtempSync(join(tmpdir(), 'vhost-user-demo-'));
      const image = join(dir, 'disk.img');
      writeFileSync(image, '');
      truncateSync(image, opts.size);
      const server = new VhostUserServer({
        socketPath: join(dir, 'vhost-user-blk.sock'),
        device: new BlkDevice({ backend: { kind: 'file', path: image }, queues: 2 }),
      });
      let frontend: VhostUserFrontend | undefined;
      let memory: GuestRam | undefined;
      try {
        server.listen();
        console.log(`backend:  vhost-user-blk on ${server.socketPath} (${opts.size / MiB} MiB image, 2 queues, worker threads)`);
        frontend = await VhostUserFrontend.connect(server.socketPath);
        memory = GuestRam.create(32 * MiB);
        const driver = await BlkDriver.start(frontend, { memory, queues: 2, queueSize: 128, maxRequestBytes: opts.chunk });
        console.log(`frontend: connected, ${driver.config.capacity * 512 / MiB} MiB disk, memfd guest RAM, rings set up`);

        const expected = Buffer.alloc(opts.size);
        randomFillSync(expected);
        const chunks = opts.size / opts.chunk;
        const t0 = performance.now();
        let done = 0;
        // Both queues, `depth` requests in flight each; every request waits for its own completion.
        const run = async (op: (i: number, queue: number) => Promise<void>, label: string): Promise<void> => {
          let next = 0;
          const lane = async (queue: number): Promise<void> => {
            while (next < chunks) {
              const i = next++;
              await op(i, queue);
              done++;
              if (done % 64 === 0) progress(`${label}: ${((done * opts.chunk) / MiB).toFixed(0)} MiB`);
            }
          };
          await Promise.all(Array.from({ length: 2 * opts.depth }, (_, k) => lane(k % 2)));
        };

        await run(async (i, queue) => {
          const status = await driver.write((i * opts.chunk) / 512, expected.subarray(i * opts.chunk, (i + 1) * opts.chunk), queue);
          if (status !== 0) throw new Error(`write ${i} failed with status ${status}`);
        }, 'writing');
        const writeMs = performance.now() - t0;

        // Live memory change while the reads run: plug a 16 MiB region in, then unplug it. Each change is
        // acknowledged only once every worker has switched tables and nothing can touch the old memory.
        done = 0;
        const t1 = performance.now();
        let mismatches = 0;
        let plugMs = 0;
        const plug = async (): Promise<void> => {
          if (memory === undefined || frontend === undefined) return;
          const hot = memory.addRegion({ gpa: 0x1_0000_0000, size: 16 * MiB });
          const tPlug = performance.now();
          await frontend.addMemoryRegion(hot);
          await frontend.removeMemoryRegion(hot);
          plugMs = performance.now() - tPlug;
          memory.removeRegion(hot);
        };
        await Promise.all([
          plug(),
          run(async (i, queue) => {
            const r = await driver.read((i * opts.chunk) / 512, opts.chunk, queue);
            if (r.status !== 0) throw new Error(`read ${i} failed with status ${r.status}`);
            if (!Buffer.from(r.data).equals(expected.subarray(i * opts.chunk, (i + 1) * opts.chunk))) mismatches++;
          }, 'reading'),
        ]);
        const readMs = performance.now() - t1;
        progress('');
        if (process.stdout.isTTY) process.stdout.write('\r');

        const mbps = (ms: number): string => ((opts.size / MiB) / (ms / 1000)).toFixed(1);
        console.log(`wrote    ${opts.size / MiB} MiB in ${chunks} requests: ${mbps(writeMs)} MiB/s`);
        console.log(`read     ${opts.size / MiB} MiB back: ${mbps(readMs)} MiB/s`);
        console.log(`memory   a 16 MiB region hot-plugged and unplugged during the reads, both acknowledged in ${plugMs.toFixed(1)} ms`);
        console.log(mismatches === 0 ? 'verified every byte: OK' : `MISMATCH in ${mismatches} chunks`);
        driver.close();
        if (mismatches !== 0) process.exitCode = 1;
      } finally {
        frontend?.close();
        memory?.close();
        await server.close();
        rmSync(dir, { recursive: true, force: true });
      }
    });
}

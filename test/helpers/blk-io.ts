/**
 * Block I/O checks through the TypeScript frontend's BlkDriver, for any vhost-user-blk backend: random writes of
 * random sizes in random order on every queue, read back in other pieces and compared with a model of the disk.
 */
import assert from 'node:assert/strict';
import { BlkStatus } from '../../src/devices/blk/constants.js';
import type { BlkDriver } from '../../src/frontend/index.js';

export { prng } from '../fuzz/config.js';

/** An image's initial content: each byte tells its sector and offset. */
export function imagePattern(size: number): Buffer {
  const buf = Buffer.alloc(size);
  for (let i = 0; i < size; i++) buf[i] = ((i >>> 9) * 13 + (i & 511)) & 0xff;
  return buf;
}

/** [start, end) as shuffled pieces of 512 B .. maxBytes (multiples of 512, biased to small sizes). */
export function randomPieces(rand: () => number, start: number, end: number, maxBytes = 128 * 1024): { offset: number; length: number }[] {
  const pieces: { offset: number; length: number }[] = [];
  for (let off = start; off < end; ) {
    const length = Math.min((1 + Math.floor(rand() * rand() * rand() * (maxBytes / 512))) * 512, end - off);
    pieces.push({ offset: off, length });
    off += length;
  }
  for (let i = pieces.length - 1; i > 0; i--) {
    const j = Math.floor(rand() * (i + 1));
    [pieces[i], pieces[j]] = [pieces[j] as (typeof pieces)[number], pieces[i] as (typeof pieces)[number]];
  }
  return pieces;
}

export async function writeAndVerify(blk: BlkDriver, rand: () => number, model: Buffer, start: number, end: number): Promise<void> {
  const writes = randomPieces(rand, start, end, blk.maxRequestBytes);
  const statuses = await Promise.all(
    writes.map((p, i) => {
      const data = new Uint8Array(p.length);
      for (let k = 0; k < data.length; k++) data[k] = (rand() * 256) | 0;
      model.set(data, p.offset);
      return blk.write(p.offset / 512, data, i % blk.queueCount);
    }),
  );
  assert.ok(statuses.every((s) => s === BlkStatus.OK), `write statuses ${[...new Set(statuses)].join(',')}`);
  const reads = randomPieces(rand, start, end, blk.maxRequestBytes);
  const results = await Promise.all(reads.map((p, i) => blk.read(p.offset / 512, p.length, (i + 1) % blk.queueCount)));
  results.forEach((r, i) => {
    const p = reads[i] as { offset: number; length: number };
    assert.equal(r.status, BlkStatus.OK);
    if (!Buffer.from(r.data).equals(model.subarray(p.offset, p.offset + p.length))) {
      assert.fail(`data mismatch in [${p.offset}, +${p.length})`);
    }
  });
}

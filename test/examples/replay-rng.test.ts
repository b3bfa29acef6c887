// examples/replay-rng: a device written on the package's public API, outside src/, served and driven as a user
// would (VhostUserServer, the TypeScript frontend as the VMM). Its stream is Marsaglia's xorshift32 from the seed,
// one byte (the low 8 bits) per step: the first bytes for seed 42 are written out below, computed apart from the
// example's code.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { setTimeout as sleep } from 'node:timers/promises';
import { ReplayRngDevice } from '../../examples/replay-rng/replay-rng-device.js';
import { VhostUserServer, VhostError } from '../../src/index.js';
import { GuestRam, VhostUserFrontend } from '../../src/frontend/index.js';
import { VirtioFeature, featureBit } from '../../src/protocol/constants.js';
import { testTempDir } from '../helpers/tmp.js';

const SEED_42_FIRST_16 = '28 ac 03 c0 c4 b6 d8 ae 93 37 da 33 64 e0 a9 d9';

function hex(b: Uint8Array): string {
  return Buffer.from(b).toString('hex').replace(/(..)(?!$)/g, '$1 ');
}

/** One session: two requests (10 bytes, then 2 + 4 bytes over two descriptors); returns the 16 bytes in order. */
async function session(socketPath: string): Promise<{ bytes: Uint8Array; lens: number[] }> {
  const ram = GuestRam.create(1024 * 1024);
  const fe = await VhostUserFrontend.connect(socketPath);
  try {
    await fe.start({ features: featureBit(VirtioFeature.VERSION_1), memory: ram, queues: [{ index: 0, size: 8 }] });
    const q = fe.queue(0);
    const a = ram.alloc(10);
    const b = ram.alloc(2);
    const c = ram.alloc(4);
    q.driver.addChain([{ addr: a, len: 10, writable: true }], 1);
    q.driver.addChain([{ addr: b, len: 2, writable: true }, { addr: c, len: 4, writable: true }], 2);
    q.publishAndKick();
    const lens: number[] = [];
    for (let i = 0; i < 200 && lens.length < 2; i++) {
      q.driver.pollUsed((_token, len) => lens.push(len));
      if (lens.length < 2) await sleep(10);
    }
    return { bytes: Uint8Array.from([...ram.bytes(a, 10), ...ram.bytes(b, 2), ...ram.bytes(c, 4)]), lens };
  } finally {
    fe.close();
    ram.close();
  }
}

test('examples/replay-rng: the seed\'s stream, continued across requests and descriptors, again in every session', { timeout: 30_000 }, async (t) => {
  const dir = await testTempDir(t, 'vu-replay-');
  const server = new VhostUserServer({ socketPath: dir.join('rng.sock'), device: new ReplayRngDevice({ seed: 42 }) });
  server.listen();
  try {
    const first = await session(server.socketPath);
    assert.deepEqual(first.lens, [10, 6]);
    assert.equal(hex(first.bytes), SEED_42_FIRST_16);
    const again = await session(server.socketPath);
    assert.equal(hex(again.bytes), SEED_42_FIRST_16, 'a new session replays the stream');
  } finally {
    await server.close();
  }
  assert.throws(() => new ReplayRngDevice({ seed: 0 }), (e: unknown) => e instanceof VhostError && e.code === 'REPLAY_RNG_BAD_SEED');
});

// A frontend that removes memory while a request still uses it (a guest would not, a hostile frontend may): the
// request completes in an I/O thread later (`--io async` with a completion delay), so it holds a pin on the region;
// the backend must keep the memory until the request is done, then revoke it, and only then acknowledge. In every
// sync mode, and without deadlock in `lock` mode (control never holds a queue lock while it waits for pins).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { VhostUserServer } from '../../src/backend/server.js';
import type { SyncMode } from '../../src/backend/sync-block.js';
import { BlkDevice } from '../../src/devices/blk/blk-device.js';
import { BlkDriver } from '../../src/frontend/blk-driver.js';
import { VhostUserFrontend } from '../../src/frontend/frontend.js';
import { GuestRam } from '../../src/frontend/guest-ram.js';
import { splitDriver } from '../helpers/split-driver.js';

const MiB = 1024 * 1024;
const DELAY_MS = 300;

for (const sync of ['qsbr', 'lock', 'copy'] as SyncMode[]) {
  test(`--sync ${sync}: REM_MEM_REG waits for a request in flight in that region, then revokes`, async () => {
    const dir = mkdtempSync(join(tmpdir(), 'vhost-user-pins-'));
    const image = join(dir, 'disk.img');
    writeFileSync(image, Buffer.alloc(MiB, 0x5a));
    const server = new VhostUserServer({
      socketPath: join(dir, 'sock'),
      device: new BlkDevice({ backend: { kind: 'file', path: image }, io: 'async', completionDelayMs: DELAY_MS }),
      sync,
    });
    server.listen();
    const memory = GuestRam.create(4 * MiB);
    const frontend = await VhostUserFrontend.connect(server.socketPath);
    try {
      const hot = memory.addRegion({ gpa: 0x1_0000_0000, size: MiB });
      const driver = await BlkDriver.start(frontend, { memory, memoryMode: 'regions', bufferRegion: hot, slotsPerQueue: 2, maxRequestBytes: 4096 });
      const target = new Uint8Array(4096);
      const read = driver.readInto(8, target, 0).then((status) => ({ status }));
      await new Promise((r) => setTimeout(r, 20)); // the request is in the I/O thread now, its region pinned
      // When the acknowledgement arrives, the request's completion must already be in the used ring: the pin kept
      // the region until the I/O thread was done and the worker had published the completion.
      const usedAtAck = frontend.removeMemoryRegion(hot).then(() => splitDriver(frontend.queue(0)).readUsedIdx());
      const [r, used] = await Promise.all([read, usedAtAck]);
      assert.equal(used, 1, 'REM_MEM_REG was acknowledged before the request using the region completed');
      assert.equal(r.status, 0);
      assert.ok(target.every((b) => b === 0x5a), 'the data reached the buffer before the region went away');
      assert.equal(server.session?.memory.regions.length, 1);
      assert.equal(server.session?.needsReset, false);
      driver.close();
    } finally {
      frontend.close();
      memory.close();
      await server.close();
      rmSync(dir, { recursive: true, force: true });
    }
  });
}

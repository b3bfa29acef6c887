// The TypeScript frontend (src/frontend) against qemu-storage-daemon's vhost-user-blk export (libvhost-user), the
// reference backend: handshake, write + read back + verify on two queues, and two regions from one memfd described
// with ADD_MEM_REG, rings in the region at mmap_offset != 0.
import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync, writeFileSync } from 'node:fs';
import { BlkStatus } from '../../src/devices/blk/constants.js';
import { BlkDriver, GuestRam, VhostUserFrontend, parseBlkConfig } from '../../src/frontend/index.js';
import { ProtocolFeature } from '../../src/protocol/constants.js';
import { assertBaseline, settledBaseline } from '../helpers/fds.js';
import { startQsd, type Qsd } from '../helpers/qsd.js';
import { findBinary } from '../helpers/require-tool.js';
import { testTempDir } from '../helpers/tmp.js';
import { imagePattern, prng, writeAndVerify } from '../helpers/blk-io.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const IMAGE_SIZE = 8 * MiB;
const TIMEOUT = { timeout: 60_000 };

/** `dpkg -S /usr/bin/qemu-storage-daemon` names qemu-system-common. */
function haveQsd(t: TestContext): boolean {
  if (findBinary('qemu-storage-daemon') !== undefined) return true;
  if (process.env.CI === 'true') throw new Error('CI=true and qemu-storage-daemon is missing: apt-get install -y qemu-system-common');
  t.skip('needs Debian package qemu-system-common');
  return false;
}

/** Handshake, two queues of I/O, flush, GET_ID, an error status. */
async function ioRoundTrip(socketPath: string, image: string, model: Buffer): Promise<void> {
  const ram = GuestRam.create(24 * MiB);
  const fe = await VhostUserFrontend.connect(socketPath, { connectTimeoutMs: 5000 });
  try {
    assert.ok(fe.hasProtocolFeature(ProtocolFeature.CONFIG));
    assert.ok(fe.hasProtocolFeature(ProtocolFeature.MQ));
    assert.equal(fe.queueNum, 2);
    const config = parseBlkConfig(fe.config);
    assert.equal(config.capacity, IMAGE_SIZE / 512);
    assert.equal(config.numQueues, 2);

    const blk = await BlkDriver.start(fe, { memory: ram, queues: 2, queueSize: 64, slotsPerQueue: 32 });
    await writeAndVerify(blk, prng(3), model, 0, 3 * MiB);
    assert.equal(await blk.flush(), BlkStatus.OK);
    assert.ok(readFileSync(image).equals(model), 'the image file holds what was written');
    const id = await blk.getId(1);
    assert.equal(id.status, BlkStatus.OK);
    assert.ok(id.id.length > 0);
    assert.equal((await blk.read(IMAGE_SIZE / 512, 512)).status, BlkStatus.IOERR, 'past the end');
    blk.close();
  } finally {
    fe.close();
    ram.close();
  }
}

/** Guest RAM as two regions of one memfd, rings in the second (mmap_offset 8 MiB); SET_MEM_TABLE or ADD_MEM_REG. */
async function splitRegions(socketPath: string, model: Buffer, memoryMode: 'table' | 'regions'): Promise<void> {
  const ram = GuestRam.split({ lowSize: 8 * MiB, highSize: 8 * MiB });
  const fe = await VhostUserFrontend.connect(socketPath, { connectTimeoutMs: 5000 });
  try {
    const high = ram.regions[1];
    assert.ok(high !== undefined && high.fileOffset === 8 * MiB);
    if (memoryMode === 'regions') assert.ok(fe.hasProtocolFeature(ProtocolFeature.CONFIGURE_MEM_SLOTS));
    const blk = await BlkDriver.start(fe, {
      memory: ram,
      queues: 2,
      queueSize: 32,
      maxRequestBytes: 64 * KiB,
      ringRegion: high,
      bufferRegion: memoryMode === 'table' ? 0 : high,
      memoryMode,
    });
    const base = memoryMode === 'table' ? 0 : 4 * MiB;
    await writeAndVerify(blk, prng(memoryMode === 'table' ? 5 : 6), model, base, base + 2 * MiB);
    blk.close();
  } finally {
    fe.close();
    ram.close();
  }
}

// The work runs in functions of their own: a suspended async function keeps its dead locals (and so their mappings)
// alive, which would spoil the resource check.

test('qemu-storage-daemon: handshake, write + read back + verify on two queues, flush, GET_ID', TIMEOUT, async (t) => {
  if (!haveQsd(t)) return;
  const dir = await testTempDir(t, 'vu-feq-');
  const image = dir.join('disk.img');
  const model = imagePattern(IMAGE_SIZE);
  writeFileSync(image, model);
  const baseline = await settledBaseline();
  let qsd: Qsd | undefined;
  try {
    qsd = await startQsd({ image, socketPath: dir.join('vhost.sock'), numQueues: 2, writable: true });
    await ioRoundTrip(qsd.socketPath, image, model);
  } finally {
    await qsd?.stop(); // SIGTERM (then SIGKILL) by PID; waits for the exit
  }
  await assertBaseline(baseline);
});

test('qemu-storage-daemon: two regions from one memfd with ADD_MEM_REG, rings at mmap_offset != 0', TIMEOUT, async (t) => {
  if (!haveQsd(t)) return;
  const dir = await testTempDir(t, 'vu-feq-');
  const image = dir.join('disk.img');
  const model = imagePattern(IMAGE_SIZE);
  writeFileSync(image, model);
  const baseline = await settledBaseline();
  let qsd: Qsd | undefined;
  try {
    qsd = await startQsd({ image, socketPath: dir.join('vhost.sock'), numQueues: 2, writable: true });
    await splitRegions(qsd.socketPath, model, 'table');
    await splitRegions(qsd.socketPath, model, 'regions');
  } finally {
    await qsd?.stop();
  }
  await assertBaseline(baseline);
});

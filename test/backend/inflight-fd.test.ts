// The inflight region's file: the sealed memfd GET_INFLIGHT_FD hands out, and the fd SET_INFLIGHT_FD brings back.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { closeSync, ftruncateSync, mkdtempSync, openSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import * as native from '../../src/native/index.js';
import { createInflightFd, mapInflightFd } from '../../src/backend/inflight-fd.js';
import { InflightRegion, inflightGeometry } from '../../src/backend/inflight-region.js';

const ALL_SEALS = native.F_SEAL_GROW | native.F_SEAL_SHRINK | native.F_SEAL_SEAL;

function code(fn: () => unknown): string {
  try {
    fn();
  } catch (err) {
    return (err as { code?: string }).code ?? String(err);
  }
  return 'no error';
}

test('GET_INFLIGHT_FD: a memfd of exactly the region, sealed (grow, shrink, seal), zero, shared with SET_INFLIGHT_FD', () => {
  const g = inflightGeometry(2, 128, false);
  const { fd, buffer } = createInflightFd(g);
  try {
    assert.equal(native.fstat(fd).size, g.mmapSize);
    assert.equal(native.getSeals(fd) & ALL_SEALS, ALL_SEALS);
    assert.equal(buffer.byteLength, g.mmapSize);
    assert.ok(new Uint8Array(buffer).every((b) => b === 0), 'version 0 everywhere');
    // QEMU hands the same fd back after our restart: the same memory, and the tracker works over it.
    const request = { mmapSize: BigInt(g.mmapSize), mmapOffset: 0n, numQueues: 2, queueSize: 128 };
    const mapped = mapInflightFd(fd, request, { maxQueues: 2, packed: false });
    assert.deepEqual([mapped.truncatable, mapped.geometry], [false, g]);
    const q = new InflightRegion(mapped.buffer, mapped.geometry).splitQueue(1);
    q.recover(0, 128);
    assert.ok(q.markInflight(5));
    assert.equal(new Uint8Array(buffer)[g.queueRegionSize + 16 + 16 * 5], 1);
  } finally {
    native.close(fd);
  }
});

test('SET_INFLIGHT_FD: refused before anything is mapped; a bad fd is VHOST_INFLIGHT_BAD_FD', () => {
  const g = inflightGeometry(1, 64, true);
  const { fd } = createInflightFd(g);
  try {
    const before = native.mappingCount();
    const request = { mmapSize: BigInt(g.mmapSize), mmapOffset: 0n, numQueues: 1, queueSize: 64 };
    const limits = { maxQueues: 1, packed: true };
    assert.equal(code(() => mapInflightFd(fd, { ...request, mmapSize: request.mmapSize + 1n }, limits)), 'VHOST_INFLIGHT_BEYOND_FILE');
    assert.equal(code(() => mapInflightFd(fd, { ...request, mmapOffset: 0x1000n }, limits)), 'VHOST_INFLIGHT_BEYOND_FILE');
    assert.equal(code(() => mapInflightFd(fd, { ...request, numQueues: 2 }, limits)), 'VHOST_INFLIGHT_BAD_NUM_QUEUES');
    assert.equal(code(() => mapInflightFd(fd, request, { maxQueues: 1, packed: false })), 'no error', 'split needs less');
    assert.equal(code(() => mapInflightFd(-1, request, limits)), 'VHOST_INFLIGHT_BAD_FD');
    assert.ok(native.mappingCount() <= before + 1);
  } finally {
    native.close(fd);
  }
});

test('SET_INFLIGHT_FD: a sealable memfd gets F_SEAL_SHRINK; a file that cannot be sealed is mapped but truncatable', () => {
  const g = inflightGeometry(1, 8, false);
  const request = { mmapSize: BigInt(g.mmapSize), mmapOffset: 0n, numQueues: 1, queueSize: 8 };
  const memfd = native.memfdCreate('not-sealed', g.mmapSize);
  try {
    assert.equal(native.getSeals(memfd) & native.F_SEAL_SHRINK, 0);
    assert.equal(mapInflightFd(memfd, request, { maxQueues: 1, packed: false }).truncatable, false);
    assert.notEqual(native.getSeals(memfd) & native.F_SEAL_SHRINK, 0);
  } finally {
    native.close(memfd);
  }
  const dir = mkdtempSync(join(tmpdir(), 'inflight-'));
  const file = openSync(join(dir, 'region'), 'w+');
  try {
    ftruncateSync(file, g.mmapSize);
    assert.equal(mapInflightFd(file, request, { maxQueues: 1, packed: false }).truncatable, true);
  } finally {
    closeSync(file);
    rmSync(dir, { recursive: true });
  }
});

// Counting this process's open fds and live mappings, to assert that a test gave back everything it took.
import assert from 'node:assert/strict';
import { readdirSync } from 'node:fs';
import { setTimeout as sleep } from 'node:timers/promises';
import { mappingCount } from '../../src/native/index.js';

export function openFdCount(): number {
  return readdirSync('/proc/self/fd').length;
}

/** Snapshot of the process's resources; `assertSame` fails with what leaked. */
export interface ResourceSnapshot {
  fds: number;
  mappings: number;
}

export function snapshotResources(): ResourceSnapshot {
  return { fds: openFdCount(), mappings: mappingCount() };
}

/** Runs the garbage collector (tests run with --expose-gc) so dropped SharedArrayBuffers unmap. */
export function collectGarbage(): void {
  const gc = (globalThis as { gc?: () => void }).gc;
  if (gc === undefined) throw new Error('run tests with --expose-gc');
  gc();
}

/** The fds and mappings of the process once garbage (earlier tests' buffers) is collected. */
export async function settledBaseline(): Promise<ResourceSnapshot> {
  let prev = snapshotResources();
  for (let i = 0; i < 20; i++) {
    collectGarbage();
    await sleep(20);
    const now = snapshotResources();
    if (now.fds === prev.fds && now.mappings === prev.mappings) return now;
    prev = now;
  }
  return prev;
}

/** Waits (gc between tries) until fds and mappings are back to `baseline`; fails with what is left otherwise. */
export async function assertBaseline(baseline: ResourceSnapshot): Promise<void> {
  let now = snapshotResources();
  for (let i = 0; i < 100 && (now.fds !== baseline.fds || now.mappings !== baseline.mappings); i++) {
    collectGarbage();
    await sleep(20);
    now = snapshotResources();
  }
  assert.deepEqual(now, baseline, 'fds or mappings leaked');
}

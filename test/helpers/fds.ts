// Counting this process's open fds and live mappings, to assert that a test gave back everything it took.
import { readdirSync } from 'node:fs';
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

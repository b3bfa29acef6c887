/**
 * A backend in its own thread, for benchmarks that drive it from the main thread: it gets its own event loop (as it
 * would in its own process), so the frontend's work does not delay its replies, and modes that only the
 * benchmarks may use (the unsynchronized ceiling) stay out of the CLI.
 */
import { parentPort, workerData } from 'node:worker_threads';
import { VhostUserServer, type ServerOptions } from '../src/backend/server.js';
import { BlkDevice, type BlkDeviceOptions } from '../src/devices/blk/blk-device.js';
import { memoryChannel, type MemoryChangeEvent } from '../src/backend/session.js';

export interface BackendThreadInit {
  socketPath: string;
  device: BlkDeviceOptions;
  server: Omit<ServerOptions, 'socketPath' | 'device' | 'logger'>;
}

const init = workerData as BackendThreadInit;
const port = parentPort;
if (port === null) throw new Error('backend-thread runs as a worker');
const server = new VhostUserServer({ socketPath: init.socketPath, device: new BlkDevice(init.device), ...init.server });
server.listen();
// Map-change latency as the backend sees it: message arrival to reply (grace period, pins and revoke included).
const changeMs: number[] = [];
const record = (event: unknown): void => void changeMs.push((event as MemoryChangeEvent).durationMs);
memoryChannel.subscribe(record);
port.on('message', (msg: string) => {
  if (msg === 'reset-stats') changeMs.length = 0;
  if (msg !== 'close') return;
  memoryChannel.unsubscribe(record);
  void server.close().then(() => {
    port.postMessage({ changeMs });
    port.close();
  });
});
port.postMessage('listening');

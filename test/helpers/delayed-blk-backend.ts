// A blk backend process for restart tests: `node delayed-blk-backend.js SOCKET IMAGE DELAY_MS[,DELAY_MS...] [sync]`.
// Every request completes DELAY_MS after its I/O (BlkDevice's completionDelayMs, in an I/O thread; a list is taken
// in turn: out-of-order completion), so that a test can SIGKILL it with requests in flight; `sync` runs the I/O in
// the queue worker instead (whole batches, no delay). Logs pino JSON lines on stderr ('listening' once it accepts).
import pino from 'pino';
import { VhostUserServer } from '../../src/backend/server.js';
import { BlkDevice } from '../../src/devices/blk/blk-device.js';

const [socketPath, image, delays, io] = process.argv.slice(2);
if (socketPath === undefined || image === undefined) throw new Error('usage: delayed-blk-backend SOCKET IMAGE DELAY_MS');
const log = pino({ level: 'debug' }, pino.destination(2));
const device =
  io === 'sync'
    ? new BlkDevice({ backend: { kind: 'file', path: image } })
    : new BlkDevice({ backend: { kind: 'file', path: image }, io: 'async', completionDelayMs: (delays ?? '0').split(',').map(Number) });
const server = new VhostUserServer({ socketPath, device, logger: log });
server.listen();
process.once('SIGTERM', () => void server.close().then(() => process.exit(0)));

/**
 * `vhost-user ctl`: a client of the management API of `vhost-user serve` (src/daemon/api-server.ts), over its unix
 * socket. Prints the answer (JSON, pretty; metrics as text) on stdout; an error answer or a failed connection prints
 * `vhost-user ctl: CODE: message` on stderr and exits 1.
 */
import { Command } from 'commander';
import { readFile } from 'node:fs/promises';
import { request } from 'node:http';

/** How long one request may take (adding a device opens its image and starts its socket: well under this). */
const REQUEST_TIMEOUT_MS = 60_000;

interface CtlOptions {
  apiSocket: string;
}

/** A failure with a stable code, printed as `vhost-user ctl: CODE: message`. */
class CtlError extends Error {
  readonly code: string;

  constructor(code: string, message: string) {
    super(message);
    this.name = 'CtlError';
    this.code = code;
  }
}

interface ApiResponse {
  status: number;
  contentType: string;
  body: string;
}

/** One HTTP request on the API socket. Connection failures: CtlError with the system code (ECONNREFUSED, ENOENT, ...). */
function apiRequest(socketPath: string, method: string, path: string, body?: string): Promise<ApiResponse> {
  return new Promise((resolve, reject) => {
    const headers: Record<string, string> = { accept: 'application/json, text/plain' };
    if (body !== undefined) {
      headers['content-type'] = 'application/json';
      headers['content-length'] = String(Buffer.byteLength(body));
    }
    const req = request({ socketPath, method, path, headers, timeout: REQUEST_TIMEOUT_MS }, (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (chunk: Buffer) => chunks.push(chunk));
      res.on('end', () =>
        resolve({
          status: res.statusCode ?? 0,
          contentType: res.headers['content-type'] ?? '',
          body: Buffer.concat(chunks).toString('utf8'),
        }),
      );
      res.on('error', (err) => reject(new CtlError('ECONNRESET', `${socketPath}: ${err.message}`)));
    });
    req.on('timeout', () => req.destroy(new CtlError('ETIMEDOUT', `${socketPath}: no answer within ${REQUEST_TIMEOUT_MS / 1000} s`)));
    req.on('error', (err: NodeJS.ErrnoException) => {
      if (err instanceof CtlError) reject(err);
      else reject(new CtlError(err.code ?? 'ECONNRESET', `cannot reach the daemon at ${socketPath}: ${err.message}`));
    });
    req.end(body);
  });
}

/** The error of an error answer: its JSON `error`, or the bare status. */
function responseError(res: ApiResponse): CtlError {
  try {
    const parsed = JSON.parse(res.body) as { error?: { code?: unknown; message?: unknown } };
    const { code, message } = parsed.error ?? {};
    if (typeof code === 'string' && typeof message === 'string') return new CtlError(code, message);
  } catch {
    // not JSON
  }
  return new CtlError(`HTTP_${res.status}`, res.body.trim() || `status ${res.status}`);
}

/** Sends the request; prints a successful answer (JSON pretty-printed, anything else as it is). */
async function call(socketPath: string, method: string, path: string, body?: string): Promise<void> {
  const res = await apiRequest(socketPath, method, path, body);
  if (res.status >= 400) throw responseError(res);
  if (res.body === '') return;
  if (res.contentType.startsWith('application/json')) {
    process.stdout.write(`${JSON.stringify(JSON.parse(res.body), null, 2)}\n`);
  } else {
    process.stdout.write(res.body.endsWith('\n') ? res.body : `${res.body}\n`);
  }
}

/** Reads one device's JSON (an object with an `id`) for `add`. */
async function readDeviceFile(file: string): Promise<{ id: string; text: string }> {
  let text: string;
  try {
    text = await readFile(file, 'utf8');
  } catch (err) {
    const e = err as NodeJS.ErrnoException;
    throw new CtlError(e.code ?? 'EIO', e.message);
  }
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (err) {
    throw new CtlError('VHOST_CONFIG_INVALID', `${file}: not valid JSON (${(err as Error).message})`);
  }
  if (typeof json !== 'object' || json === null || Array.isArray(json)) {
    throw new CtlError('VHOST_CONFIG_INVALID', `${file}: expected one device as a JSON object`);
  }
  const id = (json as { id?: unknown }).id;
  if (typeof id !== 'string' || id === '') throw new CtlError('VHOST_CONFIG_INVALID', `${file}: the device has no "id"`);
  return { id, text: JSON.stringify(json) };
}

/** Runs an action; failures are printed as `vhost-user ctl: CODE: message` with exit status 1. */
function action<A extends unknown[]>(fn: (socketPath: string, ...args: A) => Promise<void>) {
  return async function (this: Command, ...args: A): Promise<void> {
    const { apiSocket } = this.optsWithGlobals<CtlOptions>();
    try {
      await fn(apiSocket, ...args);
    } catch (err) {
      const code = err instanceof CtlError ? err.code : 'VHOST_CTL_FAILED';
      process.stderr.write(`vhost-user ctl: ${code}: ${err instanceof Error ? err.message : String(err)}\n`);
      process.exitCode = 1;
    }
  };
}

const devicePath = (id: string): string => `/devices/${encodeURIComponent(id)}`;

export function ctlCommand(): Command {
  const ctl = new Command('ctl')
    .description(
      'Manage a running `vhost-user serve` daemon through its management API: list, inspect, add and remove devices, ' +
        'read the metrics. Prints JSON answers (pretty) or the metrics text; on an error prints CODE: message and exits 1.',
    )
    .requiredOption('--api-socket <path>', "the daemon's management API socket (serve --api-socket)");
  ctl
    .command('list')
    .description('every device, with its state and counters')
    .action(action((socket) => call(socket, 'GET', '/devices')));
  ctl
    .command('get')
    .description('one device')
    .argument('<id>', 'device id')
    .action(action((socket, id: string) => call(socket, 'GET', devicePath(id))));
  ctl
    .command('add')
    .description('add and start a device: FILE holds one device as in the config file (with its "id")')
    .argument('<file>', 'JSON file of one device')
    .action(
      action(async (socket, file: string) => {
        const { id, text } = await readDeviceFile(file);
        await call(socket, 'PUT', devicePath(id), text);
      }),
    );
  ctl
    .command('remove')
    .description('disconnect the frontend, stop and remove a device')
    .argument('<id>', 'device id')
    .action(action((socket, id: string) => call(socket, 'DELETE', devicePath(id))));
  ctl
    .command('metrics')
    .description('every metric, in the Prometheus text format')
    .action(action((socket) => call(socket, 'GET', '/metrics')));
  return ctl;
}

/**
 * The management API of `vhost-user serve`: HTTP/1.1 with JSON bodies on a unix socket (mode 0600: the socket's
 * owner is the only client, so there is no authentication). node:http alone: five routes need no framework.
 *
 * | route | answer |
 * | --- | --- |
 * | `GET /devices` | 200 `{"devices": [DeviceInfo, ...]}` |
 * | `GET /devices/{id}` | 200 DeviceInfo; 404 |
 * | `PUT /devices/{id}` | body: one device as in the config file (`id` optional, else equal to the path's): 201 DeviceInfo; 409 if the id is taken |
 * | `DELETE /devices/{id}` | 204; 404 |
 * | `GET /metrics` | 200, Prometheus text |
 *
 * Errors are `{"error": {"code": "...", "message": "...", "issues"?: [...]}}`, with the status chosen by the code
 * (`statusForCode`). HEAD is answered wherever GET is. Each request is independent: a bad one costs its own
 * connection at most (an oversized body closes it), never the server.
 */
import { chmodSync, lstatSync, statSync, unlinkSync } from 'node:fs';
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import { connect } from 'node:net';
import type { Logger } from 'pino';
import { VhostError } from '../errors.js';
import { ConfigError, DEVICE_ID_PATTERN, parseDeviceConfig } from './config.js';
import type { DaemonControl } from './control.js';

export interface ApiServer {
  readonly socketPath: string;
  /** Stops accepting, lets requests in progress finish (5 s at most), removes the socket file. Idempotent. */
  close(): Promise<void>;
}

/** Largest request body (a device's JSON is a few hundred bytes). */
export const MAX_BODY_BYTES = 64 * 1024;
/** The whole request head must arrive within this time, and the whole request within REQUEST_TIMEOUT_MS. */
const HEADERS_TIMEOUT_MS = 10_000;
const REQUEST_TIMEOUT_MS = 30_000;
/** How long close() waits for requests in progress before cutting their connections. */
const CLOSE_GRACE_MS = 5_000;

/** Errors caused by the request (or the configuration it carries): 400. */
const BAD_REQUEST_CODES = new Set([
  'VHOST_CONFIG_INVALID',
  'VHOST_API_BAD_JSON',
  'VHOST_API_BAD_ID',
  'VHOST_API_ID_MISMATCH',
  'VHOST_NET_BAD_MAC',
  'VHOST_BLK_BAD_SIZE',
  'VHOST_SOCKET_UNAVAILABLE',
  // an nbd disk whose server has no such export, or one this backend cannot serve
  'VHOST_NBD_EXPORT',
  'VHOST_NBD_BLOCK_SIZE',
  // a device's image path that cannot be opened
  'ENOENT',
  'EACCES',
  'EISDIR',
  'ENOTDIR',
  'ELOOP',
  'ENAMETOOLONG',
  'EROFS',
]);

/** The HTTP status of an error code. Unknown codes are the server's fault: 500. */
export function statusForCode(code: string): number {
  if (BAD_REQUEST_CODES.has(code) || code.endsWith('_BAD_OPTION')) return 400;
  switch (code) {
    case 'VHOST_DEVICE_NOT_FOUND':
    case 'VHOST_API_NOT_FOUND':
      return 404;
    case 'VHOST_API_METHOD_NOT_ALLOWED':
      return 405;
    case 'VHOST_DEVICE_EXISTS':
    case 'VHOST_SOCKET_IN_USE':
      return 409;
    case 'VHOST_API_BODY_TOO_LARGE':
      return 413;
    case 'VHOST_API_UNSUPPORTED_MEDIA_TYPE':
      return 415;
    case 'VHOST_DAEMON_CLOSED':
      return 503;
    default:
      // An nbd disk's server could not be reached or spoke badly (connect, handshake, TLS, timeout): upstream.
      return code.startsWith('VHOST_NBD_') ? 502 : 500;
  }
}

/** A request's failure, with what the response needs beyond the code. */
class ApiError extends VhostError {
  readonly headers: Record<string, string>;

  constructor(code: string, message: string, headers: Record<string, string> = {}) {
    super(code, message);
    this.name = 'ApiError';
    this.headers = headers;
  }
}

function errorCode(err: unknown): string {
  const code = (err as { code?: unknown } | null)?.code;
  return typeof code === 'string' && code !== '' ? code : 'VHOST_INTERNAL';
}

// ---- the socket file ----------------------------------------------------------------------------------------------

/** Whether something accepts connections on the unix socket at `path` (ECONNREFUSED: a stale socket). */
function probeSocket(path: string): Promise<'live' | 'stale'> {
  return new Promise((resolve, reject) => {
    const sock = connect(path);
    sock.once('connect', () => {
      sock.destroy();
      resolve('live');
    });
    sock.once('error', (err: NodeJS.ErrnoException) => {
      sock.destroy();
      if (err.code === 'ECONNREFUSED' || err.code === 'ENOENT') resolve('stale');
      else reject(new VhostError('VHOST_SOCKET_UNAVAILABLE', `cannot probe ${path}: ${err.message}`, { cause: err }));
    });
  });
}

/** Makes way for listening at `path`: nothing there, or a stale socket (removed). A live socket or any other file: VHOST_SOCKET_IN_USE. */
async function clearSocketPath(path: string): Promise<void> {
  let isSocket: boolean;
  try {
    isSocket = lstatSync(path).isSocket();
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return;
    throw new VhostError('VHOST_SOCKET_UNAVAILABLE', `cannot use ${path}: ${(err as Error).message}`, { cause: err });
  }
  if (!isSocket) throw new VhostError('VHOST_SOCKET_IN_USE', `${path} exists and is not a socket`);
  if ((await probeSocket(path)) === 'live') throw new VhostError('VHOST_SOCKET_IN_USE', `${path}: another server is listening on it`);
  try {
    unlinkSync(path);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'ENOENT') {
      throw new VhostError('VHOST_SOCKET_UNAVAILABLE', `cannot remove the stale socket ${path}: ${(err as Error).message}`, { cause: err });
    }
  }
}

function listen(server: Server, path: string): Promise<void> {
  return new Promise((resolve, reject) => {
    const onError = (err: NodeJS.ErrnoException): void => {
      reject(
        err.code === 'EADDRINUSE'
          ? new VhostError('VHOST_SOCKET_IN_USE', `${path} is in use`, { cause: err })
          : new VhostError('VHOST_SOCKET_UNAVAILABLE', `cannot listen on ${path}: ${err.message}`, { cause: err }),
      );
    };
    server.once('error', onError);
    server.listen(path, () => {
      server.off('error', onError);
      resolve();
    });
  });
}

// ---- requests -------------------------------------------------------------------------------------------------------

/** Reads the whole body, at most `limit` bytes: beyond that, stops reading and fails with VHOST_API_BODY_TOO_LARGE. */
function readBody(req: IncomingMessage, limit: number): Promise<Buffer> {
  const tooLarge = (): ApiError =>
    new ApiError('VHOST_API_BODY_TOO_LARGE', `the body is over ${limit} bytes`, { connection: 'close' });
  const declared = req.headers['content-length'];
  if (declared !== undefined && Number(declared) > limit) return Promise.reject(tooLarge());
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = [];
    let size = 0;
    const cleanup = (): void => {
      req.off('data', onData);
      req.off('end', onEnd);
      req.off('error', onError);
      req.off('close', onClose);
    };
    const onData = (chunk: Buffer): void => {
      size += chunk.length;
      if (size > limit) {
        cleanup();
        req.pause(); // the response closes the connection: the rest is never read
        reject(tooLarge());
        return;
      }
      chunks.push(chunk);
    };
    const onEnd = (): void => {
      cleanup();
      resolve(Buffer.concat(chunks, size));
    };
    const onError = (err: Error): void => {
      cleanup();
      reject(err);
    };
    const onClose = (): void => {
      cleanup();
      reject(new VhostError('VHOST_API_ABORTED', 'the client went away before the end of the body'));
    };
    req.on('data', onData);
    req.on('end', onEnd);
    req.on('error', onError);
    req.on('close', onClose);
  });
}

/** application/json, optionally with charset=utf-8; or no content-type at all. */
function acceptableContentType(header: string | undefined): boolean {
  if (header === undefined) return true;
  const [type, ...params] = header.split(';').map((p) => p.trim().toLowerCase());
  if (type !== 'application/json') return false;
  return params.every((p) => {
    const [name, value] = p.split('=').map((s) => s.trim());
    return name !== 'charset' || value === 'utf-8' || value === 'utf8' || value === '"utf-8"';
  });
}

function parseJson(body: Buffer): unknown {
  const text = body.toString('utf8');
  if (text.trim() === '') throw new ApiError('VHOST_API_BAD_JSON', 'the body is empty: one device as JSON was expected');
  try {
    return JSON.parse(text);
  } catch (err) {
    throw new ApiError('VHOST_API_BAD_JSON', `the body is not valid JSON: ${(err as Error).message}`);
  }
}

function isRecord(value: unknown): value is Record<string, unknown> {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}

type Route = { kind: 'devices' } | { kind: 'device'; id: string } | { kind: 'metrics' };

const ALLOWED: Record<Route['kind'], readonly string[]> = {
  devices: ['GET', 'HEAD'],
  device: ['GET', 'HEAD', 'PUT', 'DELETE'],
  metrics: ['GET', 'HEAD'],
};

function route(url: string): Route {
  const path = url.split('?', 1)[0] as string;
  if (path === '/devices') return { kind: 'devices' };
  if (path === '/metrics') return { kind: 'metrics' };
  const m = /^\/devices\/([^/]+)$/.exec(path);
  if (m === null) throw new ApiError('VHOST_API_NOT_FOUND', `no route ${path}`);
  let id: string;
  try {
    id = decodeURIComponent(m[1] as string);
  } catch {
    throw new ApiError('VHOST_API_BAD_ID', 'the device id is not valid percent-encoding');
  }
  if (!DEVICE_ID_PATTERN.test(id)) {
    throw new ApiError('VHOST_API_BAD_ID', `invalid device id ${JSON.stringify(id)}: 1..64 letters, digits, ".", "_" or "-"`);
  }
  return { kind: 'device', id };
}

function send(res: ServerResponse, status: number, body: string | undefined, headers: Record<string, string>): void {
  if (res.headersSent || res.destroyed) return;
  const bytes = body === undefined ? undefined : Buffer.from(body);
  res.writeHead(status, { ...headers, ...(bytes !== undefined ? { 'content-length': String(bytes.length) } : {}) });
  res.end(bytes);
}

function sendJson(res: ServerResponse, status: number, value: unknown, headers: Record<string, string> = {}): void {
  send(res, status, `${JSON.stringify(value)}\n`, { 'content-type': 'application/json; charset=utf-8', ...headers });
}

/**
 * Serves the management API on `socketPath` (mode 0600). A stale socket file there is replaced; a live socket or
 * another file is VHOST_SOCKET_IN_USE; a path where no socket can be created, VHOST_SOCKET_UNAVAILABLE.
 */
export async function startApiServer(control: DaemonControl, socketPath: string, log: Logger): Promise<ApiServer> {
  const handle = async (req: IncomingMessage, res: ServerResponse, r: Route): Promise<void> => {
    const method = req.method ?? '';
    const allowed = ALLOWED[r.kind];
    if (!allowed.includes(method)) {
      throw new ApiError('VHOST_API_METHOD_NOT_ALLOWED', `${method} is not allowed on ${req.url ?? ''}`, {
        allow: allowed.join(', '),
      });
    }
    switch (r.kind) {
      case 'devices':
        sendJson(res, 200, { devices: control.list() });
        return;
      case 'metrics': {
        const text = await control.metrics();
        send(res, 200, text, { 'content-type': control.metricsContentType });
        return;
      }
      case 'device':
        break;
    }
    const { id } = r;
    if (method === 'GET' || method === 'HEAD') {
      const info = control.get(id);
      if (info === undefined) throw new ApiError('VHOST_DEVICE_NOT_FOUND', `no device ${JSON.stringify(id)}`);
      sendJson(res, 200, info);
    } else if (method === 'DELETE') {
      if (!(await control.remove(id))) throw new ApiError('VHOST_DEVICE_NOT_FOUND', `no device ${JSON.stringify(id)}`);
      send(res, 204, undefined, {});
    } else {
      if (!acceptableContentType(req.headers['content-type'])) {
        throw new ApiError('VHOST_API_UNSUPPORTED_MEDIA_TYPE', `content-type ${req.headers['content-type'] ?? ''}: application/json expected`);
      }
      const body = parseJson(await readBody(req, MAX_BODY_BYTES));
      if (isRecord(body) && body.id !== undefined && body.id !== id) {
        throw new ApiError('VHOST_API_ID_MISMATCH', `the body's id ${JSON.stringify(body.id)} is not the path's id ${JSON.stringify(id)}`);
      }
      const config = parseDeviceConfig(isRecord(body) ? { id, ...body } : body);
      const info = await control.add(config);
      sendJson(res, 201, info, { location: `/devices/${encodeURIComponent(id)}` });
    }
  };

  const onRequest = (req: IncomingMessage, res: ServerResponse): void => {
    const started = performance.now();
    const method = req.method ?? '';
    const url = req.url ?? '';
    if (closing !== undefined) res.shouldKeepAlive = false;
    res.once('finish', () => {
      log.debug({ method, url, status: res.statusCode, ms: Math.round((performance.now() - started) * 10) / 10 }, 'api request');
      // A connection kept alive through close(): let it go as soon as its request is answered.
      if (closing !== undefined) setImmediate(() => server.closeIdleConnections());
    });
    const run = async (): Promise<void> => handle(req, res, route(url));
    run().catch((err: unknown) => {
      const code = errorCode(err);
      if (req.socket.destroyed) {
        log.debug({ method, url, code }, 'api client went away');
        return;
      }
      const status = statusForCode(code);
      const message = err instanceof Error ? err.message : String(err);
      if (status >= 500) log.error({ err, method, url, status, code }, 'api request failed');
      else log.warn({ method, url, status, code, error: message }, 'api request failed');
      const error: Record<string, unknown> = { code, message };
      if (err instanceof ConfigError) error.issues = err.issues;
      sendJson(res, status, { error }, err instanceof ApiError ? err.headers : {});
    });
  };

  let closing: Promise<void> | undefined;
  await clearSocketPath(socketPath);
  const server = createServer({ headersTimeout: HEADERS_TIMEOUT_MS, requestTimeout: REQUEST_TIMEOUT_MS }, onRequest);
  await listen(server, socketPath);
  let ino: number;
  try {
    chmodSync(socketPath, 0o600);
    ino = statSync(socketPath).ino;
  } catch (err) {
    await new Promise<void>((resolve) => server.close(() => resolve()));
    throw new VhostError('VHOST_SOCKET_UNAVAILABLE', `cannot set up ${socketPath}: ${(err as Error).message}`, { cause: err });
  }
  server.on('error', (err) => log.error({ err }, 'api server error'));
  log.info({ socket: socketPath }, 'management API listening');

  return {
    socketPath,
    close(): Promise<void> {
      closing ??= (async () => {
        const closed = new Promise<void>((resolve) => server.close(() => resolve()));
        server.closeIdleConnections();
        const cut = setTimeout(() => server.closeAllConnections(), CLOSE_GRACE_MS);
        cut.unref();
        await closed;
        clearTimeout(cut);
        try {
          // Only our own socket: another server may have taken the path since.
          if (statSync(socketPath).ino === ino) unlinkSync(socketPath);
        } catch {
          // already gone
        }
      })();
      return closing;
    },
  };
}

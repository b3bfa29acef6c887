/**
 * "Hybrid vsock": the unix-socket convention of Firecracker, Cloud Hypervisor and vhost-device-vsock, by which host
 * programs reach the guest without AF_VSOCK.
 *
 * - Host to guest: a program connects to the unix socket `udsPath` and writes "CONNECT <port>\n" (the guest's port;
 *   the keyword in any case, at most CONNECT_LINE_MAX bytes with the newline). Once the guest accepted, the backend
 *   answers "OK <host port>\n" (the port the connection has on our side) and from then on the bytes flow both ways.
 *   Anything else, or the guest refusing, closes the socket. Bytes the program wrote after the newline (without
 *   waiting for the answer) are the connection's first bytes, not lost.
 * - Guest to host: a guest connecting to host port P reaches the unix socket `${udsPath}_${P}`, which some program
 *   listens on; no such socket (ENOENT, ECONNREFUSED, ...) answers the guest with RST.
 *
 * Unix sockets here are half-open capable (allowHalfOpen): a program's end of writing is the guest's end of reading
 * (SHUTDOWN SEND), and the guest's SHUTDOWN SEND is our end() of the socket.
 */
import { lstatSync, unlinkSync } from 'node:fs';
import { createConnection, createServer, type Server, type Socket } from 'node:net';
import type { VhostError } from '../../errors.js';
import type { HostSide, VsockEndpoint } from './host.js';

/** Longest CONNECT line accepted, newline included (bytes). */
export const CONNECT_LINE_MAX = 64;
/** How long a program may take to send its CONNECT line. */
export const CONNECT_LINE_TIMEOUT_MS = 10_000;
/** After a clean close, how long the rest of what was written to a unix socket may take to drain. */
export const UNIX_FINISH_LINGER_MS = 5_000;

const CONNECT_RE = /^connect[ \t]+(\d{1,10})[ \t]*\r?$/i;

/** The port of a "CONNECT <port>" line (without its newline), or undefined if it is anything else. */
export function parseConnectLine(line: string): number | undefined {
  const m = CONNECT_RE.exec(line);
  if (m === null) return undefined;
  const port = Number(m[1]);
  return port <= 0xffff_ffff ? port : undefined;
}

/** The unix socket a guest connection to host port `port` goes to. */
export function hybridPortPath(udsPath: string, port: number): string {
  return `${udsPath}_${port}`;
}

/**
 * The unix listener at `path`: accepts programs, reads their CONNECT line, hands the socket (paused), the guest port
 * and the bytes that followed the line to `onConnect`. A stale socket file at `path` is replaced.
 */
export class HybridListener {
  /** Resolves once listening; rejects (never unhandled) if the path cannot be listened on. */
  readonly listening: Promise<void>;
  readonly #server: Server;
  /** Sockets still sending their CONNECT line. */
  readonly #handshaking = new Set<Socket>();
  #closed = false;

  constructor(path: string, onConnect: (socket: Socket, port: number, rest: Buffer) => void) {
    removeStaleSocket(path);
    this.#server = createServer({ allowHalfOpen: true }, (socket) => this.#accept(socket, onConnect));
    this.listening = new Promise<void>((resolve, reject) => {
      this.#server.once('listening', resolve);
      this.#server.once('error', reject);
    });
    this.listening.catch(() => {});
    this.#server.on('error', () => {}); // after listening: nothing a caller could do; the server keeps serving
    this.#server.listen(path);
  }

  /** Stops listening (the socket file is removed) and closes the sockets still in their CONNECT line. */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    this.#server.close();
    for (const socket of this.#handshaking) socket.destroy();
    this.#handshaking.clear();
  }

  #accept(socket: Socket, onConnect: (socket: Socket, port: number, rest: Buffer) => void): void {
    if (this.#closed) {
      socket.destroy();
      return;
    }
    this.#handshaking.add(socket);
    let got: Buffer = Buffer.alloc(0);
    const done = (): void => {
      this.#handshaking.delete(socket);
      socket.setTimeout(0);
      socket.off('data', onData);
      socket.off('end', fail);
      socket.off('timeout', fail);
    };
    const fail = (): void => {
      done();
      socket.destroy();
    };
    const onData = (chunk: Buffer): void => {
      got = got.length === 0 ? chunk : Buffer.concat([got, chunk]);
      const nl = got.indexOf(0x0a);
      if (nl < 0) {
        if (got.length >= CONNECT_LINE_MAX) fail();
        return;
      }
      if (nl + 1 > CONNECT_LINE_MAX) return fail();
      const port = parseConnectLine(got.toString('latin1', 0, nl));
      if (port === undefined) return fail();
      socket.pause();
      done();
      onConnect(socket, port, got.subarray(nl + 1));
    };
    socket.on('error', () => {}); // 'close' follows; the connection's own handlers take over after the line
    socket.once('close', () => this.#handshaking.delete(socket));
    socket.on('data', onData);
    socket.on('end', fail);
    socket.on('timeout', fail);
    socket.setTimeout(CONNECT_LINE_TIMEOUT_MS);
  }
}

function removeStaleSocket(path: string): void {
  try {
    if (lstatSync(path).isSocket()) unlinkSync(path);
  } catch {
    // nothing there (or not ours to remove: listen reports it)
  }
}

/**
 * Connects to the unix socket `path`; `callback` gets the connected socket (paused, half-open capable) or the error.
 * The socket is returned at once so that the attempt can be abandoned (destroy(): the callback is not called).
 */
export function connectUnix(path: string, callback: (err: Error | undefined, socket: Socket | undefined) => void): Socket {
  const socket = createConnection({ path, allowHalfOpen: true });
  const onError = (err: Error): void => {
    socket.destroy();
    callback(err, undefined);
  };
  socket.once('error', onError);
  socket.once('connect', () => {
    socket.off('error', onError);
    socket.pause();
    callback(undefined, socket);
  });
  return socket;
}

/**
 * A unix socket as a connection's host side. Reading is paused while bytes wait to go to the guest (the host decides,
 * through setReading); guest bytes count as consumed once written to the socket (its write callback: handed to the
 * kernel), so a program that does not read stops the guest.
 */
export class UnixSide implements HostSide {
  readonly #socket: Socket;
  readonly #endpoint: VsockEndpoint;
  #reading = false;

  /** `socket` is paused; it stays so until setReading(true). */
  constructor(socket: Socket, endpoint: VsockEndpoint) {
    this.#socket = socket;
    this.#endpoint = endpoint;
    socket.pause();
    socket.on('data', (chunk: Buffer) => endpoint.send(chunk));
    socket.on('end', () => endpoint.sendEnd());
    socket.on('error', () => {}); // 'close' follows
    socket.on('close', () => endpoint.gone());
  }

  /** Answers the program that sent CONNECT: the guest accepted, the connection has host port `port`. */
  sendOk(port: number): void {
    if (!this.#socket.destroyed) this.#socket.write(`OK ${port}\n`);
  }

  deliver(bytes: Buffer): void {
    const socket = this.#socket;
    if (socket.destroyed || socket.writableEnded) return;
    socket.write(bytes, (err) => {
      if (err == null) this.#endpoint.consumed(bytes.length);
    });
  }

  deliverEnd(): void {
    if (!this.#socket.destroyed) this.#socket.end();
  }

  setReading(on: boolean): void {
    if (on === this.#reading) return;
    this.#reading = on;
    if (on) this.#socket.resume();
    else this.#socket.pause();
  }

  finish(): void {
    const socket = this.#socket;
    if (socket.destroyed) return;
    if (socket.writableLength === 0) {
      socket.destroy(); // what was written is in the kernel: the program reads it, then EOF
      return;
    }
    const timer = setTimeout(() => socket.destroy(), UNIX_FINISH_LINGER_MS);
    timer.unref();
    socket.once('close', () => clearTimeout(timer));
    socket.end(() => socket.destroy());
  }

  abort(_err: VhostError): void {
    this.#socket.destroy();
  }
}

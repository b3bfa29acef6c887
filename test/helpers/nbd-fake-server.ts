/**
 * A scriptable NBD server in the test process, on a unix socket: a correct fixed-newstyle handshake (NBD_OPT_GO with
 * NBD_INFO_EXPORT, STRUCTURED_REPLY when asked and enabled), then every request is handed to `respond`, which writes
 * whatever bytes it likes, hostile or not. The wire helpers build replies by the spec.
 */
import { createServer, type Server, type Socket } from 'node:net';
import { NbdCmd, NbdFlag, NbdMagic, NbdOpt, NbdRep, NbdTransmissionMagic } from '../../src/devices/blk/nbd/constants.js';

export interface FakeRequest {
  readonly flags: number;
  readonly type: number;
  /** The cookie's 8 bytes as sent. */
  readonly cookie: Buffer;
  readonly offset: number;
  readonly length: number;
  /** The payload of a write. */
  readonly data: Buffer | undefined;
}

export interface FakeServerOptions {
  path: string;
  size: number;
  /** Transmission flags beyond HAS_FLAGS (default SEND_FLUSH | SEND_FUA | SEND_TRIM | SEND_WRITE_ZEROES). */
  flags?: number;
  /** Agree to NBD_OPT_STRUCTURED_REPLY (default true). */
  structuredReplies?: boolean;
  respond(req: FakeRequest, socket: Socket, structured: boolean): void;
}

export interface FakeServer {
  readonly connections: number;
  close(): Promise<void>;
}

function optionReply(option: number, type: number, data: Buffer = Buffer.alloc(0)): Buffer {
  const h = Buffer.alloc(20);
  h.writeBigUInt64BE(NbdMagic.OPTION_REPLY, 0);
  h.writeUInt32BE(option, 8);
  h.writeUInt32BE(type >>> 0, 12);
  h.writeUInt32BE(data.length, 16);
  return Buffer.concat([h, data]);
}

/** A simple reply header (and `data` after it). */
export function simpleReply(cookie: Buffer, error: number, data?: Buffer): Buffer {
  const h = Buffer.alloc(16);
  h.writeUInt32BE(NbdTransmissionMagic.SIMPLE_REPLY, 0);
  h.writeUInt32BE(error, 4);
  cookie.copy(h, 8);
  return data === undefined ? h : Buffer.concat([h, data]);
}

/** A structured reply chunk. */
export function chunk(cookie: Buffer, type: number, done: boolean, payload: Buffer): Buffer {
  const h = Buffer.alloc(20);
  h.writeUInt32BE(NbdTransmissionMagic.STRUCTURED_REPLY, 0);
  h.writeUInt16BE(done ? 1 : 0, 4);
  h.writeUInt16BE(type, 6);
  cookie.copy(h, 8);
  h.writeUInt32BE(payload.length, 16);
  return Buffer.concat([h, payload]);
}

/** An OFFSET_DATA chunk's payload. */
export function offsetData(offset: number, data: Buffer): Buffer {
  const h = Buffer.alloc(8);
  h.writeBigUInt64BE(BigInt(offset));
  return Buffer.concat([h, data]);
}

/** An ERROR chunk's payload. */
export function errorPayload(errno: number, message = ''): Buffer {
  const h = Buffer.alloc(6);
  h.writeUInt32BE(errno);
  h.writeUInt16BE(Buffer.byteLength(message), 4);
  return Buffer.concat([h, Buffer.from(message)]);
}

export function startFakeNbdServer(o: FakeServerOptions): Promise<FakeServer> {
  const sockets = new Set<Socket>();
  let connections = 0;
  const flags = NbdFlag.HAS_FLAGS | (o.flags ?? NbdFlag.SEND_FLUSH | NbdFlag.SEND_FUA | NbdFlag.SEND_TRIM | NbdFlag.SEND_WRITE_ZEROES);
  const server: Server = createServer((socket) => {
    connections++;
    sockets.add(socket);
    socket.on('close', () => sockets.delete(socket));
    socket.on('error', () => undefined);
    let buf = Buffer.alloc(0);
    let phase: 'flags' | 'options' | 'transmission' = 'flags';
    let structured = false;
    const greeting = Buffer.alloc(18);
    greeting.writeBigUInt64BE(NbdMagic.INIT_PASSWD, 0);
    greeting.writeBigUInt64BE(NbdMagic.IHAVEOPT, 8);
    greeting.writeUInt16BE(3, 16); // FIXED_NEWSTYLE | NO_ZEROES
    socket.write(greeting);
    socket.on('data', (data: Buffer) => {
      buf = Buffer.concat([buf, data]);
      for (;;) {
        if (phase === 'flags') {
          if (buf.length < 4) return;
          buf = buf.subarray(4);
          phase = 'options';
        } else if (phase === 'options') {
          if (buf.length < 16) return;
          const len = buf.readUInt32BE(12);
          if (buf.length < 16 + len) return;
          const option = buf.readUInt32BE(8);
          buf = buf.subarray(16 + len);
          if (option === NbdOpt.STRUCTURED_REPLY && o.structuredReplies !== false) {
            structured = true;
            socket.write(optionReply(option, NbdRep.ACK));
          } else if (option === NbdOpt.GO) {
            const info = Buffer.alloc(12);
            info.writeUInt16BE(0, 0); // NBD_INFO_EXPORT
            info.writeBigUInt64BE(BigInt(o.size), 2);
            info.writeUInt16BE(flags, 10);
            socket.write(Buffer.concat([optionReply(option, NbdRep.INFO, info), optionReply(option, NbdRep.ACK)]));
            phase = 'transmission';
          } else {
            socket.write(optionReply(option, NbdRep.ERR_UNSUP));
          }
        } else {
          if (buf.length < 28) return;
          const type = buf.readUInt16BE(6);
          const length = buf.readUInt32BE(24);
          const payload = type === NbdCmd.WRITE ? length : 0;
          if (buf.length < 28 + payload) return;
          const req: FakeRequest = {
            flags: buf.readUInt16BE(4),
            type,
            cookie: Buffer.from(buf.subarray(8, 16)),
            offset: Number(buf.readBigUInt64BE(16)),
            length,
            data: payload > 0 ? Buffer.from(buf.subarray(28, 28 + payload)) : undefined,
          };
          buf = buf.subarray(28 + payload);
          if (type === NbdCmd.DISC) {
            socket.end();
            return;
          }
          o.respond(req, socket, structured);
          if (socket.destroyed) return;
        }
      }
    });
  });
  return new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(o.path, () =>
      resolve({
        get connections() {
          return connections;
        },
        close: () =>
          new Promise<void>((done) => {
            for (const s of sockets) s.destroy();
            server.close(() => done());
          }),
      }),
    );
  });
}

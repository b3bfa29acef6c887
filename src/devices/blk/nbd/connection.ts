/**
 * One NBD connection in transmission phase (spec "Transmission"): requests go out as they are submitted, replies
 * come back in any order and are matched by cookie (the spec's "handle").
 *
 * Request (28 bytes):  u32 0x25609513, u16 command flags, u16 type, u64 cookie, u64 offset, u32 length [, data]
 * Simple reply (16):   u32 0x67446698, u32 error, u64 cookie [, read data when error is 0]
 * Structured chunk:    u32 0x668e33ef, u16 flags, u16 type, u64 cookie, u32 length, payload
 *
 * Everything the server sends is hostile input. Replies are parsed by a state machine over the socket's chunks; fixed
 * fields are read in place, or gathered in a small scratch buffer when they straddle two chunks; read data is copied
 * from the socket's chunks straight into the request's buffers, after its range has been checked against the
 * request. Anything the spec forbids ends the connection at once (the socket is destroyed, then `onClose` gets a
 * VHOST_NBD_PROTOCOL error and every request not yet done); from then on no request's buffers are touched.
 */
import type { Socket } from 'node:net';
import { VhostError } from '../../../errors.js';
import {
  NBD_REPLY_TYPE_ERROR_BIT,
  NbdCmd,
  NbdCmdFlag,
  NbdReplyFlag,
  NbdReplyType,
  NbdSize,
  NbdTransmissionMagic,
} from './constants.js';
import { NBD_MAX_REQUEST, type NbdExportInfo } from './handshake.js';

export type NbdCommand = 'read' | 'write' | 'flush' | 'trim' | 'write-zeroes';

export interface NbdRequest {
  command: NbdCommand;
  /** Bytes. */
  offset: number;
  /** Bytes; 0 for flush. */
  length: number;
  /**
   * read: where the data goes, write: where it comes from; the buffers' lengths add up to `length`.
   * Often views of a SharedArrayBuffer (guest memory). Empty for the other commands.
   */
  buffers: readonly Uint8Array[];
  /** write / write-zeroes / trim with NBD_CMD_FLAG_FUA (only if info.canFua). */
  fua?: boolean;
  /** write-zeroes with NBD_CMD_FLAG_NO_HOLE. */
  noHole?: boolean;
  /**
   * Called once when the server answered: 0, or the server's NBD error number (NbdErrno). Never called for
   * a request handed back by `onClose`.
   */
  done(error: number): void;
}

/** Largest structured chunk payload accepted: a 32 MiB read's data plus OFFSET_DATA's 8-byte offset. */
export const NBD_MAX_CHUNK_PAYLOAD = NBD_MAX_REQUEST + 8;
/** How long close() waits for NBD_CMD_DISC to be flushed before destroying the socket. */
export const NBD_DISC_GRACE_MS = 1000;

const TWO_32 = 2 ** 32;

/** Parser states. */
const S = {
  /** The 4-byte magic of the next reply. */
  MAGIC: 0,
  /** The rest of a simple reply header (12 bytes). */
  SIMPLE_HEADER: 1,
  /** A simple read reply's data. */
  SIMPLE_DATA: 2,
  /** The rest of a structured chunk header (16 bytes). */
  CHUNK_HEADER: 3,
  /** OFFSET_DATA's offset (8 bytes). */
  DATA_OFFSET: 4,
  /** OFFSET_DATA's data. */
  CHUNK_DATA: 5,
  /** OFFSET_HOLE's offset and size (12 bytes). */
  HOLE: 6,
  /** An error chunk's error and message length (6 bytes). */
  ERROR_HEAD: 7,
  /** ERROR_OFFSET's offset (8 bytes), after the message. */
  ERROR_OFFSET_TAIL: 8,
  /** Payload bytes to skip (error messages); then #afterSkip. */
  SKIP: 9,
} as const;
type State = (typeof S)[keyof typeof S];

/** A submitted request until it is done or handed back. */
interface Pending {
  readonly cookie: number;
  readonly req: NbdRequest;
  readonly cmd: number;
  readonly offset: number;
  readonly length: number;
  /** Read bytes covered by content chunks so far. */
  covered: number;
  /** The first error of an error chunk (0: none). */
  error: number;
  /** A structured chunk arrived for it (a simple reply is then a violation). */
  structured: boolean;
}

/** Copies src[start, end) into the scatter list `buffers` at logical offset `at`; never writes outside them. */
export function copyToScatter(buffers: readonly Uint8Array[], at: number, src: Uint8Array, start: number, end: number): void {
  let base = 0;
  for (let i = 0; i < buffers.length && start < end; i++) {
    const buf = buffers[i]!;
    const bufEnd = base + buf.length;
    if (at < bufEnd) {
      const into = at - base;
      const n = Math.min(buf.length - into, end - start);
      buf.set(src.subarray(start, start + n), into);
      start += n;
      at += n;
    }
    base = bufEnd;
  }
}

/** Zeroes `length` bytes of the scatter list `buffers` from logical offset `at`; never writes outside them. */
export function zeroScatter(buffers: readonly Uint8Array[], at: number, length: number): void {
  let base = 0;
  for (let i = 0; i < buffers.length && length > 0; i++) {
    const buf = buffers[i]!;
    const bufEnd = base + buf.length;
    if (at < bufEnd) {
      const into = at - base;
      const n = Math.min(buf.length - into, length);
      buf.fill(0, into, into + n);
      length -= n;
      at += n;
    }
    base = bufEnd;
  }
}

function badRequest(message: string): VhostError {
  return new VhostError('VHOST_NBD_BAD_REQUEST', message);
}

export class NbdConnection {
  readonly #socket: Socket;
  readonly #info: NbdExportInfo;
  readonly #onClose: (reason: VhostError, unfinished: NbdRequest[]) => void;
  readonly #pending = new Map<number, Pending>();
  #nextCookie = 1;
  #closed = false;

  // Parser.
  #state: State = S.MAGIC;
  /** Bytes the current fixed field needs, and how many of them are gathered in #scratch. */
  #need = 4;
  #have = 0;
  readonly #scratch = Buffer.alloc(16);
  /** Where a complete fixed field can be read: the socket chunk itself, or #scratch. */
  #src: Buffer = this.#scratch;
  #srcAt = 0;
  /** The request the reply being parsed belongs to. */
  #cur: Pending | undefined;
  #chunkFlags = 0;
  #chunkType = 0;
  /** Payload bytes of the current chunk not parsed yet. */
  #chunkLeft = 0;
  /** Data being copied: logical offset in the request's buffers, and bytes left. */
  #dataAt = 0;
  #dataLeft = 0;
  #skipLeft = 0;
  #afterSkip: State = S.MAGIC;

  constructor(
    socket: Socket,
    info: NbdExportInfo,
    leftover: Buffer,
    onClose: (reason: VhostError, unfinished: NbdRequest[]) => void,
  ) {
    this.#socket = socket;
    this.#info = info;
    this.#onClose = onClose;
    socket.on('data', this.#onData);
    socket.on('error', this.#onError);
    socket.on('end', this.#onEnd);
    socket.on('close', this.#onEnd);
    // Reported after the constructor returns, so that onClose never sees a half-built connection.
    if (leftover.length > 0) {
      const n = leftover.length;
      queueMicrotask(() => this.#violation(`the server sent ${n} bytes before any request`));
    } else if (socket.destroyed) {
      queueMicrotask(() => this.#shutdown(new VhostError('VHOST_NBD_CLOSED', 'the NBD socket was closed before the connection started')));
    }
    socket.resume();
  }

  get inFlight(): number {
    return this.#pending.size;
  }

  /** Whether onClose has been called (or close() was). */
  get closed(): boolean {
    return this.#closed;
  }

  /**
   * Sends the request (writes: header and data from `buffers` without copying them: socket.write of the views,
   * cork/uncork around header + data). Throws VhostError 'VHOST_NBD_CLOSED' if closed. Validates the request
   * against info (range inside size, offset and length multiples of minBlock, 0 < length <= maxBlock, command and
   * flags supported, buffers adding up to length: else throws VHOST_NBD_BAD_REQUEST). Writes to a read-only export
   * are sent: the server answers them with EPERM.
   */
  submit(req: NbdRequest): void {
    if (this.#closed) throw new VhostError('VHOST_NBD_CLOSED', 'the NBD connection is closed');
    const info = this.#info;
    let cmd: number;
    switch (req.command) {
      case 'read':
        cmd = NbdCmd.READ;
        break;
      case 'write':
        cmd = NbdCmd.WRITE;
        break;
      case 'flush':
        if (!info.canFlush) throw badRequest('the server does not support flush');
        cmd = NbdCmd.FLUSH;
        break;
      case 'trim':
        if (!info.canTrim) throw badRequest('the server does not support trim');
        cmd = NbdCmd.TRIM;
        break;
      case 'write-zeroes':
        if (!info.canWriteZeroes) throw badRequest('the server does not support write-zeroes');
        cmd = NbdCmd.WRITE_ZEROES;
        break;
      default:
        throw badRequest(`unknown command ${String((req as { command: unknown }).command)}`);
    }
    const { offset, length } = req;
    if (!Number.isSafeInteger(offset) || offset < 0 || !Number.isSafeInteger(length) || length < 0) {
      throw badRequest(`${req.command}: offset ${offset} and length ${length} must be non-negative integers`);
    }
    if (cmd === NbdCmd.FLUSH) {
      if (offset !== 0 || length !== 0) throw badRequest('flush: offset and length must be 0');
    } else {
      if (length === 0) throw badRequest(`${req.command}: length 0`);
      if (length > info.maxBlock) throw badRequest(`${req.command}: length ${length} is over the maximum ${info.maxBlock}`);
      if (offset > info.size - length) {
        throw badRequest(`${req.command}: [${offset}, ${offset + length}) is outside the export (${info.size} bytes)`);
      }
      if (offset % info.minBlock !== 0 || length % info.minBlock !== 0) {
        throw badRequest(`${req.command}: offset ${offset} and length ${length} must be multiples of ${info.minBlock}`);
      }
    }
    const buffers = req.buffers;
    if (cmd === NbdCmd.READ || cmd === NbdCmd.WRITE) {
      let total = 0;
      for (const b of buffers) {
        if (!(b instanceof Uint8Array)) throw badRequest(`${req.command}: buffers must be Uint8Arrays`);
        total += b.length;
      }
      if (total !== length) throw badRequest(`${req.command}: buffers hold ${total} bytes, length is ${length}`);
    } else if (buffers.length !== 0) {
      throw badRequest(`${req.command}: takes no buffers`);
    }
    let flags = 0;
    if (req.fua === true) {
      if (!info.canFua) throw badRequest('the server does not support FUA');
      if (cmd !== NbdCmd.WRITE && cmd !== NbdCmd.WRITE_ZEROES && cmd !== NbdCmd.TRIM) {
        throw badRequest(`${req.command}: FUA is for write, write-zeroes and trim`);
      }
      flags |= NbdCmdFlag.FUA;
    }
    if (req.noHole === true) {
      if (cmd !== NbdCmd.WRITE_ZEROES) throw badRequest(`${req.command}: noHole is for write-zeroes`);
      flags |= NbdCmdFlag.NO_HOLE;
    }
    if (typeof req.done !== 'function') throw badRequest(`${req.command}: done must be a function`);

    const cookie = this.#nextCookie++;
    const header = Buffer.allocUnsafe(NbdSize.REQUEST);
    writeRequestHeader(header, flags, cmd, cookie, offset, length);
    this.#pending.set(cookie, { cookie, req, cmd, offset, length, covered: 0, error: 0, structured: false });
    const socket = this.#socket;
    if (cmd === NbdCmd.WRITE) {
      socket.cork();
      socket.write(header);
      for (const b of buffers) if (b.length > 0) socket.write(b);
      socket.uncork();
    } else {
      socket.write(header);
    }
  }

  /**
   * Sends NBD_CMD_DISC when idle, then ends the socket (destroyed once that is flushed, or after
   * NBD_DISC_GRACE_MS); with requests in flight the socket is destroyed at once. In any case onClose is called
   * with what was unfinished (code VHOST_NBD_CLOSED). Idempotent.
   */
  close(): void {
    if (this.#closed) return;
    const socket = this.#socket;
    if (this.#pending.size === 0 && !socket.destroyed && socket.writable) {
      this.#closed = true;
      const disc = Buffer.allocUnsafe(NbdSize.REQUEST);
      writeRequestHeader(disc, 0, NbdCmd.DISC, this.#nextCookie++, 0, 0);
      const timer = setTimeout(() => socket.destroy(), NBD_DISC_GRACE_MS);
      timer.unref();
      socket.once('close', () => clearTimeout(timer));
      socket.end(disc, () => socket.destroy());
      this.#onClose(new VhostError('VHOST_NBD_CLOSED', 'the NBD connection was closed by the client'), []);
      return;
    }
    this.#shutdown(new VhostError('VHOST_NBD_CLOSED', 'the NBD connection was closed by the client'));
  }

  // ------------------------------------------------------------------------------------------ events

  readonly #onError = (err: Error): void => {
    this.#shutdown(new VhostError('VHOST_NBD_CLOSED', `NBD connection error: ${err.message}`, { cause: err }));
  };

  readonly #onEnd = (): void => {
    this.#shutdown(new VhostError('VHOST_NBD_CLOSED', 'the NBD server closed the connection'));
  };

  /** Destroys the socket, then hands every request not done to onClose. Only the first call does anything. */
  #shutdown(reason: VhostError): void {
    if (this.#closed) return;
    this.#closed = true;
    this.#socket.destroy();
    const unfinished: NbdRequest[] = [];
    for (const p of this.#pending.values()) unfinished.push(p.req);
    this.#pending.clear();
    this.#cur = undefined;
    this.#onClose(reason, unfinished);
  }

  #violation(what: string): void {
    this.#shutdown(new VhostError('VHOST_NBD_PROTOCOL', `NBD server protocol violation: ${what}`));
  }

  #complete(p: Pending, error: number): void {
    this.#pending.delete(p.cookie);
    try {
      p.req.done(error);
    } catch (err) {
      // The parser's state is already consistent: keep going, and let the bug surface as an uncaught exception.
      queueMicrotask(() => {
        throw err;
      });
    }
  }

  /** Starts a fixed field of `need` bytes, read in state `state`. */
  #expect(state: State, need: number): void {
    this.#state = state;
    this.#need = need;
    this.#have = 0;
  }

  /** Skips `n` payload bytes, then continues in `after` (at once when n is 0). */
  #skip(n: number, after: State): void {
    if (n === 0) {
      this.#afterSkip = after;
      this.#endSkip();
      return;
    }
    this.#state = S.SKIP;
    this.#skipLeft = n;
    this.#afterSkip = after;
  }

  #endSkip(): void {
    if (this.#afterSkip === S.ERROR_OFFSET_TAIL) {
      this.#expect(S.ERROR_OFFSET_TAIL, 8);
    } else {
      this.#endChunk();
    }
  }

  /**
   * Makes the current fixed field available at #src[#srcAt ..]: in place when it lies inside `chunk`, else gathered
   * into #scratch across chunks. Returns the new position in `chunk`; the field is complete when #have is 0 after
   * the call and the position moved by the missing bytes (see #ready).
   */
  #take(chunk: Buffer, pos: number): number {
    const need = this.#need;
    if (this.#have === 0 && chunk.length - pos >= need) {
      this.#src = chunk;
      this.#srcAt = pos;
      this.#have = need;
      return pos + need;
    }
    const n = Math.min(need - this.#have, chunk.length - pos);
    chunk.copy(this.#scratch, this.#have, pos, pos + n);
    this.#have += n;
    this.#src = this.#scratch;
    this.#srcAt = 0;
    return pos + n;
  }

  #ready(): boolean {
    return this.#have === this.#need;
  }

  /** After a chunk's payload has been parsed: the reply is complete if the chunk had NBD_REPLY_FLAG_DONE. */
  #endChunk(): void {
    const p = this.#cur!;
    this.#state = S.MAGIC;
    this.#need = 4;
    this.#have = 0;
    this.#cur = undefined;
    if ((this.#chunkFlags & NbdReplyFlag.DONE) === 0) return;
    if (p.covered > p.length) {
      this.#violation(`reply to cookie ${p.cookie} covers ${p.covered} bytes of a ${p.length}-byte read`);
      return;
    }
    if (p.error !== 0) {
      this.#complete(p, p.error);
      return;
    }
    if (p.cmd === NbdCmd.READ && p.covered !== p.length) {
      this.#violation(`read (cookie ${p.cookie}) done with ${p.covered} of ${p.length} bytes and no error`);
      return;
    }
    this.#complete(p, 0);
  }

  /** Checks that [off, off + n) lies inside the request `p`'s range; a violation otherwise. */
  #inRange(p: Pending, off: number, n: number, what: string): boolean {
    if (off >= p.offset && n <= p.length && off - p.offset <= p.length - n) return true;
    this.#violation(`${what} [${off}, ${off + n}) outside the request [${p.offset}, ${p.offset + p.length}) (cookie ${p.cookie})`);
    return false;
  }

  readonly #onData = (chunk: Buffer): void => {
    let pos = 0;
    const end = chunk.length;
    while (pos < end && !this.#closed) {
      switch (this.#state) {
        case S.MAGIC: {
          pos = this.#take(chunk, pos);
          if (!this.#ready()) break;
          const magic = this.#src.readUInt32BE(this.#srcAt);
          if (magic === NbdTransmissionMagic.SIMPLE_REPLY) {
            this.#expect(S.SIMPLE_HEADER, 12);
          } else if (magic === NbdTransmissionMagic.STRUCTURED_REPLY) {
            if (!this.#info.structuredReplies) {
              this.#violation('a structured reply chunk, but structured replies were not negotiated');
              return;
            }
            this.#expect(S.CHUNK_HEADER, 16);
          } else {
            this.#violation(`bad reply magic 0x${magic.toString(16).padStart(8, '0')}`);
            return;
          }
          break;
        }

        case S.SIMPLE_HEADER: {
          pos = this.#take(chunk, pos);
          if (!this.#ready()) break;
          const src = this.#src;
          const at = this.#srcAt;
          const error = src.readUInt32BE(at);
          const cookie = src.readUInt32BE(at + 4) * TWO_32 + src.readUInt32BE(at + 8);
          const p = this.#pending.get(cookie);
          if (p === undefined) {
            this.#violation(`simple reply for unknown cookie ${cookie}`);
            return;
          }
          if (p.structured) {
            this.#violation(`simple reply to cookie ${cookie}, which already got structured chunks`);
            return;
          }
          this.#expect(S.MAGIC, 4);
          if (p.cmd === NbdCmd.READ && error === 0) {
            if (this.#info.structuredReplies) {
              this.#violation(`simple reply with error 0 to a read (cookie ${cookie}) with structured replies`);
              return;
            }
            // The data follows the header: exactly the request's length.
            this.#cur = p;
            this.#state = S.SIMPLE_DATA;
            this.#dataAt = 0;
            this.#dataLeft = p.length;
            break;
          }
          this.#complete(p, error);
          break;
        }

        case S.SIMPLE_DATA: {
          const p = this.#cur!;
          const n = Math.min(this.#dataLeft, end - pos);
          copyToScatter(p.req.buffers, this.#dataAt, chunk, pos, pos + n);
          pos += n;
          this.#dataAt += n;
          this.#dataLeft -= n;
          if (this.#dataLeft === 0) {
            this.#cur = undefined;
            this.#expect(S.MAGIC, 4);
            this.#complete(p, 0);
          }
          break;
        }

        case S.CHUNK_HEADER: {
          pos = this.#take(chunk, pos);
          if (!this.#ready()) break;
          const src = this.#src;
          const at = this.#srcAt;
          const flags = src.readUInt16BE(at);
          const type = src.readUInt16BE(at + 2);
          const cookie = src.readUInt32BE(at + 4) * TWO_32 + src.readUInt32BE(at + 8);
          const length = src.readUInt32BE(at + 12);
          const p = this.#pending.get(cookie);
          if (p === undefined) {
            this.#violation(`structured chunk (type ${type}) for unknown cookie ${cookie}`);
            return;
          }
          if (length > NBD_MAX_CHUNK_PAYLOAD) {
            this.#violation(`structured chunk of ${length} bytes (limit ${NBD_MAX_CHUNK_PAYLOAD})`);
            return;
          }
          p.structured = true;
          this.#cur = p;
          this.#chunkFlags = flags;
          this.#chunkType = type;
          this.#chunkLeft = length;
          if (!this.#startChunk(p, type, flags, length)) return;
          break;
        }

        case S.DATA_OFFSET: {
          pos = this.#take(chunk, pos);
          if (!this.#ready()) break;
          const p = this.#cur!;
          const off = this.#src.readUInt32BE(this.#srcAt) * TWO_32 + this.#src.readUInt32BE(this.#srcAt + 4);
          const n = this.#chunkLeft - 8;
          if (!this.#inRange(p, off, n, 'OFFSET_DATA')) return;
          p.covered += n;
          this.#state = S.CHUNK_DATA;
          this.#dataAt = off - p.offset;
          this.#dataLeft = n;
          break;
        }

        case S.CHUNK_DATA: {
          const p = this.#cur!;
          const n = Math.min(this.#dataLeft, end - pos);
          copyToScatter(p.req.buffers, this.#dataAt, chunk, pos, pos + n);
          pos += n;
          this.#dataAt += n;
          this.#dataLeft -= n;
          if (this.#dataLeft === 0) this.#endChunk();
          break;
        }

        case S.HOLE: {
          pos = this.#take(chunk, pos);
          if (!this.#ready()) break;
          const p = this.#cur!;
          const src = this.#src;
          const at = this.#srcAt;
          const off = src.readUInt32BE(at) * TWO_32 + src.readUInt32BE(at + 4);
          const size = src.readUInt32BE(at + 8);
          if (size === 0) {
            this.#violation(`OFFSET_HOLE of size 0 (cookie ${p.cookie})`);
            return;
          }
          if (!this.#inRange(p, off, size, 'OFFSET_HOLE')) return;
          p.covered += size;
          zeroScatter(p.req.buffers, off - p.offset, size);
          this.#endChunk();
          break;
        }

        case S.ERROR_HEAD: {
          pos = this.#take(chunk, pos);
          if (!this.#ready()) break;
          const p = this.#cur!;
          const error = this.#src.readUInt32BE(this.#srcAt);
          const messageLength = this.#src.readUInt16BE(this.#srcAt + 4);
          this.#chunkLeft -= 6;
          const withOffset = this.#chunkType === NbdReplyType.ERROR_OFFSET;
          const room = this.#chunkLeft - (withOffset ? 8 : 0);
          if (error === 0) {
            this.#violation(`error chunk (type 0x${this.#chunkType.toString(16)}) with error 0 (cookie ${p.cookie})`);
            return;
          }
          if (messageLength > room) {
            this.#violation(`error chunk message of ${messageLength} bytes in a ${this.#chunkLeft + 6}-byte payload`);
            return;
          }
          if (p.error === 0) p.error = error;
          if (withOffset) {
            this.#chunkLeft -= messageLength + 8;
            this.#skip(messageLength, S.ERROR_OFFSET_TAIL);
          } else {
            const rest = this.#chunkLeft;
            this.#chunkLeft = 0;
            this.#skip(rest, S.MAGIC);
          }
          break;
        }

        case S.ERROR_OFFSET_TAIL: {
          pos = this.#take(chunk, pos);
          if (!this.#ready()) break;
          const p = this.#cur!;
          const off = this.#src.readUInt32BE(this.#srcAt) * TWO_32 + this.#src.readUInt32BE(this.#srcAt + 4);
          if (!this.#inRange(p, off, 1, 'ERROR_OFFSET')) return;
          // Bytes past the offset (a longer payload than the type needs) are skipped.
          const rest = this.#chunkLeft;
          this.#chunkLeft = 0;
          this.#skip(rest, S.MAGIC);
          break;
        }

        case S.SKIP: {
          const n = Math.min(this.#skipLeft, end - pos);
          pos += n;
          this.#skipLeft -= n;
          if (this.#skipLeft === 0) this.#endSkip();
          break;
        }
      }
    }
  };

  /** Checks a chunk header against its request and enters the state that parses its payload. */
  #startChunk(p: Pending, type: number, flags: number, length: number): boolean {
    switch (type) {
      case NbdReplyType.NONE:
        if (length !== 0) {
          this.#violation(`NONE chunk with a ${length}-byte payload`);
          return false;
        }
        if ((flags & NbdReplyFlag.DONE) === 0) {
          this.#violation('NONE chunk without NBD_REPLY_FLAG_DONE');
          return false;
        }
        this.#endChunk();
        return true;
      case NbdReplyType.OFFSET_DATA:
        if (p.cmd !== NbdCmd.READ) {
          this.#violation(`OFFSET_DATA chunk for a non-read request (cookie ${p.cookie})`);
          return false;
        }
        if (length < 9) {
          this.#violation(`OFFSET_DATA chunk with a ${length}-byte payload`);
          return false;
        }
        this.#expect(S.DATA_OFFSET, 8);
        return true;
      case NbdReplyType.OFFSET_HOLE:
        if (p.cmd !== NbdCmd.READ) {
          this.#violation(`OFFSET_HOLE chunk for a non-read request (cookie ${p.cookie})`);
          return false;
        }
        if (length !== 12) {
          this.#violation(`OFFSET_HOLE chunk with a ${length}-byte payload`);
          return false;
        }
        this.#expect(S.HOLE, 12);
        return true;
      case NbdReplyType.ERROR_OFFSET:
        if (length < 14) {
          this.#violation(`ERROR_OFFSET chunk with a ${length}-byte payload`);
          return false;
        }
        this.#expect(S.ERROR_HEAD, 6);
        return true;
      default:
        // NBD_REPLY_TYPE_ERROR and unknown error types (bit 15): "the client MUST consider the current reply as
        // errored, but MAY continue transmission unless ... message length is too large".
        if ((type & NBD_REPLY_TYPE_ERROR_BIT) !== 0) {
          if (length < 6) {
            this.#violation(`error chunk (type 0x${type.toString(16)}) with a ${length}-byte payload`);
            return false;
          }
          this.#expect(S.ERROR_HEAD, 6);
          return true;
        }
        // BLOCK_STATUS (never asked for) and unknown types: "the client MUST initiate a hard disconnect".
        this.#violation(`unexpected structured chunk type ${type} (cookie ${p.cookie})`);
        return false;
    }
  }
}

/** Writes a 28-byte request header (spec "Request message"). */
function writeRequestHeader(b: Buffer, flags: number, type: number, cookie: number, offset: number, length: number): void {
  b.writeUInt32BE(NbdTransmissionMagic.REQUEST, 0);
  b.writeUInt16BE(flags, 4);
  b.writeUInt16BE(type, 6);
  b.writeUInt32BE(Math.floor(cookie / TWO_32), 8);
  b.writeUInt32BE(cookie >>> 0, 12);
  b.writeUInt32BE(Math.floor(offset / TWO_32), 16);
  b.writeUInt32BE(offset >>> 0, 20);
  b.writeUInt32BE(length, 24);
}

/**
 * Where a block device's bytes live. Runs in worker threads; each worker opens its own backend from plain options.
 * Data moves straight between the file and guest memory views (no intermediate buffer).
 */
import { closeSync, fdatasyncSync, fstatSync, openSync, readSync, writeSync } from 'node:fs';
import { VhostError } from '../../errors.js';

export interface BlockBackend {
  /** Size in bytes (a multiple of 512). */
  readonly size: number;
  readonly readOnly: boolean;
  /** Fills `dst` from byte offset `pos`; the range is inside the device. */
  read(dst: Uint8Array, pos: number): void;
  /** Writes `src` at byte offset `pos`; the range is inside the device. */
  write(src: Uint8Array, pos: number): void;
  flush(): void;
  /** Makes `[pos, pos + len)` read as zeroes. */
  writeZeroes(pos: number, len: number): void;
  close(): void;
}

export type BlockBackendOptions =
  | { kind: 'file'; path: string; readOnly: boolean }
  | { kind: 'null'; size: number; readOnly: boolean };

const ZERO_CHUNK = new Uint8Array(64 * 1024);

class FileBackend implements BlockBackend {
  readonly size: number;
  readonly readOnly: boolean;
  readonly #fd: number;

  constructor(path: string, readOnly: boolean) {
    this.#fd = openSync(path, readOnly ? 'r' : 'r+');
    this.readOnly = readOnly;
    const bytes = fstatSync(this.#fd).size;
    this.size = bytes - (bytes % 512);
  }

  read(dst: Uint8Array, pos: number): void {
    let done = 0;
    while (done < dst.length) {
      const n = readSync(this.#fd, dst, done, dst.length - done, pos + done);
      if (n === 0) {
        // The file shrank under us: what is past its end reads as zeroes.
        dst.fill(0, done);
        return;
      }
      done += n;
    }
  }

  write(src: Uint8Array, pos: number): void {
    let done = 0;
    while (done < src.length) done += writeSync(this.#fd, src, done, src.length - done, pos + done);
  }

  flush(): void {
    fdatasyncSync(this.#fd);
  }

  writeZeroes(pos: number, len: number): void {
    for (let off = 0; off < len; off += ZERO_CHUNK.length) {
      this.write(ZERO_CHUNK.subarray(0, Math.min(ZERO_CHUNK.length, len - off)), pos + off);
    }
  }

  close(): void {
    closeSync(this.#fd);
  }
}

/** Completes every request at once without touching data: for benchmarks (like QEMU's null-co). */
class NullBackend implements BlockBackend {
  readonly size: number;
  readonly readOnly: boolean;

  constructor(size: number, readOnly: boolean) {
    this.size = size;
    this.readOnly = readOnly;
  }
  read(): void {}
  write(): void {}
  flush(): void {}
  writeZeroes(): void {}
  close(): void {}
}

export function openBlockBackend(options: BlockBackendOptions): BlockBackend {
  switch (options.kind) {
    case 'file':
      return new FileBackend(options.path, options.readOnly);
    case 'null':
      if (options.size % 512 !== 0) throw new VhostError('VHOST_BLK_BAD_SIZE', 'null device size must be a multiple of 512');
      return new NullBackend(options.size, options.readOnly);
  }
}

/**
 * The frontend's side of a dirty log (live migration): a memfd bitmap as QEMU makes one (`vhost_log_alloc`: a
 * "vhost-log" memfd sealed against growing, shrinking and further sealing), shared with the backend by SET_LOG_BASE
 * (`VhostUserFrontend.setLogBase`). The backend sets the bit of every page it writes; the migration takes and clears
 * them (`takeDirty`) and copies those pages again.
 */
import { DirtyLog, logBytesFor } from '../memory/dirty-log.js';
import * as native from '../native/index.js';

/** QEMU's log unit: 64-bit words (`vhost_log_chunk_t`). */
const WORD = 8;

export class MigrationLog {
  /** The memfd (sent with SET_LOG_BASE; closed by `close`). */
  readonly fd: number;
  /** Bytes of bitmap. */
  readonly size: number;
  readonly bits: DirtyLog;
  readonly #buffer: SharedArrayBuffer;
  #closed = false;

  /**
   * A log that covers guest-physical addresses [0, memoryEnd), sized as QEMU sizes it (`vhost_get_log_size`: whole
   * 64-bit words; `extraBytes` more, as QEMU's VHOST_LOG_BUFFER when it grows a log during a migration).
   */
  static create(memoryEnd: number, extraBytes = 0): MigrationLog {
    const size = Math.max(WORD, Math.ceil(logBytesFor(memoryEnd) / WORD) * WORD) + extraBytes;
    const fd = native.memfdCreate('vhost-log', size);
    try {
      native.addSeals(fd, native.F_SEAL_GROW | native.F_SEAL_SHRINK | native.F_SEAL_SEAL);
      return new MigrationLog(fd, size, native.mapShared(fd, 0, size, true));
    } catch (err) {
      native.close(fd);
      throw err;
    }
  }

  private constructor(fd: number, size: number, buffer: SharedArrayBuffer) {
    this.fd = fd;
    this.size = size;
    this.#buffer = buffer;
    this.bits = new DirtyLog(buffer, 0, size);
  }

  /** The dirty pages (page numbers, ascending), cleared: a page the backend marks meanwhile stays for the next call. */
  takeDirty(): number[] {
    return this.bits.takeDirty();
  }

  /**
   * Takes the dirty pages every `intervalMs` (as a migration's iterations do, QEMU's `log_sync`) and hands each
   * take's pages to `onTake`, until the returned function is called.
   */
  takeEvery(intervalMs: number, onTake: (pages: number[]) => void): () => void {
    const timer = setInterval(() => onTake(this.takeDirty()), intervalMs);
    return () => clearInterval(timer);
  }

  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    native.close(this.fd);
    native.revoke(this.#buffer);
  }
}

/**
 * A session's dirty log (live migration, vhost-user spec "Migration"): the bitmap SET_LOG_BASE hands over
 * (VHOST_USER_PROTOCOL_F_LOG_SHMFD: a memfd, QEMU's "vhost-log", sealed against resizing), validated and mapped
 * here. Whether the workers write it is the session's decision (LOG_ALL negotiated, session.ts): the mapping is
 * published to them with the memory table, and a replaced mapping is revoked only after the grace period of the
 * generation that dropped it (docs/memory-sync.md), so once SET_LOG_BASE is answered no bit goes to the old log.
 *
 * Refused (VHOST_PROTOCOL_BAD_LOG): a size of 0 or above MAX_LOG_BYTES, an offset + size that overflows or passes
 * the file's end (CVE-2020-10722 in DPDK was that overflow), an fd that is not a memfd (or tmpfs / hugetlbfs file)
 * sealed or sealable against shrinking (a log truncated under the workers would kill the process with SIGBUS), and a
 * log that does not cover every guest address of the memory table (VHOST_PROTOCOL_LOG_TOO_SMALL).
 */
import { ProtocolError } from '../errors.js';
import { LOG_BYTE_SPAN } from '../memory/dirty-log.js';
import { MAX_ADDRESS } from '../memory/guest-memory.js';
import { mapFileRange } from '../memory/region.js';
import type { Log } from '../protocol/payloads.js';
import type { WorkerLog } from './worker-messages.js';

/** Largest log accepted: 1 GiB of bitmap covers 32 TiB of guest memory. */
export const MAX_LOG_BYTES = 1 << 30;

/** A mapped log: `size` bytes at `offset` in `buffer` (the mapping starts at a page boundary of the file). */
export interface LogMapping extends WorkerLog {
  /** Guest-physical addresses below this are covered. */
  readonly covers: number;
}

function bad(message: string): ProtocolError {
  return new ProtocolError('VHOST_PROTOCOL_BAD_LOG', message);
}

/**
 * Validates SET_LOG_BASE's description against its fd and against the end of guest memory it must cover
 * (`memoryEnd`, the highest region end), and maps it. Does not take the fd (the mapping outlives it).
 */
export function mapLog(desc: Log, fd: number, memoryEnd: number): LogMapping {
  if (desc.mmapSize === 0n || desc.mmapSize > BigInt(MAX_LOG_BYTES)) {
    throw bad(`log size ${desc.mmapSize} is not 1..${MAX_LOG_BYTES} bytes`);
  }
  if (desc.mmapOffset > BigInt(MAX_ADDRESS) - desc.mmapSize) {
    throw bad(`log offset 0x${desc.mmapOffset.toString(16)} + size ${desc.mmapSize} overflows`);
  }
  const size = Number(desc.mmapSize);
  const offset = Number(desc.mmapOffset);
  const covers = size * LOG_BYTE_SPAN;
  if (covers < memoryEnd) {
    throw new ProtocolError(
      'VHOST_PROTOCOL_LOG_TOO_SMALL',
      `a log of ${size} bytes covers guest memory up to 0x${covers.toString(16)}, the memory table ends at 0x${memoryEnd.toString(16)}`,
    );
  }
  // Sealed first, sized second (memory/region.ts); anything that is not shared memory (a regular file, a socket, an
  // eventfd) cannot be sealed and is refused.
  const { buffer, bufferOffset } = mapFileRange(fd, offset, size, 'VHOST_PROTOCOL_BAD_LOG', 'log', true);
  return { buffer, offset: bufferOffset, size, covers };
}

/**
 * The native half of INFLIGHT_SHMFD: creating the region's memfd for GET_INFLIGHT_FD and mapping the fd that
 * SET_INFLIGHT_FD hands back. Everything else (layout, validation, tracking, recovery) is in `inflight-region.ts`.
 *
 * GET_INFLIGHT_FD allocates as libvhost-user does (`memfd_alloc("vhost-inflight", ..., F_SEAL_GROW | F_SEAL_SHRINK
 * | F_SEAL_SEAL)`): a sealed memfd of exactly the region's size, zero-filled by the kernel, so neither side can
 * resize it under the other's mapping. SET_INFLIGHT_FD may carry any fd (normally that memfd, kept by QEMU across
 * our restart): it is sealed against shrinking when it can be (as guest memory is, `memory/region.ts`), then
 * checked against its real size and mapped.
 */
import type { Inflight } from '../protocol/index.js';
import { sealAgainstShrinking } from '../memory/region.js';
import * as native from '../native/index.js';
import {
  type InflightGeometry,
  type InflightLimits,
  InflightError,
  InflightErrorCode,
  checkSetInflight,
} from './inflight-region.js';

/** A region allocated for GET_INFLIGHT_FD. */
export interface CreatedInflight {
  /** The memfd, to send with the reply (and close once sent: the mapping stays). */
  readonly fd: number;
  /** The mapping, `geometry.mmapSize` zero bytes (version 0 in every queue region). */
  readonly buffer: SharedArrayBuffer;
}

/** Creates, seals and maps the memfd of a region of `geometry`. On failure nothing is left open. */
export function createInflightFd(geometry: InflightGeometry): CreatedInflight {
  let fd = -1;
  try {
    fd = native.memfdCreate('vhost-inflight', geometry.mmapSize);
    native.addSeals(fd, native.F_SEAL_GROW | native.F_SEAL_SHRINK | native.F_SEAL_SEAL);
    return { fd, buffer: native.mapShared(fd, 0, geometry.mmapSize, true) };
  } catch (err) {
    if (fd >= 0) native.close(fd);
    throw new InflightError(InflightErrorCode.ALLOC_FAILED, `cannot allocate an inflight region of ${geometry.mmapSize} bytes`, {
      cause: err,
    });
  }
}

/** A region mapped for SET_INFLIGHT_FD. */
export interface MappedInflight {
  readonly geometry: InflightGeometry;
  /** The mapping of `geometry.mmapSize` bytes from the request's `mmap_offset`. */
  readonly buffer: SharedArrayBuffer;
  /**
   * True when the file could not be sealed against shrinking (not a memfd, or sealing closed): the frontend could
   * still truncate it and crash this process at the next access (SIGBUS). Log it.
   */
  readonly truncatable: boolean;
}

/**
 * Validates SET_INFLIGHT_FD's payload against the device and against `fd` (sealed first, sized second), and maps
 * the region. Does not take ownership of `fd` (close it after: the mapping stays valid).
 */
export function mapInflightFd(fd: number, request: Inflight, limits: InflightLimits): MappedInflight {
  let truncatable: boolean;
  try {
    truncatable = !sealAgainstShrinking(fd);
  } catch (err) {
    throw new InflightError(InflightErrorCode.BAD_FD, 'inflight fd is not usable', { cause: err });
  }
  let stat: native.FileStat;
  try {
    stat = native.fstat(fd);
  } catch (err) {
    throw new InflightError(InflightErrorCode.BAD_FD, 'inflight fd is not usable', { cause: err });
  }
  const geometry = checkSetInflight(request, limits, { fileSize: stat.size, pageSize: native.PAGE_SIZE });
  let buffer: SharedArrayBuffer;
  try {
    buffer = native.mapShared(fd, geometry.mmapOffset, geometry.mmapSize, true);
  } catch (err) {
    throw new InflightError(InflightErrorCode.BAD_FD, 'inflight region cannot be mapped', { cause: err });
  }
  const { numQueues, queueSize, packed, queueRegionSize, mmapSize } = geometry;
  return { geometry: { numQueues, queueSize, packed, queueRegionSize, mmapSize }, buffer, truncatable };
}

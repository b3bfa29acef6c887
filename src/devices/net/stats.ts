/**
 * virtio-net counters, shared by the control thread and the queue workers: one row of counters per queue pair in a
 * SharedArrayBuffer. Each counter of a row has a single writer (the receive counters the thread that runs the pair's
 * receive queue, the others the thread that runs its transmit queue; both are the same worker), so the writers use
 * plain stores; readers (the control thread, for logs and tests) may see a row mid-update, which is fine for
 * counters that only grow. Float64 keeps them exact up to 2^53.
 */

export const NET_COUNTERS = [
  /** Frames the device put into the driver's receive buffers. */
  'rxFrames',
  /** Their bytes (Ethernet frame, without the virtio-net header). */
  'rxBytes',
  /** Frames a port had for the driver that were dropped: no buffers in time, too large, or the port's queue full. */
  'rxDropped',
  /** Frames the driver transmitted (taken from its transmit queues). */
  'txFrames',
  'txBytes',
  /** Transmitted frames dropped as malformed (short, an offload that was not negotiated, too large). */
  'txErrors',
  /** Transmitted frames the port could not take (TAP full or down, a switch port's queue full). */
  'txDropped',
  /** `source` port: transmitted frames that carried its test pattern, and how many of them were corrupt. */
  'checked',
  'corrupt',
  /** GSO frames the driver transmitted (segmentation left to whoever takes them). */
  'txGso',
  /** GSO frames put into the driver's receive buffers whole (it negotiated the offload). */
  'rxGso',
  /** GSO frames segmented in software for the driver (it did not negotiate the offload); each segment is a frame. */
  'rxSegmented',
  /** Partial checksums completed in software for the driver (it did not negotiate GUEST_CSUM). */
  'rxChecksummed',
] as const;

export type NetCounter = (typeof NET_COUNTERS)[number];
export type NetStatsSnapshot = Record<NetCounter, number>;

/** Index of each counter in a row. */
export const C = Object.fromEntries(NET_COUNTERS.map((name, i) => [name, i])) as Record<NetCounter, number>;

/** Allocates the shared counters of `pairs` queue pairs. */
export function createNetStats(pairs: number): SharedArrayBuffer {
  return new SharedArrayBuffer(pairs * NET_COUNTERS.length * Float64Array.BYTES_PER_ELEMENT);
}

/** The counter row of one pair, for its worker. */
export function statsRow(buffer: SharedArrayBuffer, pair: number): Float64Array {
  return new Float64Array(buffer, pair * NET_COUNTERS.length * Float64Array.BYTES_PER_ELEMENT, NET_COUNTERS.length);
}

/** Sums the rows of every pair. */
export function readNetStats(buffer: SharedArrayBuffer): NetStatsSnapshot {
  const all = new Float64Array(buffer);
  const out = Object.fromEntries(NET_COUNTERS.map((n) => [n, 0])) as NetStatsSnapshot;
  for (let i = 0; i < all.length; i++) {
    const name = NET_COUNTERS[i % NET_COUNTERS.length] as NetCounter;
    out[name] += all[i] as number;
  }
  return out;
}

/** Adds to one counter of a row (the row's single writer only). */
export function count(row: Float64Array, counter: number, n = 1): void {
  row[counter] = (row[counter] as number) + n;
}

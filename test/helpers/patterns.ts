// Data patterns and guest result parsing shared by the system tests.
import { createHash } from 'node:crypto';

/** TEXT + "\n" repeated to exactly `bytes` bytes, like `yes TEXT | head -c BYTES` in the guest. */
export function pattern(text: string, bytes: number): Buffer {
  const line = Buffer.from(`${text}\n`);
  return Buffer.alloc(bytes, line);
}

export function md5(data: Uint8Array): string {
  return createHash('md5').update(data).digest('hex');
}

/** The value of `key=` in the GUEST-RESULT line that starts with prefix. */
export function result(results: readonly string[], prefix: string, key: string): string | undefined {
  const line = results.find((r) => r.startsWith(prefix));
  return line?.match(new RegExp(`\\b${key}=(\\S+)`))?.[1];
}

/** The host pattern blk-pattern.sh expects at offset 0, and the guest pattern it writes at 1 MiB. */
export const HOST_PATTERN_TEXT = 'vhost-user-blk host pattern fedcba9876543210';
export const GUEST_PATTERN_TEXT = 'vhost-user-blk guest pattern 0123456789abcdef';

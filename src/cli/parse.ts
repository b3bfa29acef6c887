/** Option parsers shared by the CLI commands (commander calls them with the raw string). */
import { InvalidArgumentError } from 'commander';

export function parseInteger(min: number, max: number): (value: string) => number {
  return (value) => {
    const n = Number(value);
    if (!Number.isInteger(n) || n < min || n > max) throw new InvalidArgumentError(`expected an integer in ${min}..${max}`);
    return n;
  };
}

const UNITS: Record<string, number> = { '': 1, k: 1024, m: 1024 ** 2, g: 1024 ** 3, t: 1024 ** 4 };

/** Parses sizes like 4096, 4k, 64M, 1G (binary units). */
export function parseSize(value: string): number {
  const m = /^(\d+)([kmgt]?)i?b?$/i.exec(value.trim());
  const unit = UNITS[(m?.[2] ?? '').toLowerCase()];
  if (m === null || unit === undefined) throw new InvalidArgumentError('expected a size such as 4096, 4k, 64M or 1G');
  const n = Number(m[1]) * unit;
  if (!Number.isSafeInteger(n)) throw new InvalidArgumentError('size too large');
  return n;
}

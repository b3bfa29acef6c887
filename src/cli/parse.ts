/** Option parsers shared by the CLI commands (commander calls them with the raw string). */
import { InvalidArgumentError } from 'commander';
import { parseNetPort, parseSizeText, type NetPortConfig } from '../daemon/config.js';

export function parseInteger(min: number, max: number): (value: string) => number {
  return (value) => {
    const n = Number(value);
    if (!Number.isInteger(n) || n < min || n > max) throw new InvalidArgumentError(`expected an integer in ${min}..${max}`);
    return n;
  };
}

/** Runs a parser of the config module, reporting its RangeError as commander's InvalidArgumentError. */
function asOption<T>(parse: (value: string) => T): (value: string) => T {
  return (value) => {
    try {
      return parse(value);
    } catch (err) {
      throw new InvalidArgumentError(err instanceof Error ? err.message : String(err));
    }
  };
}

/** Parses sizes like 4096, 4k, 64M, 1G (binary units), as the daemon's config file does. */
export const parseSize: (value: string) => number = asOption(parseSizeText);

/** Parses a net port (loopback, sink, source, tap:NAME), as the daemon's config file does. */
export const parsePort: (value: string) => NetPortConfig = asOption(parseNetPort);

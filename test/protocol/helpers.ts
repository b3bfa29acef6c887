// Test helpers for the protocol suites: hex wire bytes and a closeFd spy. Not a test file itself.
/** Bytes from a hex string; whitespace is ignored so fields can be spaced out as in the spec's tables. */
export function hex(text: string): Uint8Array {
  const clean = text.replace(/\s+/g, '');
  if (clean.length % 2 !== 0 || /[^0-9a-f]/i.test(clean)) throw new Error(`bad hex: ${text}`);
  return new Uint8Array(Buffer.from(clean, 'hex'));
}

/** Hex of `bytes`, for readable assertion failures. */
export function toHex(bytes: Uint8Array): string {
  return Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength).toString('hex');
}

/** The concatenation of `parts`. */
export function concat(...parts: Uint8Array[]): Uint8Array {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const part of parts) {
    out.set(part, at);
    at += part.length;
  }
  return out;
}

/** A `closeFd` that records what it was asked to close. */
export function fdSpy(): { closeFd: (fd: number) => void; closed: number[] } {
  const closed: number[] = [];
  return { closeFd: (fd) => void closed.push(fd), closed };
}

/** An `assert.throws` matcher for a `ProtocolError` with `code` (an object, so failures show a diff). */
export function protocolError(code: string): { name: string; code: string } {
  return { name: 'ProtocolError', code };
}

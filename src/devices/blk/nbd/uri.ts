/**
 * NBD URIs (NetworkBlockDevice/nbd `doc/uri.md`, "the URI spec"; RFC 3986 for the generic syntax):
 *
 *     nbd://host[:port]/export              TCP, no TLS
 *     nbds://host[:port]/export             TCP, TLS required
 *     nbd+unix:///export?socket=PATH        unix socket, no TLS
 *     nbds+unix:///export?socket=PATH       unix socket, TLS required
 *
 * The port defaults to 10809; an IPv6 host is written in brackets (RFC 2732, zone as `%25`). The export name is the
 * path without its leading `/`, percent-decoded; it is empty when the path is `/` or absent ("NBD URI export name").
 * The query parameters `tls-type`, `tls-verify-peer` ("NBD URI query parameters related to TLS") are accepted and
 * ignored; `tls-hostname` is returned as `tlsHostname`. Any other parameter is rejected ("Any other query parameters
 * which the client does not understand SHOULD be diagnosed"), as are a userinfo part, an authority on a unix URI,
 * `socket=` on a TCP URI and a fragment.
 */
import { isIPv6 } from 'node:net';
import { VhostError } from '../../../errors.js';
import { NBD_DEFAULT_PORT, NbdSize } from './constants.js';

export type NbdAddress = { kind: 'tcp'; host: string; port: number } | { kind: 'unix'; path: string };

export interface NbdTarget {
  address: NbdAddress;
  exportName: string;
  /** TLS is required (`nbds`, `nbds+unix`): connecting fails when it cannot be negotiated. */
  tls: boolean;
  /** The URI's `tls-hostname` parameter: the name the server certificate is verified against (addition). */
  tlsHostname?: string;
}

const BAD_URI = 'VHOST_NBD_BAD_URI';

function bad(uri: string, why: string): VhostError {
  return new VhostError(BAD_URI, `not an NBD URI (${why}): ${uri}`);
}

// RFC 3986 §3: scheme "://" authority path-abempty [ "?" query ] [ "#" fragment ].
const URI_RE = /^([A-Za-z][A-Za-z0-9+.-]*):\/\/([^/?#]*)([^?#]*)(?:\?([^#]*))?(#.*)?$/s;
// pchar = unreserved / pct-encoded / sub-delims / ":" / "@"; the path also has "/".
const PATH_RE = /^(?:[A-Za-z0-9\-._~!$&'()*+,;=:@/]|%[0-9A-Fa-f]{2})*$/;
// reg-name (RFC 3986 §3.2.2): unreserved / pct-encoded / sub-delims.
const REG_NAME_RE = /^(?:[A-Za-z0-9\-._~!$&'()*+,;=]|%[0-9A-Fa-f]{2})+$/;
// query = *( pchar / "/" / "?" )
const QUERY_RE = /^(?:[A-Za-z0-9\-._~!$&'()*+,;=:@/?]|%[0-9A-Fa-f]{2})*$/;

function decode(uri: string, text: string, what: string): string {
  try {
    return decodeURIComponent(text);
  } catch {
    throw bad(uri, `${what} is not valid percent-encoded UTF-8`);
  }
}

function parsePort(uri: string, text: string): number {
  if (text === '') return NBD_DEFAULT_PORT; // RFC 3986 §3.2.3: an empty port is the default
  if (!/^[0-9]{1,5}$/.test(text)) throw bad(uri, `bad port "${text}"`);
  const port = Number(text);
  if (port < 1 || port > 65535) throw bad(uri, `port ${port} out of range`);
  return port;
}

function parseTcpAuthority(uri: string, authority: string): { host: string; port: number } {
  if (authority === '') throw bad(uri, 'no host');
  if (authority.includes('@')) throw bad(uri, 'userinfo is not supported');
  if (authority.startsWith('[')) {
    const close = authority.indexOf(']');
    if (close < 0) throw bad(uri, 'unterminated IPv6 address');
    const rest = authority.slice(close + 1);
    if (rest !== '' && !rest.startsWith(':')) throw bad(uri, 'junk after the IPv6 address');
    // RFC 6874: a zone identifier is written "%25zone".
    const literal = authority.slice(1, close);
    const host = literal.replace(/%25/, '%');
    if (!isIPv6(host)) throw bad(uri, `bad IPv6 address "${literal}"`);
    return { host, port: parsePort(uri, rest.slice(1)) };
  }
  const colon = authority.lastIndexOf(':');
  const hostText = colon < 0 ? authority : authority.slice(0, colon);
  const port = colon < 0 ? NBD_DEFAULT_PORT : parsePort(uri, authority.slice(colon + 1));
  if (!REG_NAME_RE.test(hostText)) throw bad(uri, `bad host "${hostText}"`);
  const host = decode(uri, hostText, 'the host');
  if (host === '' || /[\0\s/]/.test(host)) throw bad(uri, `bad host "${hostText}"`);
  return { host, port };
}

/**
 * nbd://host[:port]/export, nbds://..., nbd+unix:///export?socket=PATH, nbds+unix:///export?socket=PATH
 * (port default 10809; IPv6 in brackets; export name percent-decoded, empty when the path is "/" or absent).
 * Anything else throws VhostError 'VHOST_NBD_BAD_URI'. Unknown query parameters: ignore those the URI spec
 * says a client may ignore (tls-*), reject a socket= on a tcp URI.
 */
export function parseNbdUri(uri: string): NbdTarget {
  if (typeof uri !== 'string') throw new VhostError(BAD_URI, 'an NBD URI must be a string');
  const m = URI_RE.exec(uri);
  if (m === null) throw bad(uri, 'expected scheme://authority/export');
  const [, schemeText = '', authority = '', path = '', query, fragment] = m;
  if (fragment !== undefined) throw bad(uri, 'a fragment is not allowed');
  const scheme = schemeText.toLowerCase(); // RFC 3986 §3.1: schemes are case-insensitive
  if (scheme !== 'nbd' && scheme !== 'nbds' && scheme !== 'nbd+unix' && scheme !== 'nbds+unix') {
    throw bad(uri, `unknown scheme "${schemeText}" (nbd, nbds, nbd+unix, nbds+unix)`);
  }
  const unix = scheme.endsWith('+unix');
  const tls = scheme.startsWith('nbds');

  // Export name: the path without its leading "/" ("NBD URI export name").
  if (!PATH_RE.test(path)) throw bad(uri, 'the path has characters that must be percent-encoded');
  const exportName = path === '' ? '' : decode(uri, path.slice(1), 'the export name');
  if (exportName.includes('\0')) throw bad(uri, 'the export name contains NUL');
  if (Buffer.byteLength(exportName, 'utf8') > NbdSize.MAX_STRING) {
    throw bad(uri, `the export name is longer than ${NbdSize.MAX_STRING} bytes`);
  }

  let socket: string | undefined;
  let tlsHostname: string | undefined;
  if (query !== undefined && query !== '') {
    if (!QUERY_RE.test(query)) throw bad(uri, 'the query has characters that must be percent-encoded');
    for (const part of query.split('&')) {
      if (part === '') continue;
      const eq = part.indexOf('=');
      const key = decode(uri, eq < 0 ? part : part.slice(0, eq), 'a query parameter');
      const value = decode(uri, eq < 0 ? '' : part.slice(eq + 1), `query parameter ${key}`);
      if (key === 'socket') {
        if (!unix) throw bad(uri, 'socket= is only for nbd+unix and nbds+unix');
        if (socket !== undefined) throw bad(uri, 'socket= given twice');
        // An abstract socket starts with NUL ("NBD URI socket parameter"); NUL anywhere else is not a path.
        if (value === '' || value.slice(1).includes('\0')) throw bad(uri, 'bad socket path');
        socket = value;
      } else if (key === 'tls-hostname') {
        if (value === '') throw bad(uri, 'empty tls-hostname');
        tlsHostname = value;
      } else if (key === 'tls-type' || key === 'tls-verify-peer') {
        // "MAY be present"; this client verifies the server with the CA it is given.
      } else {
        throw bad(uri, `unknown query parameter "${key}"`);
      }
    }
  }

  let address: NbdAddress;
  if (unix) {
    // The URI spec leaves an authority on a unix URI to the client: rejected, it would be ignored otherwise.
    if (authority !== '') throw bad(uri, `${scheme} takes no host (write ${scheme}:///export?socket=PATH)`);
    if (socket === undefined) throw bad(uri, `${scheme} needs ?socket=PATH`);
    address = { kind: 'unix', path: socket };
  } else {
    address = { kind: 'tcp', ...parseTcpAuthority(uri, authority) };
  }
  const target: NbdTarget = { address, exportName, tls };
  if (tlsHostname !== undefined) target.tlsHostname = tlsHostname;
  return target;
}

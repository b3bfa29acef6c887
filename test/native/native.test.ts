// The native addon, with real syscalls: memfd, mmap into SharedArrayBuffer, revoke, eventfd, poll, unix sockets
// with SCM_RIGHTS, worker threads and a child process. Every test checks that fds come back to where they were.
import { test, afterEach, beforeEach } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync, spawn } from 'node:child_process';
import { createSocket } from 'node:dgram';
import { closeSync, ftruncateSync, mkdtempSync, openSync, readFileSync, readSync, rmSync, writeFileSync, writeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { Worker } from 'node:worker_threads';
import * as native from '../../src/native/index.js';
import { isSystemError } from '../../src/errors.js';
import { collectGarbage, openFdCount } from '../helpers/fds.js';

const workerUrl = new URL('./fixtures/native-worker.js', import.meta.url);

let fdsBefore = 0;
beforeEach(() => {
  fdsBefore = openFdCount();
});
afterEach(() => {
  assert.equal(openFdCount(), fdsBefore, 'the test leaked fds');
});

function assertSystemError(fn: () => unknown, code: string, syscall?: string): void {
  assert.throws(fn, (err: unknown) => {
    assert.ok(isSystemError(err), `expected a system error, got ${String(err)}`);
    assert.equal(err.code, code);
    if (syscall !== undefined) assert.equal(err.syscall, syscall);
    return true;
  });
}

/** Waits (bounded, sleeping between checks) until `cond` holds. */
async function until(cond: () => boolean, what: string, ms = 5000): Promise<void> {
  const end = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await sleep(10);
  }
}

function mappingLine(fdName: string): string | undefined {
  return readFileSync('/proc/self/maps', 'utf8')
    .split('\n')
    .find((l) => l.includes(fdName));
}

async function dropAllMappings(baseline: number): Promise<void> {
  // Deleters run on a V8 thread after the buffers are collected; give them a moment.
  await until(
    () => {
      collectGarbage();
      return native.mappingCount() <= baseline;
    },
    'mappings to be unmapped',
  );
}

test('memfd: create, size, map, and see file writes through the SharedArrayBuffer', async () => {
  const baseline = native.mappingCount();
  const fd = native.memfdCreate('guest-ram', 2 * native.PAGE_SIZE);
  try {
    const st = native.fstat(fd);
    assert.equal(st.size, 2 * native.PAGE_SIZE);
    assert.equal(typeof st.ino, 'bigint');
    writeSync(fd, Buffer.from('hello'), 0, 5, native.PAGE_SIZE);
    // In a plain function, so no reference to the buffer survives in this async function's frame.
    ((): void => {
      const sab = native.mapShared(fd, native.PAGE_SIZE, native.PAGE_SIZE);
      assert.ok(sab instanceof SharedArrayBuffer);
      assert.equal(sab.byteLength, native.PAGE_SIZE);
      assert.equal(Buffer.from(sab, 0, 5).toString(), 'hello');
      new Uint8Array(sab)[5] = 0x21; // and the other way: a write through the view reaches the file
      const back = Buffer.alloc(6);
      readSync(fd, back, 0, 6, native.PAGE_SIZE);
      assert.equal(back.toString(), 'hello!');
      assert.equal(native.mappingCount(), baseline + 1);
    })();
  } finally {
    native.close(fd);
  }
  await dropAllMappings(baseline);
});

test('mapShared: refuses what would crash or cannot work', () => {
  const fd = native.memfdCreate('small', native.PAGE_SIZE);
  try {
    // Past the end of the file: touching it would be SIGBUS, so it is refused up front.
    assertSystemError(() => native.mapShared(fd, 0, 2 * native.PAGE_SIZE), 'ENXIO', 'mmap');
    assertSystemError(() => native.mapShared(fd, native.PAGE_SIZE, 1), 'ENXIO', 'mmap');
    assertSystemError(() => native.mapShared(fd, 1, 16), 'EINVAL', 'mmap');
    assertSystemError(() => native.mapShared(fd, 0, 0), 'EINVAL', 'mmap');
    assertSystemError(() => native.mapShared(fd, -4096, 16), 'EINVAL', 'mmap');
  } finally {
    native.close(fd);
  }
  assertSystemError(() => native.mapShared(987654, 0, 4096), 'EBADF', 'fstat');
  assertSystemError(() => native.revoke(new SharedArrayBuffer(4096)), 'EINVAL', 'revoke');
});

test('bad fds are errors, not crashes', () => {
  assertSystemError(() => native.close(987654), 'EBADF', 'close');
  assertSystemError(() => native.fstat(-1), 'EBADF', 'fstat');
  assertSystemError(() => native.eventfdRead(987654), 'EBADF', 'read');
  assertSystemError(() => native.eventfdWrite(987654), 'EBADF', 'write');
  assertSystemError(() => native.dup(987654), 'EBADF', 'dup');
  assertSystemError(() => native.recvmsg(987654, new Uint8Array(4), []), 'EBADF', 'recvmsg');
  assertSystemError(() => native.sendmsg(987654, new Uint8Array(4), []), 'EBADF', 'sendmsg');
  assertSystemError(() => native.accept(987654), 'EBADF', 'accept4');
  assertSystemError(() => native.watch(987654, native.WATCH_READABLE, () => undefined), 'EBADF');
  assertSystemError(() => native.connectUnix('/nonexistent/socket'), 'ENOENT', 'connect');
  assertSystemError(() => native.connectUnix('x'.repeat(200)), 'ENAMETOOLONG', 'connect');
  assertSystemError(() => native.memfdCreate('x', -1), 'EINVAL', 'memfd_create');
  // poll with a bad fd reports POLLNVAL for it rather than failing
  const revents = new Int32Array(1);
  assert.equal(native.poll(Int32Array.of(987654), revents, 0), 1);
  assert.equal(revents[0], native.POLLNVAL);
});

test('a SharedArrayBuffer over a memfd is shared with a worker; Atomics.wait/notify work across threads', async () => {
  const fd = native.memfdCreate('shared', native.PAGE_SIZE);
  const sab = native.mapShared(fd, 0, native.PAGE_SIZE);
  native.close(fd); // the mapping keeps the memory alive
  const worker = new Worker(workerUrl, { workerData: { mode: 'ping-pong', sab } });
  const exited = new Promise((resolve) => worker.once('exit', resolve));
  const words = new Int32Array(sab, 0, 2);
  const bytes = new Uint8Array(sab);
  bytes[8] = 41;
  Atomics.store(words, 0, 1); // publishes bytes[8] (seq_cst store after a plain store)
  Atomics.notify(words, 0);
  // The worker answers by storing 2 and notifying; wait without blocking the event loop.
  const result = Atomics.waitAsync(words, 0, 1, 5000);
  assert.equal(result.async ? await result.value : result.value, 'ok');
  assert.equal(bytes[16], 42);
  await exited;
});

test('revoke while a worker keeps writing: no crash, the file stops changing, memory is released, then unmapped', async () => {
  const baseline = native.mappingCount();
  const size = 64 * 1024 * 1024;
  const name = `revoke-${process.pid}`;
  const fd = native.memfdCreate(name, size);
  const control = new SharedArrayBuffer(8);
  const controlWords = new Int32Array(control);
  let sab: SharedArrayBuffer | undefined = native.mapShared(fd, 0, size);
  new Uint8Array(sab).fill(0xaa, 0, size); // touch every page so the memfd really holds 64 MiB
  const worker = new Worker(workerUrl, { workerData: { mode: 'write-loop', sab, control } });
  const done = new Promise<{ done: number; last: number }>((resolve) => worker.once('message', resolve));
  await until(() => Atomics.load(controlWords, 1) > 0, 'the worker to start writing');

  assert.match(mappingLine(`/memfd:${name}`) ?? '', /rw-s/);
  native.revoke(sab);
  native.revoke(sab); // idempotent
  assert.ok(native.isRevoked(sab));
  assert.equal(mappingLine(`/memfd:${name}`), undefined, 'the memfd is no longer mapped');

  // The file content is frozen: the worker's writes now land in private anonymous memory.
  const read = (): number => {
    const b = Buffer.alloc(4);
    readSync(fd, b, 0, 4, 0);
    return b.readInt32LE(0);
  };
  const first = read();
  const itersAtFirst = Atomics.load(controlWords, 1);
  await until(() => Atomics.load(controlWords, 1) > itersAtFirst + 100_000, 'the worker to keep writing');
  assert.equal(read(), first, 'the memfd content changed after revoke');
  // The stale view reads what the worker wrote after revoke (zero-filled pages, then its own writes), never the
  // file's 0xaa filler.
  assert.notEqual(new Uint8Array(sab)[100], 0xaa);

  // After close, the file's memory goes back to the system: no mapping or fd references it.
  native.close(fd);
  assert.equal(mappingLine(`/memfd:${name}`), undefined);

  Atomics.store(controlWords, 0, 1);
  const summary = await done;
  assert.ok(summary.done > 0);
  await new Promise((resolve) => worker.once('exit', resolve));
  // eslint-disable-next-line no-useless-assignment -- drops the last reference so the mapping can be collected
  sab = undefined;
  await dropAllMappings(baseline);
});

test('the deleter unmaps only after every thread dropped the buffer', async () => {
  const baseline = native.mappingCount();
  const fd = native.memfdCreate('held', native.PAGE_SIZE);
  let sab: SharedArrayBuffer | undefined = native.mapShared(fd, 0, native.PAGE_SIZE);
  native.close(fd);
  const worker = new Worker(workerUrl, { workerData: { mode: 'hold', sab } });
  await new Promise((resolve) => worker.once('online', resolve));
  // eslint-disable-next-line no-useless-assignment -- drops the last reference so the mapping can be collected
  sab = undefined;
  collectGarbage();
  await sleep(50);
  collectGarbage();
  assert.equal(native.mappingCount(), baseline + 1, 'unmapped while a worker still held the buffer');
  worker.postMessage('drop');
  await new Promise((resolve) => worker.once('exit', resolve));
  await dropAllMappings(baseline);
});

test('seals: a memfd can be sealed against shrinking and growing; files that cannot be sealed say so', () => {
  const dir = mkdtempSync(join(tmpdir(), 'vu-native-'));
  const fd = native.memfdCreate('sealed', 2 * native.PAGE_SIZE);
  const file = openSync(join(dir, 'plain'), 'w+');
  const [a, b] = native.socketPair();
  try {
    assert.equal(native.getSeals(fd), 0, 'memfdCreate makes sealable memfds with no seal yet');
    native.addSeals(fd, native.F_SEAL_SHRINK | native.F_SEAL_GROW);
    assert.equal(native.getSeals(fd), native.F_SEAL_SHRINK | native.F_SEAL_GROW);
    assertSystemError(() => ftruncateSync(fd, 0), 'EPERM');
    assertSystemError(() => ftruncateSync(fd, 4 * native.PAGE_SIZE), 'EPERM');
    assert.equal(native.fstat(fd).size, 2 * native.PAGE_SIZE);
    writeSync(fd, Buffer.from('still writable'), 0, 14, 0); // within the size: F_SEAL_WRITE was not asked for
    native.addSeals(fd, native.F_SEAL_SEAL);
    assertSystemError(() => native.addSeals(fd, native.F_SEAL_WRITE), 'EPERM', 'fcntl');
    // A regular file, a socket: no sealing at all (-1), not an error.
    assert.equal(native.getSeals(file), -1);
    assert.equal(native.getSeals(a), -1);
    assertSystemError(() => native.addSeals(file, native.F_SEAL_SHRINK), 'EINVAL', 'fcntl');
    assertSystemError(() => native.getSeals(987654), 'EBADF', 'fcntl');
  } finally {
    native.close(fd);
    closeSync(file);
    native.close(a);
    native.close(b);
    rmSync(dir, { recursive: true, force: true });
  }
});

test('isEventfd: true for eventfds only', () => {
  const efd = native.eventfdCreate(0, false);
  const memfd = native.memfdCreate('not-an-eventfd', native.PAGE_SIZE);
  const [a, b] = native.socketPair();
  try {
    assert.equal(native.isEventfd(efd), true);
    for (const fd of [memfd, a, 0]) assert.equal(native.isEventfd(fd), false);
    assertSystemError(() => native.isEventfd(987654), 'EBADF', 'fcntl');
  } finally {
    native.close(efd);
    native.close(memfd);
    native.close(a);
    native.close(b);
  }
});

test('eventfd: write adds, read returns and resets, an empty non-blocking read returns 0', () => {
  const efd = native.eventfdCreate(0, true);
  try {
    assert.equal(native.eventfdRead(efd), 0);
    native.eventfdWrite(efd);
    native.eventfdWrite(efd, 4);
    assert.equal(native.eventfdRead(efd), 5);
    assert.equal(native.eventfdRead(efd), 0);
    const revents = new Int32Array(1);
    assert.equal(native.poll(Int32Array.of(efd), revents, 0), 0);
    native.eventfdWrite(efd);
    assert.equal(native.poll(Int32Array.of(efd), revents, 0), 1);
    assert.equal(revents[0], native.POLLIN);
  } finally {
    native.close(efd);
  }
});

test('a worker blocked in poll is woken by an eventfd write and can always be stopped', async () => {
  const control = native.eventfdCreate(0, true);
  const kick = native.eventfdCreate(0, false); // blocking, as a VMM's kick fd may be
  const worker = new Worker(workerUrl, { workerData: { mode: 'poll', fds: [control, kick] } });
  const messages: unknown[] = [];
  const next = (): Promise<unknown> => new Promise((resolve) => worker.once('message', resolve));
  try {
    assert.deepEqual(await next(), { ready: true });
    await sleep(20); // let it block in poll()
    const got = next();
    native.eventfdWrite(kick, 3);
    messages.push(await got);
    assert.deepEqual(messages[0], { fd: kick, value: 3 });
    const stopped = next();
    native.eventfdWrite(control);
    assert.deepEqual(await stopped, { stopped: true });
    await new Promise((resolve) => worker.once('exit', resolve));
  } finally {
    native.close(control);
    native.close(kick);
  }
});

test('sockets: fds pass between two sockets in one process, and coalesced messages keep their fds in order', async () => {
  const [a, b] = native.socketPair();
  const m1 = native.memfdCreate('m1', native.PAGE_SIZE);
  const m2 = native.memfdCreate('m2', native.PAGE_SIZE);
  const ev = native.eventfdCreate(0, true);
  try {
    // Three sends: no fds, two memfds, one eventfd. One recvmsg returns the first two together (the kernel merges
    // fd-less bytes with the following fd-bearing message) and stops before the next fd-bearing one.
    assert.equal(native.sendmsg(a, Buffer.from('0102', 'hex'), []), 2);
    assert.equal(native.sendmsg(a, Buffer.from('030405', 'hex'), [m1, m2]), 3);
    assert.equal(native.sendmsg(a, Buffer.from('06', 'hex'), [ev]), 1);
    const buf = new Uint8Array(64);
    const fds: number[] = [];
    const n1 = native.recvmsg(b, buf, fds);
    assert.equal(Buffer.from(buf.subarray(0, n1)).toString('hex'), '0102030405');
    assert.equal(fds.length, 2);
    const n2 = native.recvmsg(b, buf, fds);
    assert.equal(Buffer.from(buf.subarray(0, n2)).toString('hex'), '06');
    assert.equal(fds.length, 3);
    assert.equal(native.recvmsg(b, buf, fds), -1, 'nothing more: -1, not a block');
    // The received fds are the same files (dev/inode), as new fd numbers.
    assert.deepEqual(
      fds.map((fd) => native.fstat(fd).ino),
      [m1, m2, ev].map((fd) => native.fstat(fd).ino),
    );
    for (const fd of fds) native.close(fd);
    // A closed peer reads as 0; sending to it is EPIPE, never SIGPIPE.
    native.close(a);
    assert.equal(native.recvmsg(b, buf, fds), 0);
    const [c, d] = native.socketPair();
    native.close(d);
    assertSystemError(() => native.sendmsg(c, Buffer.from('x')), 'EPIPE', 'sendmsg');
    native.close(c);
    await sleep(0);
  } finally {
    for (const fd of [b, m1, m2, ev]) native.close(fd);
  }
});

test('sockets: listen, accept and receive memfds from a child process, driven by the event loop', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'vhost-user-native-'));
  const path = join(dir, 'sock');
  const listenFd = native.listenUnix(path);
  let conn = -1;
  let listenWatch = -1;
  let connWatch = -1;
  try {
    const bytes: number[] = [];
    const fds: number[] = [];
    const finished = new Promise<void>((resolve, reject) => {
      listenWatch = native.watch(listenFd, native.WATCH_READABLE, () => {
        conn = native.accept(listenFd);
        if (conn < 0) return;
        native.unwatch(listenWatch);
        const buf = new Uint8Array(4096);
        connWatch = native.watch(conn, native.WATCH_READABLE, () => {
          try {
            for (;;) {
              const n = native.recvmsg(conn, buf, fds);
              if (n < 0) return;
              if (n === 0) return resolve();
              bytes.push(...buf.subarray(0, n));
            }
          } catch (err) {
            reject(err instanceof Error ? err : new Error(String(err)));
          }
        });
      });
    });
    const script = new URL('./fixtures/fd-sender.js', import.meta.url).pathname;
    const child = spawn(process.execPath, [script, path], { stdio: 'inherit' });
    const exitCode = await new Promise((resolve) => child.once('exit', resolve));
    assert.equal(exitCode, 0);
    await finished;
    assert.equal(Buffer.from(bytes).toString(), 'one;two;three-with-fds;');
    assert.equal(fds.length, 2);
    const text = fds.map((fd) => {
      const b = Buffer.alloc(12);
      readSync(fd, b, 0, 12, 0);
      return b.toString();
    });
    assert.deepEqual(text, ['from child a', 'from child b']);
    assert.deepEqual(
      fds.map((fd) => native.fstat(fd).size),
      [4096, 8192],
    );
    for (const fd of fds) native.close(fd);
  } finally {
    native.unwatch(listenWatch);
    native.unwatch(connWatch);
    native.unwatch(connWatch); // idempotent
    if (conn >= 0) native.close(conn);
    native.close(listenFd);
    rmSync(dir, { recursive: true, force: true });
  }
});

test('watch: writable events, rewatch, unwatch', async () => {
  const [a, b] = native.socketPair();
  let id = -1;
  try {
    const events = await new Promise<number>((resolve) => {
      id = native.watch(a, native.WATCH_WRITABLE, (ev) => {
        native.rewatch(id, native.WATCH_READABLE);
        resolve(ev);
      });
    });
    assert.equal(events & native.WATCH_WRITABLE, native.WATCH_WRITABLE);
    const readable = new Promise<number>((resolve) => {
      native.unwatch(id);
      id = native.watch(a, native.WATCH_READABLE, resolve);
    });
    native.sendmsg(b, Buffer.from('x'));
    assert.equal((await readable) & native.WATCH_READABLE, native.WATCH_READABLE);
    const buf = new Uint8Array(4);
    assert.equal(native.recvmsg(a, buf, []), 1);
  } finally {
    native.unwatch(id);
    native.close(a);
    native.close(b);
  }
});

test('a worker that exits with watchers still open does not take the process down', async () => {
  const code = `
    const { createRequire } = require('node:module');
    const native = require(${JSON.stringify(new URL('../../../build/Release/vhost_user.node', import.meta.url).pathname)});
    const [a, b] = native.socketPair();
    native.watch(a, 1, () => {});
    native.watch(b, 1, () => {});
    require('node:worker_threads').parentPort.postMessage([a, b]);
    setTimeout(() => process.exit(0), 10);
  `;
  const worker = new Worker(code, { eval: true });
  const fds = await new Promise<number[]>((resolve) => worker.once('message', resolve));
  const exitCode = await new Promise((resolve) => worker.once('exit', resolve));
  assert.equal(exitCode, 0);
  for (const fd of fds) native.close(fd);
});

test('regions over 4 GiB are mapped and reachable through windowed views', async () => {
  const baseline = native.mappingCount();
  const size = 5 * 1024 * 1024 * 1024; // sparse: only touched pages use memory
  const fd = native.memfdCreate('big', size);
  try {
    ((): void => {
      const sab = native.mapShared(fd, 0, size);
      assert.equal(sab.byteLength, size);
      const high = new Uint8Array(sab, size - native.PAGE_SIZE, native.PAGE_SIZE);
      high[0] = 7;
      const b = Buffer.alloc(1);
      readSync(fd, b, 0, 1, size - native.PAGE_SIZE);
      assert.equal(b[0], 7);
    })();
  } finally {
    native.close(fd);
  }
  await dropAllMappings(baseline);
});

// ---- TAP devices --------------------------------------------------------------------------------------------------

function linkExists(name: string): boolean {
  try {
    execFileSync('ip', ['link', 'show', 'dev', name], { stdio: 'pipe' });
    return true;
  } catch {
    return false;
  }
}

test('tunOpen: a TAP interface exists while its fd is open, carries frames both ways with node:fs, and goes away on close', async () => {
  const name = `vutest${process.pid}`.slice(0, 15);
  // 198.18.0.0/15 is reserved for network tests; a /30 per pid keeps concurrent runs apart.
  const n = (process.pid % 32768) * 4;
  const ip = (k: number): string => `198.${18 + ((n + k) >> 16)}.${((n + k) >> 8) & 255}.${(n + k) & 255}`;
  const tap = native.tunOpen(name, false);
  const udp = createSocket('udp4');
  let watchId = -1;
  try {
    assert.equal(tap.name, name);
    assert.ok(linkExists(name), '`ip link show` sees the interface while its fd is open');
    const frame = Buffer.alloc(60);
    frame.fill(0xff, 0, 6); // broadcast
    frame.writeUInt16BE(0x88b5, 12); // the IEEE local experimental ethertype
    // Down, the kernel refuses the frame; up, a write() is one frame received by the interface.
    assertSystemError(() => writeSync(tap.fd, frame), 'EIO');
    assertSystemError(() => readSync(tap.fd, Buffer.alloc(2048)), 'EAGAIN'); // non-blocking, nothing waiting
    writeFileSync(`/proc/sys/net/ipv6/conf/${name}/disable_ipv6`, '1'); // no IPv6 chatter to read past
    execFileSync('ip', ['addr', 'add', `${ip(1)}/30`, 'dev', name]);
    execFileSync('ip', ['link', 'set', 'dev', name, 'up']);
    const rxBefore = Number(readFileSync(`/sys/class/net/${name}/statistics/rx_packets`, 'utf8'));
    assert.equal(writeSync(tap.fd, frame), 60);
    assert.equal(Number(readFileSync(`/sys/class/net/${name}/statistics/rx_packets`, 'utf8')), rxBefore + 1);
    // The other way: a datagram to the neighbour makes the kernel ask for its MAC address (ARP) on the interface,
    // which is one frame to read (waiting with watch, as a TAP port would).
    const arp = new Promise<Buffer>((resolve) => {
      watchId = native.watch(tap.fd, native.WATCH_READABLE, () => {
        const buf = Buffer.alloc(2048);
        for (;;) {
          let len: number;
          try {
            len = readSync(tap.fd, buf);
          } catch {
            return; // EAGAIN: wait for the next frame
          }
          if (buf.readUInt16BE(12) === 0x0806) return resolve(Buffer.from(buf.subarray(0, len)));
        }
      });
    });
    udp.send('x', 9, ip(2));
    const request = await arp;
    assert.equal(request.readUInt16BE(20), 1, 'an ARP request');
    assert.deepEqual([...request.subarray(38, 42)], ip(2).split('.').map(Number), 'for the neighbour address');
  } finally {
    udp.close();
    if (watchId >= 0) native.unwatch(watchId);
    native.close(tap.fd);
  }
  assert.ok(!linkExists(name), 'a non-persistent TAP interface goes away with its last fd');
});

test('tunOpen: multi-queue interfaces take one fd per queue; bad names are refused', () => {
  const name = `vutestmq${process.pid}`.slice(0, 15);
  const q0 = native.tunOpen(name, true);
  try {
    const q1 = native.tunOpen(name, true);
    assert.equal(q1.name, name);
    native.close(q1.fd);
    assert.ok(linkExists(name), 'the interface lives while one queue is open');
    assertSystemError(() => native.tunOpen(name, false), 'EINVAL', 'ioctl'); // a multi-queue interface needs the flag
  } finally {
    native.close(q0.fd);
  }
  assert.ok(!linkExists(name));
  assertSystemError(() => native.tunOpen('x'.repeat(16), false), 'EINVAL', 'ioctl');
});

test('copy: memmove between shared, plain and view buffers at any alignment; bad bounds throw and copy nothing', () => {
  const shared = new Uint8Array(new SharedArrayBuffer(4096));
  const plain = Uint8Array.from({ length: 4096 }, (_, i) => (i * 7) & 0xff);
  for (const [dOff, sOff, n] of [[0, 0, 1500], [3, 8, 1500], [4095, 1, 1], [17, 5, 0]] as const) {
    shared.fill(0);
    native.copy(shared, dOff, plain, sOff, n);
    assert.deepEqual(shared.subarray(dOff, dOff + n), plain.subarray(sOff, sOff + n));
    assert.equal(shared[dOff + n] ?? 0, 0, 'nothing past the end of the range');
  }
  // Offsets are relative to a view; overlapping ranges in one buffer move like memmove.
  const view = shared.subarray(100, 200);
  view.set([1, 2, 3, 4, 5, 6]);
  native.copy(view, 2, view, 0, 4);
  assert.deepEqual([...view.subarray(0, 6)], [1, 2, 1, 2, 3, 4]);
  native.copy(shared.buffer, 0, view, 0, 2);
  assert.deepEqual([...shared.subarray(0, 2)], [1, 2]);
  shared.fill(9);
  for (const [dst, dOff, src, sOff, n] of [
    [view, 99, plain, 0, 2], // past the view's end, although inside its buffer
    [shared, 4096, plain, 0, 1],
    [shared, 0, plain, 4000, 97],
    [shared, 0, plain, 0, 2 ** 32 - 1],
    [shared, -1, plain, 0, 1],
    [shared, 0.5, plain, 0, 1],
  ] as const) {
    assertSystemError(() => native.copy(dst, dOff, src, sOff, n), 'EINVAL', 'copy');
  }
  assertSystemError(() => native.copy({} as Uint8Array, 0, plain, 0, 1), 'EINVAL', 'copy');
  assert.ok(shared.every((b) => b === 9), 'a refused copy wrote nothing');
});

test('tunOpen with a vnet header: writes take a 12-byte virtio-net header, TUNSETOFFLOAD takes TUN_F_* bits', () => {
  const name = `vutestvh${process.pid}`.slice(0, 15);
  const tap = native.tunOpen(name, false, true);
  try {
    execFileSync('ip', ['link', 'set', 'dev', name, 'up']);
    const rxBefore = Number(readFileSync(`/sys/class/net/${name}/statistics/rx_packets`, 'utf8'));
    const frame = Buffer.alloc(12 + 60);
    frame.fill(0xff, 12, 18);
    frame.writeUInt16BE(0x88b5, 12 + 12);
    assert.equal(writeSync(tap.fd, frame), 72, 'header + frame in one write');
    assert.equal(Number(readFileSync(`/sys/class/net/${name}/statistics/rx_packets`, 'utf8')), rxBefore + 1);
    const { CSUM, TSO4, TSO6, TSO_ECN } = native.TunOffload;
    native.tunSetOffload(tap.fd, CSUM | TSO4 | TSO6 | TSO_ECN);
    native.tunSetOffload(tap.fd, 0);
    assertSystemError(() => native.tunSetOffload(tap.fd, 0x4000_0000), 'EINVAL', 'ioctl');
  } finally {
    native.close(tap.fd);
  }
});

test('timerfd: disarmed at first, readable once armed and expired, read as a count like an eventfd; bad delays refused', async () => {
  const fd = native.timerfdCreate();
  try {
    const fds = Int32Array.of(fd);
    const revents = new Int32Array(1);
    assert.equal(native.poll(fds, revents, 0), 0, 'disarmed: not readable');
    native.timerfdArm(fd, 20);
    assert.equal(native.poll(fds, revents, 0), 0, 'not before it expires');
    assert.equal(native.poll(fds, revents, 2000), 1);
    assert.equal(native.eventfdRead(fd), 1, 'one expiry');
    assert.equal(native.eventfdRead(fd), 0, 'reset by the read');
    native.timerfdArm(fd, 10_000);
    native.timerfdArm(fd, 0); // disarms
    await sleep(30);
    assert.equal(native.poll(fds, revents, 0), 0);
    for (const ms of [-1, Number.NaN, 86_400_001]) assertSystemError(() => native.timerfdArm(fd, ms), 'EINVAL', 'timerfd_settime');
  } finally {
    native.close(fd);
  }
});

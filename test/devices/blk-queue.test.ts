// virtio-blk requests (VIRTIO 1.2 §5.2.6) through a real split queue over test memory, against a real image file.
// Each case builds the chain a driver would, lets the device handle it, and checks status, data and file.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { BlkQueueHandler, type BlkQueueOptions } from '../../src/devices/blk/blk-queue.js';
import { BlkRequestType, BlkStatus } from '../../src/devices/blk/constants.js';
import type { Segment } from '../../src/queue/split-queue-driver.js';
import { BUF_BASE, HOLE_AB, REGION_B, REGION_C, codeOf, queuePair } from '../queue/test-memory.js';

const IMAGE_SIZE = 64 * 1024;

/** A temp image whose byte i is (i * 7) & 0xff, and a handler over it. */
function setup(options: { readOnly?: boolean } = {}): {
  handler: BlkQueueHandler;
  image: string;
  pair: ReturnType<typeof queuePair>;
  run: (segments: Segment[]) => number;
  done: () => void;
} {
  const dir = mkdtempSync(join(tmpdir(), 'vhost-user-blk-'));
  const image = join(dir, 'disk.img');
  writeFileSync(image, Uint8Array.from({ length: IMAGE_SIZE }, (_, i) => (i * 7) & 0xff));
  const opts: BlkQueueOptions = {
    backend: { kind: 'file', path: image, readOnly: options.readOnly ?? false },
    serial: 'serial-0123456789abcdef-too-long'.slice(0, 20),
    capacityBytes: IMAGE_SIZE,
  };
  const handler = new BlkQueueHandler(opts);
  const pair = queuePair({ size: 16 });
  const run = (segments: Segment[]): number => {
    assert.notEqual(pair.driver.addChain(segments, 'req'), -1);
    pair.driver.publish();
    assert.ok(pair.queue.popChain(pair.mem, pair.chain));
    return handler.process(pair.mem, pair.chain);
  };
  return {
    handler,
    image,
    pair,
    run,
    done: () => {
      handler.close();
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

/** The 16-byte request header: type, reserved, sector. */
function header(type: number, sector = 0): Uint8Array {
  const b = Buffer.alloc(16);
  b.writeUInt32LE(type, 0);
  b.writeBigUInt64LE(BigInt(sector), 8);
  return b;
}

const HDR = BUF_BASE; // header at 0x8000
const STATUS = BUF_BASE + 0x100; // status byte
const DATA = BUF_BASE + 0x1000;

test('IN reads sectors straight into guest buffers, also across two adjacent regions', () => {
  const { pair, run, done } = setup();
  try {
    pair.mem.write(HDR, header(BlkRequestType.IN, 2));
    // 1024 bytes: the buffer starts 512 bytes before the end of region B and continues in region C.
    const buf = REGION_C - 512;
    const len = run([
      { addr: HDR, len: 16, writable: false },
      { addr: buf, len: 1024, writable: true },
      { addr: STATUS, len: 1, writable: true },
    ]);
    assert.equal(len, 1025);
    assert.equal(pair.mem.read(STATUS, 1)[0], BlkStatus.OK);
    const data = pair.mem.read(buf, 1024);
    assert.deepEqual([...data.subarray(0, 4)], [0, 7, 14, 21].map((x) => (x + 1024 * 7) & 0xff));
    assert.equal(data[1023], ((1024 + 1023) * 7) & 0xff);
  } finally {
    done();
  }
});

test('OUT with header, data and status in any layout (header and data in one descriptor)', () => {
  const { pair, run, image, done } = setup();
  try {
    const req = Buffer.concat([header(BlkRequestType.OUT, 1), Buffer.alloc(512, 0xab)]);
    pair.mem.write(REGION_B, req);
    const len = run([
      { addr: REGION_B, len: req.length, writable: false },
      { addr: STATUS, len: 1, writable: true },
    ]);
    assert.equal(len, 1);
    assert.equal(pair.mem.read(STATUS, 1)[0], BlkStatus.OK);
    const file = readFileSync(image);
    assert.ok(file.subarray(512, 1024).every((b) => b === 0xab));
    assert.equal(file[1024], (1024 * 7) & 0xff, 'nothing past the request was touched');
  } finally {
    done();
  }
});

test('status byte: OK for FLUSH, the serial for GET_ID, UNSUPP for unknown types', () => {
  const { pair, run, done } = setup();
  try {
    pair.mem.write(HDR, header(BlkRequestType.FLUSH));
    assert.equal(run([{ addr: HDR, len: 16, writable: false }, { addr: STATUS, len: 1, writable: true }]), 1);
    assert.equal(pair.mem.read(STATUS, 1)[0], BlkStatus.OK);

    pair.mem.write(HDR, header(BlkRequestType.GET_ID));
    const len = run([
      { addr: HDR, len: 16, writable: false },
      { addr: DATA, len: 20, writable: true },
      { addr: STATUS, len: 1, writable: true },
    ]);
    assert.equal(len, 21);
    assert.equal(Buffer.from(pair.mem.read(DATA, 20)).toString(), 'serial-0123456789abc');
    assert.equal(pair.mem.read(STATUS, 1)[0], BlkStatus.OK);

    pair.mem.write(HDR, header(99));
    run([{ addr: HDR, len: 16, writable: false }, { addr: STATUS, len: 1, writable: true }]);
    assert.equal(pair.mem.read(STATUS, 1)[0], BlkStatus.UNSUPP);
  } finally {
    done();
  }
});

test('IOERR: past the end of the device, sector near 2^64, partial sectors, writes to a read-only device', () => {
  const { pair, run, done } = setup();
  const ro = setup({ readOnly: true });
  try {
    const cases: [number, bigint | number, number][] = [
      [BlkRequestType.IN, IMAGE_SIZE / 512 - 1, 1024], // one sector past the end
      [BlkRequestType.IN, 0xffff_ffff_ffff_fff0n, 512], // overflows when multiplied by 512
      [BlkRequestType.IN, 0, 100], // not a multiple of 512
      [BlkRequestType.OUT, IMAGE_SIZE / 512, 512],
    ];
    for (const [type, sector, n] of cases) {
      const h = Buffer.alloc(16);
      h.writeUInt32LE(type, 0);
      h.writeBigUInt64LE(BigInt(sector), 8);
      pair.mem.write(HDR, h);
      pair.mem.write(STATUS, [0xee]);
      run([
        { addr: HDR, len: 16, writable: false },
        { addr: DATA, len: n, writable: type === BlkRequestType.IN },
        { addr: STATUS, len: 1, writable: true },
      ]);
      assert.equal(pair.mem.read(STATUS, 1)[0], BlkStatus.IOERR, `type ${type} sector ${sector} len ${n}`);
    }
    ro.pair.mem.write(HDR, header(BlkRequestType.OUT, 0));
    ro.run([
      { addr: HDR, len: 16, writable: false },
      { addr: DATA, len: 512, writable: false },
      { addr: STATUS, len: 1, writable: true },
    ]);
    assert.equal(ro.pair.mem.read(STATUS, 1)[0], BlkStatus.IOERR);
  } finally {
    done();
    ro.done();
  }
});

test('WRITE_ZEROES zeroes the range; DISCARD succeeds; bad segment counts and flags are refused', () => {
  const { pair, run, image, done } = setup();
  try {
    const seg = (sector: number, sectors: number, flags = 0): Buffer => {
      const b = Buffer.alloc(16);
      b.writeBigUInt64LE(BigInt(sector), 0);
      b.writeUInt32LE(sectors, 8);
      b.writeUInt32LE(flags, 12);
      return b;
    };
    const send = (type: number, payload: Buffer): number => {
      pair.mem.write(HDR, Buffer.concat([header(type), payload]));
      run([{ addr: HDR, len: 16 + payload.length, writable: false }, { addr: STATUS, len: 1, writable: true }]);
      return pair.mem.read(STATUS, 1)[0] ?? -1;
    };
    assert.equal(send(BlkRequestType.WRITE_ZEROES, seg(4, 2)), BlkStatus.OK);
    const file = readFileSync(image);
    assert.ok(file.subarray(2048, 3072).every((b) => b === 0));
    assert.equal(file[3072], (3072 * 7) & 0xff);
    assert.equal(send(BlkRequestType.DISCARD, seg(0, 1)), BlkStatus.OK);
    assert.equal(send(BlkRequestType.DISCARD, Buffer.concat([seg(0, 1), seg(2, 1)])), BlkStatus.IOERR, 'max_discard_seg is 1');
    assert.equal(send(BlkRequestType.WRITE_ZEROES, seg(0, 1, 0x80)), BlkStatus.UNSUPP);
    assert.equal(send(BlkRequestType.WRITE_ZEROES, seg(IMAGE_SIZE / 512, 1)), BlkStatus.IOERR);
  } finally {
    done();
  }
});

test('chains the device cannot answer need a reset: no status byte, short header, buffer in a hole', () => {
  const { pair, run, done } = setup();
  try {
    pair.mem.write(HDR, header(BlkRequestType.IN));
    assert.equal(codeOf(() => run([{ addr: HDR, len: 16, writable: false }])), 'VIRTIO_BLK_NO_STATUS');
    assert.equal(
      codeOf(() => run([{ addr: HDR, len: 8, writable: false }, { addr: STATUS, len: 1, writable: true }])),
      'VIRTIO_BLK_SHORT_HEADER',
    );
    assert.equal(
      codeOf(() =>
        run([
          { addr: HDR, len: 16, writable: false },
          { addr: HOLE_AB, len: 512, writable: true },
          { addr: STATUS, len: 1, writable: true },
        ]),
      ),
      'GUEST_MEMORY_UNMAPPED',
    );
  } finally {
    done();
  }
});

// Region mapping and table lookups, over real memfds: offsets (mmap_offset, also unaligned), GPA and frontend-VA
// translation, region ends, overlap and overflow checks.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readSync, writeSync } from 'node:fs';
import { MemoryTable } from '../../src/memory/memory-table.js';
import { mapRegion, regionMatches, sameRegion, type MappedRegion, type RegionDescriptor } from '../../src/memory/region.js';
import * as native from '../../src/native/index.js';
import { ProtocolError, VirtioError } from '../../src/errors.js';

const MiB = 1024 * 1024;

function desc(gpa: number, size: number, uva: number, offset = 0): RegionDescriptor {
  return { guestPhysAddr: BigInt(gpa), memorySize: BigInt(size), userspaceAddr: BigInt(uva), mmapOffset: BigInt(offset) };
}

/** Runs `fn` with a memfd of `size` bytes, closed afterwards. */
function withMemfd<T>(size: number, fn: (fd: number) => T): T {
  const fd = native.memfdCreate('table-test', size);
  try {
    return fn(fd);
  } finally {
    native.close(fd);
  }
}

test('two regions of one memfd, the second at an mmap offset (QEMU -m 3G shape)', () => {
  withMemfd(3 * MiB, (fd) => {
    writeSync(fd, Buffer.from('low'), 0, 3, 0);
    writeSync(fd, Buffer.from('high'), 0, 4, 2 * MiB);
    // gpa 0..2M from file offset 0; gpa 4M..5M from file offset 2M; frontend VAs as QEMU would send them
    const low = mapRegion(desc(0, 2 * MiB, 0x7f00_0000_0000), fd);
    const high = mapRegion(desc(4 * MiB, MiB, 0x7f00_0020_0000, 2 * MiB), fd);
    const table = new MemoryTable([high, low]);
    assert.deepEqual(table.regions.map((r) => r.gpa), [0, 4 * MiB], 'sorted by guest address');
    assert.equal(Buffer.from(table.view(0, 3)).toString(), 'low');
    assert.equal(Buffer.from(table.view(4 * MiB, 4)).toString(), 'high');
    // A view is clipped at the region's end; the hole between regions is unmapped.
    assert.equal(table.view(2 * MiB - 10, 100).length, 10);
    assert.throws(() => table.view(3 * MiB, 1), (e: unknown) => e instanceof VirtioError && e.code === 'GUEST_MEMORY_UNMAPPED');
    assert.throws(() => table.view(5 * MiB, 1), (e: unknown) => e instanceof VirtioError && e.code === 'GUEST_MEMORY_UNMAPPED');
    assert.equal(table.view(5 * MiB, 0).length, 0, 'an empty access at a region end is fine');
    // Frontend VA -> GPA, the way ring addresses are translated; a ring must not straddle a region end.
    assert.equal(table.uvaToGpa(0x7f00_0020_0000 + 0x1000, 0x100), 4 * MiB + 0x1000);
    assert.equal(table.uvaToGpa(0x7f00_0000_0010, 16), 0x10);
    assert.throws(() => table.uvaToGpa(0x7f00_0020_0000 + MiB - 8, 16), { code: 'VHOST_PROTOCOL_BAD_RING_ADDRESS' });
    assert.throws(() => table.uvaToGpa(0x1000, 16), { code: 'VHOST_PROTOCOL_BAD_RING_ADDRESS' });
    // Writes through the table reach the file at the right offset.
    table.view(4 * MiB + 8, 2).set([0xab, 0xcd]);
    const b = Buffer.alloc(2);
    assert.equal(readSync(fd, b, 0, 2, 2 * MiB + 8), 2);
    assert.deepEqual([...b], [0xab, 0xcd]);
    native.revoke(low.buffer);
    native.revoke(high.buffer);
  });
});

test('an mmap offset that is not page-aligned is mapped from the page below it', () => {
  withMemfd(2 * native.PAGE_SIZE, (fd) => {
    writeSync(fd, Buffer.from('X'), 0, 1, native.PAGE_SIZE + 100);
    const r = mapRegion(desc(0x10000, 1000, 0x5000_0000, native.PAGE_SIZE + 100), fd);
    assert.equal(r.bufferOffset, 100);
    assert.equal(new MemoryTable([r]).view(0x10000, 1)[0], 'X'.charCodeAt(0));
    native.revoke(r.buffer);
  });
});

test('regions are refused when they overflow, are empty, or reach past the end of their file', () => {
  withMemfd(MiB, (fd) => {
    const bad = (d: RegionDescriptor): void =>
      assert.throws(() => mapRegion(d, fd), (e: unknown) => e instanceof ProtocolError && e.code === 'VHOST_PROTOCOL_BAD_REGION');
    bad(desc(0, 0, 0x1000)); // empty
    bad(desc(0, 2 * MiB, 0x1000)); // past the end of the file: would SIGBUS when touched
    bad(desc(0, MiB, 0x1000, 4096)); // offset + size past the end
    bad({ ...desc(0, MiB, 0x1000), guestPhysAddr: 0xffff_ffff_ffff_f000n }); // not representable
    bad({ ...desc(0, MiB, 0x1000), guestPhysAddr: 2n ** 53n - 4096n }); // gpa + size overflows 2^53
    bad({ ...desc(0, MiB, 0x1000), mmapOffset: 2n ** 64n - 4096n });
  });
  assert.throws(() => mapRegion(desc(0, 4096, 0x1000), 987654), { code: 'VHOST_PROTOCOL_BAD_REGION' });
});

test('tables refuse regions that overlap in guest or frontend address space', () => {
  withMemfd(2 * MiB, (fd) => {
    const a = mapRegion(desc(0, MiB, 0x10_0000_0000), fd);
    const b = mapRegion(desc(MiB / 2, MiB, 0x20_0000_0000, MiB), fd); // overlaps a in GPA
    const c = mapRegion(desc(4 * MiB, MiB, 0x10_0000_0000 + 4096, MiB), fd); // overlaps a in frontend VA
    assert.throws(() => new MemoryTable([a, b]), { code: 'VHOST_PROTOCOL_BAD_REGION' });
    assert.throws(() => new MemoryTable([a, c]), { code: 'VHOST_PROTOCOL_BAD_REGION' });
    for (const r of [a, b, c]) native.revoke(r.buffer);
  });
});

test('region identity: the same file, offset and addresses; not the same numbers in a new memfd', () => {
  const mapped: MappedRegion[] = [];
  withMemfd(MiB, (fd1) =>
    withMemfd(MiB, (fd2) => {
      const d = desc(0x100000, MiB, 0x7000_0000);
      const a = mapRegion(d, fd1);
      const fd1Again = native.dup(fd1); // another fd number for the same file, as a re-sent table would have
      const again = mapRegion(d, fd1Again);
      native.close(fd1Again);
      const other = mapRegion(d, fd2);
      mapped.push(a, again, other);
      assert.ok(sameRegion(a, again));
      assert.ok(!sameRegion(a, other), 'a new memfd at the same addresses is different memory');
      assert.ok(regionMatches(a, d, native.fstat(fd1)));
      assert.ok(!regionMatches(a, d, native.fstat(fd2)));
      assert.ok(!regionMatches(a, { ...d, mmapOffset: 4096n }, native.fstat(fd1)));
    }),
  );
  for (const r of mapped) native.revoke(r.buffer);
});

test('with(): adding and removing regions builds a new table and leaves the old one intact', () => {
  withMemfd(2 * MiB, (fd) => {
    const a = mapRegion(desc(0, MiB, 0x1000_0000), fd);
    const b = mapRegion(desc(0x1_0000_0000, MiB, 0x2000_0000, MiB), fd);
    const t1 = new MemoryTable([a]);
    const t2 = t1.with([b]);
    const t3 = t2.with([], [a]);
    assert.deepEqual(t1.regions, [a]);
    assert.deepEqual(t2.regions, [a, b]);
    assert.deepEqual(t3.regions, [b]);
    assert.equal(t3.findRegion(0), undefined);
    assert.equal(t3.findRegion(0x1_0000_0000 + 5), b);
    native.revoke(a.buffer);
    native.revoke(b.buffer);
  });
});

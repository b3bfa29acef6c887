// docs/writing-a-device.md shows the rng device's source files whole (fenced blocks "```ts file=PATH"): each block
// must equal the file it names, so the guide is the code that `npm test` compiles and runs (test/integration/
// rng.test.ts, test/system/rng-guest.test.ts).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';

const root = new URL('../../../', import.meta.url).pathname;

test('every file shown in docs/writing-a-device.md is the file in the repository, verbatim', () => {
  const guide = readFileSync(join(root, 'docs', 'writing-a-device.md'), 'utf8');
  const blocks = [...guide.matchAll(/^```ts file=(\S+)\n([\s\S]*?)^```$/gm)];
  assert.deepEqual(
    blocks.map((b) => b[1]),
    ['src/devices/rng/rng-device.ts', 'src/devices/rng/rng-queue.ts'],
  );
  for (const [, path, text] of blocks) {
    assert.equal(text, readFileSync(join(root, path as string), 'utf8'), `${path} differs from the guide: update one or the other`);
  }
});

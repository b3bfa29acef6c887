/**
 * `npm run bench -- <name> [options]`: runs one benchmark. Benchmarks are not tests: they measure, print a table,
 * and write JSON, Markdown and an SVG chart under bench/results/. Compare only results taken in the same run: the
 * machine has 2 shared cores and absolute rates drift.
 */
const benches: Record<string, () => Promise<{ main(args: string[]): Promise<void> }>> = {
  sync: () => import('./sync.js'),
  blk: () => import('./blk.js'),
  net: () => import('./net.js'),
  'net-guests': () => import('./net-guests.js'),
  scale: () => import('./scale.js'),
  vsock: () => import('./vsock.js'),
};

const [name, ...args] = process.argv.slice(2);
const load = name === undefined ? undefined : benches[name];
if (load === undefined) {
  console.error(`usage: npm run bench -- <${Object.keys(benches).join('|')}> [options]`);
  process.exit(2);
}
await (await load()).main(args);

/**
 * `node dist/bench/profile-summary.js FILE.cpuprofile [N]`: the N (20) functions with the most self time in a V8 CPU
 * profile (as written by `--cpu-prof`, e.g. `npm run bench -- net --profile DIR`), with their share of the samples
 * that were not idle. Prints a markdown table.
 */
import { readFileSync } from 'node:fs';

interface ProfileNode {
  id: number;
  callFrame: { functionName: string; url: string; lineNumber: number };
  hitCount?: number;
}

export function summarize(path: string, top: number): string {
  const profile = JSON.parse(readFileSync(path, 'utf8')) as { nodes: ProfileNode[] };
  const self = new Map<string, number>();
  let busy = 0;
  for (const n of profile.nodes) {
    const hits = n.hitCount ?? 0;
    const name = n.callFrame.functionName || '(anonymous)';
    if (name === '(idle)') continue; // waiting in the event loop: not work
    const file = n.callFrame.url.replace(/^.*\/(dist|node:internal)\//, '');
    const key = `${name} ${file}:${n.callFrame.lineNumber + 1}`;
    self.set(key, (self.get(key) ?? 0) + hits);
    busy += hits;
  }
  const rows = [...self.entries()].sort((a, b) => b[1] - a[1]).slice(0, top);
  const lines = ['| self % | function |', '| --- | --- |'];
  for (const [key, hits] of rows) lines.push(`| ${((100 * hits) / Math.max(1, busy)).toFixed(1)} | \`${key}\` |`);
  return lines.join('\n');
}

const [file, n] = process.argv.slice(2);
if (file === undefined) {
  process.stderr.write('usage: node dist/bench/profile-summary.js FILE.cpuprofile [N]\n');
  process.exit(2);
}
process.stdout.write(`${summarize(file, Number(n ?? 20))}\n`);

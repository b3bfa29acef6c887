#!/usr/bin/env node
// Builds the native addon (build/Release/vhost_user.node) with node-gyp against the running Node's own headers.
// --nodedir points node-gyp at the local headers so it never tries to download them (there may be no network).
// npm passes its bundled node-gyp as npm_config_node_gyp to install scripts; outside npm, node-gyp is looked up
// next to npm itself.
import { spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { dirname, join } from 'node:path';

const prefix = dirname(dirname(process.execPath));
const candidates = [
  process.env.npm_config_node_gyp,
  join(prefix, 'lib', 'node_modules', 'npm', 'node_modules', 'node-gyp', 'bin', 'node-gyp.js'),
].filter((p) => p && existsSync(p));
const nodeGyp = candidates[0];
if (!nodeGyp) {
  console.error('build-native: node-gyp not found (it ships with npm); run this through npm or install node-gyp');
  process.exit(1);
}
const result = spawnSync(process.execPath, [nodeGyp, 'rebuild', `--nodedir=${prefix}`, '--loglevel=warn'], {
  stdio: 'inherit',
  cwd: new URL('..', import.meta.url).pathname,
});
process.exit(result.status ?? 1);

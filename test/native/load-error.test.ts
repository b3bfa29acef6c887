// What a user sees when the addon does not load: built for another Node (ABI mismatch), never built, or not a
// loadable library. A copy of the compiled wrapper (dist/src/native/index.js and errors.js) in a temporary package
// root, with build/Release/vhost_user.node replaced each time, is imported in a child process. The "other Node"
// addon is a tiny library compiled here that registers itself as a module for NODE_MODULE_VERSION 1, as an addon
// built against another Node's headers registers with that Node's number.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { copyFile, mkdir, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { promisify } from 'node:util';
import { repoRoot } from '../helpers/guest.js';
import { testTempDir } from '../helpers/tmp.js';

const execFileAsync = promisify(execFile);

// The struct node_module of node.h, registered the way NODE_MODULE_INIT's static constructor does it.
const FAKE_ADDON = `
extern "C" {
struct node_module {
  int nm_version;
  unsigned int nm_flags;
  void* nm_dso_handle;
  const char* nm_filename;
  void* nm_register_func;
  void* nm_context_register_func;
  const char* nm_modname;
  void* nm_priv;
  struct node_module* nm_link;
};
void node_module_register(void* mod);
}
static node_module fake = {1, 0, nullptr, __FILE__, nullptr, nullptr, "vhost_user", nullptr, nullptr};
__attribute__((constructor)) static void Register() { node_module_register(&fake); }
`;

interface Outcome {
  name: string;
  code: string;
  message: string;
  cause: string;
}

test('an addon that does not load is a VhostError that says how to rebuild it', async (t) => {
  const root = repoRoot();
  const dir = await testTempDir(t, 'vhost-user-load-');
  const pkg = dir.join('pkg');
  await mkdir(join(pkg, 'dist', 'src', 'native'), { recursive: true });
  await mkdir(join(pkg, 'dist', 'src', 'cli'), { recursive: true });
  await mkdir(join(pkg, 'bin'), { recursive: true });
  for (const file of ['native/index.js', 'errors.js']) {
    await copyFile(join(root, 'dist', 'src', file), join(pkg, 'dist', 'src', file));
  }
  await writeFile(join(pkg, 'package.json'), JSON.stringify({ name: 'vhost-user', type: 'module' }));
  // The real bin script, in front of a main.js that only loads the addon.
  await copyFile(join(root, 'bin', 'vhost-user.js'), join(pkg, 'bin', 'vhost-user.js'));
  await writeFile(join(pkg, 'dist', 'src', 'cli', 'main.js'), "import '../native/index.js';\n");
  const release = join(pkg, 'build', 'Release');
  const addon = join(release, 'vhost_user.node');

  const load = async (): Promise<Outcome> => {
    const url = pathToFileURL(join(pkg, 'dist', 'src', 'native', 'index.js')).href;
    const script =
      `try { await import(${JSON.stringify(url)}); console.log('{}'); } catch (e) {` +
      ` console.log(JSON.stringify({ name: e.name, code: e.code, message: e.message, cause: e.cause?.code })); }`;
    const { stdout } = await execFileAsync(process.execPath, ['--input-type=module', '-e', script]);
    return JSON.parse(stdout) as Outcome;
  };
  const rebuildHint = (o: Outcome): void => {
    assert.match(o.message, /npm rebuild vhost-user/);
    assert.match(o.message, /node scripts\/build-native\.js/);
  };

  await t.test('never built: VHOST_NATIVE_MISSING', async () => {
    const o = await load();
    assert.equal(o.name, 'VhostError');
    assert.equal(o.code, 'VHOST_NATIVE_MISSING');
    assert.equal(o.cause, 'MODULE_NOT_FOUND');
    assert.ok(o.message.includes(addon), o.message);
    rebuildHint(o);
  });

  await t.test('built for another Node: VHOST_NATIVE_ABI_MISMATCH names both', async () => {
    await mkdir(release, { recursive: true });
    const source = dir.join('fake.cc');
    await writeFile(source, FAKE_ADDON);
    await execFileAsync('g++', ['-shared', '-fPIC', '-o', addon, source]);
    const thisNode = `Node ${process.version} (NODE_MODULE_VERSION ${process.versions.modules})`;

    let o = await load();
    assert.equal(o.name, 'VhostError');
    assert.equal(o.code, 'VHOST_NATIVE_ABI_MISMATCH');
    assert.equal(o.cause, 'ERR_DLOPEN_FAILED');
    assert.ok(o.message.includes(`built for NODE_MODULE_VERSION 1, but this is ${thisNode}`), o.message);
    assert.ok(o.message.includes(process.execPath), o.message);
    rebuildHint(o);

    // With what scripts/build-native.js records next to the addon, the message names that Node's version.
    const info = { node: 'v18.20.8', modules: '1', execPath: '/opt/node18/bin/node', nodedir: '/opt/node18' };
    await writeFile(join(release, 'vhost_user.json'), JSON.stringify(info));
    o = await load();
    assert.equal(o.code, 'VHOST_NATIVE_ABI_MISMATCH');
    assert.ok(o.message.includes(`built for Node v18.20.8 (NODE_MODULE_VERSION 1), but this is ${thisNode}`), o.message);

    // The command prints one line that says what to do, not a stack trace, and fails.
    const cli = await execFileAsync(process.execPath, [join(pkg, 'bin', 'vhost-user.js'), '--help']).then(
      () => assert.fail('vhost-user started with an addon built for another Node'),
      (err: { code?: number; stderr?: string }) => err,
    );
    assert.equal(cli.code, 1);
    const lines = (cli.stderr ?? '').trim().split('\n');
    assert.equal(lines.length, 1, cli.stderr);
    assert.match(lines[0] ?? '', /^vhost-user: The native addon .* was built for Node v18\.20\.8 .*`npm rebuild vhost-user`/);
    await rm(join(release, 'vhost_user.json'));
  });

  await t.test('not a loadable library: VHOST_NATIVE_LOAD_FAILED with dlopen\'s reason', async () => {
    await writeFile(addon, 'not an ELF file\n');
    const o = await load();
    assert.equal(o.name, 'VhostError');
    assert.equal(o.code, 'VHOST_NATIVE_LOAD_FAILED');
    assert.equal(o.cause, 'ERR_DLOPEN_FAILED');
    assert.match(o.message, /invalid ELF header|file too short/);
    rebuildHint(o);
  });
});

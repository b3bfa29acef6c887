#!/usr/bin/env node
// A native addon that does not load (built for another Node, or never built) is one line that says how to rebuild
// it, not a stack trace.
try {
  await import('../dist/src/cli/main.js');
} catch (err) {
  const code = typeof err === 'object' && err !== null ? err.code : undefined;
  if (typeof code !== 'string' || !code.startsWith('VHOST_NATIVE_')) throw err;
  process.stderr.write(`vhost-user: ${err.message}\n`);
  process.exitCode = 1;
}

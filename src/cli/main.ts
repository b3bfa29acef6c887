/** The `vhost-user` command line. */
import { Command } from 'commander';
import { benchCommand } from './bench-command.js';
import { blkCommand } from './blk-command.js';
import { ctlCommand } from './ctl-command.js';
import { demoCommand } from './demo-command.js';
import { netCommand, switchCommand } from './net-command.js';
import { rngCommand } from './rng-command.js';
import { vsockCommand } from './vsock-command.js';
import { serveCommand } from './serve-command.js';

const program = new Command('vhost-user')
  .description('vhost-user device backends (and a frontend) in TypeScript')
  .showHelpAfterError()
  .addCommand(blkCommand())
  .addCommand(netCommand())
  .addCommand(switchCommand())
  .addCommand(rngCommand())
  .addCommand(vsockCommand())
  .addCommand(serveCommand())
  .addCommand(demoCommand())
  .addCommand(benchCommand())
  .addCommand(ctlCommand());

try {
  await program.parseAsync(process.argv);
} catch (err) {
  process.stderr.write(`vhost-user: ${err instanceof Error ? err.message : String(err)}\n`);
  process.exitCode = 1;
}

/**
 * Host tools that system tests need. A missing tool skips the test locally and fails it under CI=true,
 * so CI can never pass by skipping everything.
 *
 *     if (!requireTools(t, [...GUEST_TOOLS, ...QSD_TOOLS])) return;
 */
import { accessSync, constants } from 'node:fs';
import { delimiter, join } from 'node:path';
import type { TestContext } from 'node:test';

/**
 * Debian packages the test suite needs. `.ci/run` installs exactly these (a test checks that it does), and
 * the docs list them. xz-utils is only needed to extract the uncompressed kernel (boots about 2 s faster
 * under TCG); without it the guest boots the bzImage. dpdk-dev ships dpdk-testpmd, the third-party vhost-user-net
 * frontend and backend of the net system tests and the net benchmark.
 */
export const DEBIAN_TEST_PACKAGES = [
  'qemu-system-x86',
  'qemu-utils',
  'busybox-static',
  'linux-image-amd64',
  'xz-utils',
  'spin',
  'dpdk-dev',
  'iproute2',
  'nbdkit',
  'openssl',
  'socat',
] as const;

export type DebianPackage = (typeof DEBIAN_TEST_PACKAGES)[number];

/** One thing a test needs: a binary on PATH, a file, or a custom check; and the package that provides it. */
export type ToolRequirement =
  | { readonly bin: string; readonly pkg: DebianPackage }
  | { readonly file: string; readonly pkg: DebianPackage }
  | { readonly check: () => boolean; readonly what: string; readonly pkg: DebianPackage };

/** The absolute path of an executable on PATH, or undefined. */
export function findBinary(bin: string): string | undefined {
  const dirs = (process.env.PATH ?? '/usr/local/bin:/usr/bin:/bin').split(delimiter).filter((d) => d !== '');
  for (const dir of [...dirs, '/usr/sbin', '/sbin']) {
    const candidate = join(dir, bin);
    try {
      accessSync(candidate, constants.X_OK);
      return candidate;
    } catch {
      // not in this directory
    }
  }
  return undefined;
}

function describe(req: ToolRequirement): string {
  if ('bin' in req) return req.bin;
  if ('file' in req) return req.file;
  return req.what;
}

function present(req: ToolRequirement): boolean {
  if ('bin' in req) return findBinary(req.bin) !== undefined;
  if ('file' in req) {
    try {
      accessSync(req.file, constants.R_OK);
      return true;
    } catch {
      return false;
    }
  }
  return req.check();
}

/** The requirements that are not met, with the message a test reports for them (undefined if all are met). */
export function missingTools(reqs: readonly ToolRequirement[]): string | undefined {
  const missing = reqs.filter((r) => !present(r));
  if (missing.length === 0) return undefined;
  const pkgs = [...new Set(missing.map((r) => r.pkg))];
  const label = pkgs.length === 1 ? 'package' : 'packages';
  const what = missing.map(describe).join(', ');
  return `needs Debian ${label} ${pkgs.join(' ')} (missing: ${what}; apt-get install -y ${pkgs.join(' ')})`;
}

/**
 * Returns true when every requirement is met. Otherwise, under CI=true it throws (the test fails with a
 * message naming the Debian packages); elsewhere it marks the test skipped and returns false, and the
 * test should return at once.
 */
export function requireTools(t: TestContext, reqs: readonly ToolRequirement[]): boolean {
  const message = missingTools(reqs);
  if (message === undefined) return true;
  if (process.env.CI === 'true') throw new Error(`CI=true and this test ${message}`);
  t.skip(message);
  return false;
}

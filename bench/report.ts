/**
 * Benchmark output: results as JSON, a Markdown table and an SVG bar chart under bench/results/. No dependencies:
 * the chart is a small hand-built SVG (grouped bars with a labelled value axis).
 */
import { mkdirSync, writeFileSync } from 'node:fs';
import { arch, cpus, release } from 'node:os';
import { join } from 'node:path';

export const RESULTS_DIR = new URL('../../bench/results/', import.meta.url).pathname;

/** The machine a run was taken on, written beside every result. */
export function machine(): Record<string, string | number> {
  const cpu = cpus();
  return {
    node: process.version,
    kernel: release(),
    arch: arch(),
    cpus: cpu.length,
    cpuModel: cpu[0]?.model ?? 'unknown',
    date: new Date().toISOString(),
  };
}

export interface Table {
  columns: string[];
  rows: (string | number)[][];
}

export function markdownTable(t: Table): string {
  const fmt = (v: string | number): string => (typeof v === 'number' ? formatNumber(v) : v);
  const lines = [
    `| ${t.columns.join(' | ')} |`,
    `| ${t.columns.map(() => '---').join(' | ')} |`,
    ...t.rows.map((r) => `| ${r.map(fmt).join(' | ')} |`),
  ];
  return lines.join('\n');
}

export function formatNumber(v: number): string {
  if (!Number.isFinite(v)) return String(v);
  if (Math.abs(v) >= 1000) return Math.round(v).toLocaleString('en-US');
  if (Math.abs(v) >= 10) return v.toFixed(1);
  return v.toFixed(3);
}

export interface BarChart {
  title: string;
  yLabel: string;
  /** Groups along the x axis. */
  categories: string[];
  /** One bar per series in each group. */
  series: { name: string; values: number[] }[];
}

const COLORS = ['#1b6ca8', '#e07b24', '#3a9a48', '#b23a48', '#7a5195', '#6d6d6d'];

function escapeXml(s: string): string {
  return s.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;');
}

export function barChartSvg(c: BarChart): string {
  const width = 760;
  const height = 380;
  const left = 80;
  const right = 20;
  const top = 40;
  const bottom = 70;
  const plotW = width - left - right;
  const plotH = height - top - bottom;
  const max = Math.max(1e-9, ...c.series.flatMap((s) => s.values.filter(Number.isFinite)));
  const step = niceStep(max / 5);
  const yMax = Math.ceil(max / step) * step;
  const groupW = plotW / Math.max(1, c.categories.length);
  const barW = (groupW * 0.8) / Math.max(1, c.series.length);
  const y = (v: number): number => top + plotH - (v / yMax) * plotH;
  const out: string[] = [
    `<svg xmlns="http://www.w3.org/2000/svg" width="${width}" height="${height}" font-family="sans-serif" font-size="12">`,
    `<rect width="${width}" height="${height}" fill="white"/>`,
    `<text x="${width / 2}" y="22" text-anchor="middle" font-size="15">${escapeXml(c.title)}</text>`,
    `<text transform="translate(16,${top + plotH / 2}) rotate(-90)" text-anchor="middle">${escapeXml(c.yLabel)}</text>`,
  ];
  for (let v = 0; v <= yMax + step / 2; v += step) {
    out.push(`<line x1="${left}" x2="${left + plotW}" y1="${y(v)}" y2="${y(v)}" stroke="#ddd"/>`);
    out.push(`<text x="${left - 6}" y="${y(v) + 4}" text-anchor="end">${formatNumber(v)}</text>`);
  }
  c.categories.forEach((cat, i) => {
    const gx = left + i * groupW + groupW * 0.1;
    c.series.forEach((s, j) => {
      const v = s.values[i] ?? 0;
      if (!Number.isFinite(v)) return;
      out.push(
        `<rect x="${gx + j * barW}" y="${y(v)}" width="${barW - 2}" height="${top + plotH - y(v)}" fill="${COLORS[j % COLORS.length]}"><title>${escapeXml(`${s.name} ${cat}: ${formatNumber(v)}`)}</title></rect>`,
      );
    });
    out.push(`<text x="${left + i * groupW + groupW / 2}" y="${top + plotH + 18}" text-anchor="middle">${escapeXml(cat)}</text>`);
  });
  c.series.forEach((s, j) => {
    const lx = left + j * 150;
    out.push(`<rect x="${lx}" y="${height - 28}" width="12" height="12" fill="${COLORS[j % COLORS.length]}"/>`);
    out.push(`<text x="${lx + 18}" y="${height - 18}">${escapeXml(s.name)}</text>`);
  });
  out.push(`<line x1="${left}" x2="${left}" y1="${top}" y2="${top + plotH}" stroke="black"/>`);
  out.push(`<line x1="${left}" x2="${left + plotW}" y1="${top + plotH}" y2="${top + plotH}" stroke="black"/>`);
  out.push('</svg>');
  return out.join('\n');
}

function niceStep(raw: number): number {
  const p = 10 ** Math.floor(Math.log10(raw));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= raw) return m * p;
  return 10 * p;
}

/** Writes `<name>.json`, `<name>.md` and `<name>.svg`; returns their paths. */
export function writeResults(name: string, json: unknown, markdown: string, chart: BarChart): string[] {
  mkdirSync(RESULTS_DIR, { recursive: true });
  const paths = [join(RESULTS_DIR, `${name}.json`), join(RESULTS_DIR, `${name}.md`), join(RESULTS_DIR, `${name}.svg`)];
  writeFileSync(paths[0] as string, `${JSON.stringify(json, (_k, v: unknown) => (typeof v === 'bigint' ? v.toString() : v), 2)}\n`);
  writeFileSync(paths[1] as string, `${markdown}\n`);
  writeFileSync(paths[2] as string, barChartSvg(chart));
  return paths;
}

/** Percentile of a sorted array (nearest rank). */
export function percentile(sorted: readonly number[], p: number): number {
  if (sorted.length === 0) return NaN;
  const i = Math.min(sorted.length - 1, Math.max(0, Math.ceil((p / 100) * sorted.length) - 1));
  return sorted[i] as number;
}

export function median(values: readonly number[]): number {
  return percentile([...values].sort((a, b) => a - b), 50);
}

// Turns bench/results/raw (samples.tsv, machine.txt) into the markdown report on stdout.
// Medians over rounds; ratios are ratios of medians; targets are issue 6's.
'use strict';
const fs = require('node:fs');
const path = require('node:path');

const raw = process.argv[2];
const rows = fs.readFileSync(path.join(raw, 'samples.tsv'), 'utf8').trim().split('\n')
  .filter(Boolean).map((l) => l.split('\t'));
const machine = Object.fromEntries(fs.readFileSync(path.join(raw, 'machine.txt'), 'utf8')
  .trim().split('\n').map((l) => [l.slice(0, l.indexOf('=')), l.slice(l.indexOf('=') + 1)]));

const median = (v) => {
  if (!v.length) return NaN;
  const s = v.slice().sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
};
const values = (cat, sys, metric) => rows
  .filter((r) => r[0] === cat && r[1] === sys && (cat !== 'http' || r[2] === metric))
  .map((r) => (cat === 'http' ? Number(r[4]) : JSON.parse(r[4])[metric]))
  .filter((x) => Number.isFinite(x) && x > 0);
const med = (cat, sys, metric) => median(values(cat, sys, metric));
const range = (cat, sys, metric) => {
  const v = values(cat, sys, metric);
  return v.length ? [Math.min(...v), Math.max(...v)] : null;
};
const fmtN = (x) => (Number.isFinite(x) ? Math.round(x).toLocaleString('en-US') : 'n/a');
const fmtK = (x) => (Number.isFinite(x) ? (x >= 1e6 ? `${(x / 1e6).toFixed(2)}M` : `${(x / 1e3).toFixed(1)}k`) : 'n/a');
const fmtX = (x) => (Number.isFinite(x) ? `${x.toFixed(2)}x` : 'n/a');
const fmtR = (r, f) => (r ? `${f(r[0])}-${f(r[1])}` : 'n/a');

const out = [];
const p = (s = '') => out.push(s);

p('# Benchmark results');
p();
p(`${machine.date}, commit \`${machine.commit}\`. Machine: ${machine.nproc} CPUs (${machine.cpu}), `
  + `${machine.memory}, ${machine.kernel}; ${machine.rustc}; Node ${machine.node}; ${machine.wrk}. `
  + `${machine.params}. Medians over rounds (min-max in brackets); systems run in turns.`);
p();

const http = [
  ['ours-rr', '`hello_http`, 2 workers, round-robin'],
  ['ours-shared', '`hello_http`, 2 workers, shared'],
  ['ours-reuseport', '`hello_http`, 2 workers, reuseport'],
  ['node-rr', 'Node cluster, 2 workers, round-robin'],
  ['node-none', 'Node cluster, 2 workers, SCHED_NONE'],
  ['tokio', 'tokio + hyper, 1 process, multi-thread'],
];
const ka = (s) => med('http', s, 'keepalive');
const cl = (s) => med('http', s, 'close');
if (rows.some((r) => r[0] === 'http')) {
  p(`## HTTP (\`wrk ${machine.wrkargs}\`, loopback; keep-alive, and with \`-H 'Connection: close'\`)`);
  p();
  p('| system | keep-alive req/s | `Connection: close` req/s | keep-alive vs Node RR | close vs Node RR | keep-alive vs tokio | close vs tokio |');
  p('|---|---:|---:|---:|---:|---:|---:|');
  for (const [s, name] of http) {
    p(`| ${name} | ${fmtN(ka(s))} (${fmtR(range('http', s, 'keepalive'), fmtK)}) | ${fmtN(cl(s))} (${fmtR(range('http', s, 'close'), fmtK)}) `
      + `| ${fmtX(ka(s) / ka('node-rr'))} | ${fmtX(cl(s) / cl('node-rr'))} | ${fmtX(ka(s) / ka('tokio'))} | ${fmtX(cl(s) / cl('tokio'))} |`);
  }
  p();
}

const ipc = (s, m) => med('ipc', s, m);
const life = (s, m) => med('life', s, m);
if (rows.some((r) => r[0] === 'ipc' || r[0] === 'life')) {
  p('## IPC and lifecycle (1 worker)');
  p();
  p('| metric | ours (cluster) | Node | ours / Node |');
  p('|---|---:|---:|---:|');
  const line = (name, cat, m, f) => {
    const a = med(cat, 'ours', m), b = med(cat, 'node', m);
    p(`| ${name} | ${f(a)} | ${f(b)} | ${fmtX(a / b)} |`);
  };
  const us = (x) => (Number.isFinite(x) ? `${x.toFixed(1)} us` : 'n/a');
  const msf = (x) => (Number.isFinite(x) ? `${x.toFixed(1)} ms` : 'n/a');
  const mib = (x) => (Number.isFinite(x) ? `${(x / 1024).toFixed(1)} MiB` : 'n/a');
  line('worker -> primary, small messages/s', 'ipc', 'msgs_per_s', fmtN);
  line('round trip, median', 'ipc', 'rtt_us_median', us);
  line('round trip, p99', 'ipc', 'rtt_us_p99', us);
  line('all on CPU 0: worker -> primary messages/s', 'ipc1', 'msgs_per_s', fmtN);
  line('all on CPU 0: round trip, median', 'ipc1', 'rtt_us_median', us);
  line('all on CPU 0: round trip, p99', 'ipc1', 'rtt_us_p99', us);
  line('fork -> online', 'life', 'fork_to_online_ms', msf);
  line('fork -> listening', 'life', 'fork_to_listening_ms', msf);
  line('kill -> listening (respawn)', 'life', 'kill_to_listening_ms', msf);
  line('idle worker RSS', 'life', 'worker_rss_kib', mib);
  line('primary RSS', 'life', 'primary_rss_kib', mib);
  p();
}

p('## Issue 6 targets');
p();
p('| target | measured | met |');
p('|---|---:|:---:|');
const target = (name, measured, ok) => p(`| ${name} | ${Number.isFinite(measured) ? fmtX(measured) : 'n/a'} | ${Number.isFinite(measured) ? (ok(measured) ? 'yes' : '**no**') : 'n/a'} |`);
target('RR keep-alive >= 2.0x Node RR', ka('ours-rr') / ka('node-rr'), (x) => x >= 2.0);
target('RR `Connection: close` >= 3.0x Node RR', cl('ours-rr') / cl('node-rr'), (x) => x >= 3.0);
target('RR keep-alive >= 0.9x tokio', ka('ours-rr') / ka('tokio'), (x) => x >= 0.9);
target('RR `Connection: close` >= 0.8x our reuseport', cl('ours-rr') / cl('ours-reuseport'), (x) => x >= 0.8);
target('IPC messages/s >= 20x Node', ipc('ours', 'msgs_per_s') / ipc('node', 'msgs_per_s'), (x) => x >= 20);
target('IPC round trip <= 0.2x Node', ipc('ours', 'rtt_us_median') / ipc('node', 'rtt_us_median'), (x) => x <= 0.2);
target('fork -> online <= 0.1x Node', life('ours', 'fork_to_online_ms') / life('node', 'fork_to_online_ms'), (x) => x <= 0.1);
target('kill -> listening <= 0.1x Node', life('ours', 'kill_to_listening_ms') / life('node', 'kill_to_listening_ms'), (x) => x <= 0.1);
target('idle worker RSS <= 0.1x Node', life('ours', 'worker_rss_kib') / life('node', 'worker_rss_kib'), (x) => x <= 0.1);
p();
const busy = rows.filter((r) => r[0] === 'busy').map((r) => Number(r[4]));
if (busy.length) {
  p(`Other work on the machine before each run (CPU busy over 0.5 s, the script waits up to 60 s for <= 10%): `
    + `median ${median(busy)}%, max ${Math.max(...busy)}%.`);
  p();
}
p('Scaling on 16 cores (issue 6, item 5): not measured by this script.');
process.stdout.write(out.join('\n') + '\n');

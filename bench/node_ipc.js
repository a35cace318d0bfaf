// Node's IPC peer: `process.send` (the default JSON serialization), one worker, small messages.
// Same protocol as bench/peers/src/bin/ipc.rs: a one-way burst of N messages worker -> primary
// (a setImmediate every 1024 sends), then K ping/pong round trips. Prints `RESULT {json}`.
'use strict';
const cluster = require('node:cluster');

const N = Number(process.env.IPC_N || 300000);
const K = Number(process.env.IPC_K || 5000);

if (cluster.isPrimary) {
  const timer = setTimeout(() => { console.error('timed out'); process.exit(1); }, 60000);
  const w = cluster.fork();
  let phase = 'warm', got = 0, t0 = 0n, oneWayNs = 0n, i = 0, tPing = 0n;
  const rtts = [];
  const ping = () => { tPing = process.hrtime.bigint(); w.send({ ping: i }); };
  w.on('online', () => w.send({ burst: 10000 }));
  w.on('message', (m) => {
    if (phase === 'warm') {
      if (++got === 10000) { phase = 'burst'; got = 0; t0 = process.hrtime.bigint(); w.send({ burst: N }); }
    } else if (phase === 'burst') {
      if (++got === N) {
        oneWayNs = process.hrtime.bigint() - t0;
        if (m.tick !== N - 1) { console.error('lost messages'); process.exit(1); }
        phase = 'rtt'; ping();
      }
    } else {
      if (m.pong !== i) { console.error(`expected pong ${i}`); process.exit(1); }
      rtts.push(Number(process.hrtime.bigint() - tPing) / 1e3);
      if (++i < K) return ping();
      rtts.sort((a, b) => a - b);
      const pct = (p) => rtts[Math.floor((rtts.length - 1) * p)];
      console.log('RESULT ' + JSON.stringify({
        system: 'node', n: N, msgs_per_s: Math.round(N / (Number(oneWayNs) / 1e9)), k: K,
        rtt_us_median: +pct(0.5).toFixed(1), rtt_us_p99: +pct(0.99).toFixed(1),
      }));
      clearTimeout(timer);
      w.disconnect();
    }
  });
} else {
  process.on('message', (m) => {
    if (m.burst !== undefined) {
      let n = 0;
      const step = () => {
        const end = Math.min(n + 1024, m.burst);
        for (; n < end; n++) process.send({ tick: n });
        if (n < m.burst) setImmediate(step);
      };
      step();
    } else if (m.ping !== undefined) {
      process.send({ pong: m.ping });
    }
  });
}

// Node's lifecycle peer, same protocol as bench/peers/src/bin/lifecycle.rs: one HTTP worker;
// its idle RSS; then LIFE_ROUNDS times SIGKILL it, fork the replacement on 'exit', and time
// fork -> 'online', fork -> 'listening' and kill -> 'listening'. Prints `RESULT {json}`.
'use strict';
const cluster = require('node:cluster');
const http = require('node:http');
const fs = require('node:fs');

const port = Number(process.env.PORT || 8000);
const rounds = Number(process.env.LIFE_ROUNDS || 10);

const rssKib = (pid) => {
  const m = /VmRSS:\s+(\d+)/.exec(fs.readFileSync(`/proc/${pid}/status`, 'utf8'));
  return m ? Number(m[1]) : 0;
};
const median = (v) => v.slice().sort((a, b) => a - b)[Math.floor(v.length / 2)];
const ms = (t) => Number(process.hrtime.bigint() - t) / 1e6;

if (cluster.isPrimary) {
  const timer = setTimeout(() => { console.error('timed out'); process.exit(1); }, 60000);
  const toOnline = [], toListening = [], respawn = [];
  let rssWorker = 0, rssPrimary = 0, round = 0, tKill = 0n, tFork = 0n;
  const watch = (w, first) => {
    w.on('online', () => { if (!first) toOnline.push(ms(tFork)); });
    w.on('listening', () => {
      if (first) {
        setTimeout(() => { rssWorker = rssKib(w.process.pid); rssPrimary = rssKib(process.pid); kill(w); }, 500);
        return;
      }
      toListening.push(ms(tFork));
      respawn.push(ms(tKill));
      if (++round < rounds) return setTimeout(() => kill(w), 100);
      console.log('RESULT ' + JSON.stringify({
        system: 'node', rounds,
        fork_to_online_ms: +median(toOnline).toFixed(2),
        fork_to_listening_ms: +median(toListening).toFixed(2),
        kill_to_listening_ms: +median(respawn).toFixed(2),
        worker_rss_kib: rssWorker, primary_rss_kib: rssPrimary,
      }));
      clearTimeout(timer);
      w.process.kill('SIGKILL');
      process.exit(0);
    });
  };
  const kill = (w) => {
    w.once('exit', () => { tFork = process.hrtime.bigint(); watch(cluster.fork(), false); });
    tKill = process.hrtime.bigint();
    w.process.kill('SIGKILL');
  };
  watch(cluster.fork(), true);
} else {
  const id = String(cluster.worker.id);
  const body = Buffer.from('hello world\n');
  http
    .createServer((req, res) => {
      res.writeHead(200, { 'content-length': body.length, 'x-worker-id': id });
      res.end(body);
    })
    .listen(port, '127.0.0.1');
}

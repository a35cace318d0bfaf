// Node's cluster peer for the HTTP benchmark: the same response as examples/hello_http
// (`hello world\n`, `x-worker-id`). Env: PORT, WORKERS (default 2), SCHED = rr | none.
'use strict';
const cluster = require('node:cluster');
const http = require('node:http');

const port = Number(process.env.PORT || 8000);
const workers = Number(process.env.WORKERS || 2);
cluster.schedulingPolicy = process.env.SCHED === 'none' ? cluster.SCHED_NONE : cluster.SCHED_RR;

if (cluster.isPrimary) {
  console.log(`Primary ${process.pid} is running (${process.env.SCHED || 'rr'})`);
  for (let i = 0; i < workers; i++) cluster.fork();
  process.on('SIGTERM', () => {
    for (const id in cluster.workers) cluster.workers[id].process.kill('SIGTERM');
    process.exit(0);
  });
} else {
  const id = String(cluster.worker.id);
  const body = Buffer.from('hello world\n');
  http
    .createServer((req, res) => {
      res.writeHead(200, { 'content-length': body.length, 'x-worker-id': id });
      res.end(body);
    })
    .listen(port, '0.0.0.0', () => console.log(`Worker ${process.pid} started`));
}

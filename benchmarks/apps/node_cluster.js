// Node.js's own cluster running the classic hello-world program.
//
// PORT and WORKERS come from the environment; BENCH_SCHED=rr|none picks
// cluster.SCHED_RR (the primary accepts and hands connections round-robin, Node's
// default on Linux) or cluster.SCHED_NONE (every worker accepts on the shared socket).
// Responses carry X-Worker-Pid like every other server in the benchmark. A worker that
// exits unasked is forked again.
'use strict';
const cluster = require('node:cluster');
const http = require('node:http');

const port = Number(process.env.PORT || 8000);
const workers = Number(process.env.WORKERS || 2);
cluster.schedulingPolicy = process.env.BENCH_SCHED === 'none' ? cluster.SCHED_NONE : cluster.SCHED_RR;

if (cluster.isPrimary) {
  for (let i = 0; i < workers; i++) cluster.fork();
  let stopping = false;
  // A worker that dies is replaced, as production code on Node's cluster does (the module
  // itself does not): the benchmark's `replace` measure times this handler.
  cluster.on('exit', () => {
    if (!stopping) cluster.fork();
  });
  const stop = () => {
    stopping = true;
    for (const id in cluster.workers) cluster.workers[id].kill('SIGTERM');
    process.exit(0);
  };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
} else {
  const pid = String(process.pid);
  http.createServer((req, res) => {
    res.writeHead(200, { 'Content-Type': 'text/plain', 'X-Worker-Pid': pid });
    res.end('Hello, World!');
  }).listen(port, '127.0.0.1');
}

// A third-party Bazel-protocol worker: a Node program on npm's @bazel/worker,
// used to show that the bridge runs workers it knows nothing about.
//
// Each request is `[--work-ms N] OUTFILE`: after N ms the worker writes the
// file name of OUTFILE and a newline to OUTFILE (relative to its cwd) and says
// so on stderr, which @bazel/worker returns as the response's output.
'use strict';
const fs = require('fs');
const path = require('path');
const worker = require('@bazel/worker');

async function build(args) {
  let workMs = 0;
  const rest = [];
  for (let i = 0; i < args.length; i++) {
    if (args[i] === '--work-ms') {
      workMs = Number(args[++i]);
    } else {
      rest.push(args[i]);
    }
  }
  if (rest.length !== 1) {
    console.error(`node worker: expected exactly one OUTFILE, got ${rest.length}`);
    return false;
  }
  await new Promise((resolve) => setTimeout(resolve, workMs));
  const out = rest[0];
  fs.writeFileSync(out, path.basename(out) + '\n');
  console.error(`node worker (pid ${process.pid}): wrote ${out}`);
  return true;
}

if (worker.runAsWorker(process.argv)) {
  worker.runWorkerLoop(build);
} else {
  build(process.argv.slice(2)).then((ok) => process.exit(ok ? 0 : 1));
}

#!/usr/bin/env bash
# Builds the worker and shows each mode working, with its real output.
# Usage: ci/demo.sh            (from the repository root)
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== building (release)"
cargo build --release --quiet
bin="$PWD/target/release/persistent-worker"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"

echo
echo "== one-shot: persistent-worker @args   (args holds one line: out/one-shot.txt)"
mkdir out
echo "out/one-shot.txt" > args
"$bin" @args
echo "exit code $?; out/one-shot.txt contains: $(cat out/one-shot.txt)"

echo
echo "== one-shot with a usage error (two outfiles): exit code 2, the worker's message"
"$bin" a b || echo "exit code $?"

echo
echo "== Bazel worker, JSON protocol: three requests on stdin, responses on stdout"
printf '%s\n' \
  '{"arguments":["out/a.txt"],"requestId":1}' \
  '{"arguments":["--work-ms","300","out/b.txt"],"requestId":2}' \
  '{"arguments":["too","many"],"requestId":3}' |
  "$bin" --worker-protocol json --concurrency 2 --verbose --persistent_worker
echo "exit code $?; out/a.txt contains: $(cat out/a.txt); out/b.txt contains: $(cat out/b.txt)"

client="$OLDPWD/target/release/worker-client"
if [ -x "$client" ]; then
  echo
  echo "== Bazel worker, proto protocol, driven by worker-client"
  "$client" bazel --arg out/c.txt -- "$bin"
  echo
  echo "== Buck2 worker: gRPC on WORKER_SOCKET, two requests driven by worker-client buck2"
  "$client" buck2 --concurrency 2 --request out/d.txt --request out/e.txt -- "$bin" --concurrency 2
  echo "out/d.txt contains: $(cat out/d.txt); out/e.txt contains: $(cat out/e.txt)"
fi

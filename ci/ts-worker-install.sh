#!/usr/bin/env bash
# Installs a real TypeScript compiler worker into DIR and prints the command
# that starts it: the ts_project worker of npm's @bazel/typescript 5.8.1
# (internal/worker/index.js, on @bazel/worker 5.8.1) with typescript 4.9.5,
# versions locked by testdata/ts-worker/package-lock.json (`npm ci`).
#
# usage: ci/ts-worker-install.sh DIR
#
# Stdout is one line, shell-quoted: the worker's command. Like every worker
# command Bazel is given, it lacks `--persistent_worker`; Bazel, the bridge
# (`persistent-worker --bridge -- CMD`) and `worker-client bazel -- CMD`
# append it. Without that flag the worker compiles once, from an argument
# file named by its last argument, and exits. npm's output goes to stderr.
# Running it again with the same DIR installs nothing when DIR already holds
# the locked versions.
#
# A request (WorkRequest.arguments) is a tsc command line that names its
# project: `--project tsconfig.json` (the path relative to the worker's
# working directory), optionally followed by tsc options, which override
# the tsconfig's. The worker reads the tsconfig, the files it includes and
# TypeScript's lib .d.ts files, writes every output to the tsconfig's outDir
# (or beside the sources), and answers exit_code 0 when the program has no
# diagnostics, else 1 with the diagnostics as the response's output.
# Between requests it keeps a TypeScript watch program, keyed by the exact
# argument list (a request with other arguments discards it), and learns of
# edited sources from fs.watch events, not from WorkRequest.inputs, which it
# ignores. Every request re-emits the whole program. Its file watchers keep
# it running after its stdin closes: it must be killed to stop.
#
# The fixture testdata/ts-worker/project/ compiles with one such request:
#   cd COPY_OF_PROJECT && worker-client bazel --request '--project tsconfig.json' -- CMD
# writes out/greet.js, out/main.js and their .d.ts files.
set -euo pipefail

if [ $# -ne 1 ]; then
  echo "usage: $0 DIR" >&2
  exit 2
fi
here=$(cd "$(dirname "$0")/.." && pwd)
locked="$here/testdata/ts-worker"
mkdir -p "$1"
dir=$(cd "$1" && pwd)
entry="$dir/node_modules/@bazel/typescript/internal/worker/index.js"

node=$(command -v node) || { echo "$0: node is not on PATH" >&2; exit 1; }
command -v npm >/dev/null || { echo "$0: npm is not on PATH" >&2; exit 1; }

# `npm ci` only when DIR does not already hold exactly the locked install:
# npm keeps its record of what it installed in node_modules/.package-lock.json.
if ! cmp -s "$locked/package-lock.json" "$dir/package-lock.json" ||
  ! cmp -s "$locked/package.json" "$dir/package.json" ||
  [ ! -f "$dir/node_modules/.package-lock.json" ] || [ ! -f "$entry" ]; then
  cp "$locked/package.json" "$locked/package-lock.json" "$dir/"
  # --ignore-scripts: the one install script (@bazel/typescript's version
  # check against rules_nodejs) has nothing to check outside Bazel.
  (cd "$dir" && npm ci --ignore-scripts --no-audit --no-fund >&2)
fi
[ -f "$entry" ] || { echo "$0: npm ci did not install $entry" >&2; exit 1; }

# One word per argument, single-quoted when it holds anything a shell reads.
quote() {
  local sep=""
  for word in "$@"; do
    if [[ "$word" =~ ^[A-Za-z0-9_./=:@%+-]+$ ]]; then
      printf '%s%s' "$sep" "$word"
    else
      printf "%s'%s'" "$sep" "${word//\'/\'\\\'\'}"
    fi
    sep=" "
  done
  printf '\n'
}

# `typescript` is resolved from the worker's own node_modules tree.
quote "$node" "$entry" --typescript_require_path typescript

#!/usr/bin/env bash
# Runs the image built by ci/image.sh the way remote executors do: unpacked
# into a root directory and run there as the image's non-root user, with
# nothing from the host inside (a chroot via `unshare --root`; crun and
# podman would need cgroups these machines do not give). The host's
# worker-client drives it, as Bazel, a remote executor and Buck2 would.
# Usage: ci/image-test.sh     (after ci/image.sh and a built worker-client)
set -euo pipefail
cd "$(dirname "$0")/.."
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)
layout=target/image/oci
client=${WORKER_CLIENT:-$PWD/target/x86_64-unknown-linux-gnu/release/worker-client}
[ -x "$client" ] || client=$PWD/target/debug/worker-client
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
root="$work/rootfs"
umoci raw unpack --image "$layout:$version" "$root"
config=$(skopeo inspect --config "oci:$layout:$version")
user=$(jq -r '.config.User' <<<"$config")
uid=${user%%:*}
gid=${user##*:}
unshare=$(command -v unshare)
path=$(jq -r '.config.Env[] | select(startswith("PATH="))' <<<"$config")

# Each scenario gets an action directory owned by the image's user, as an
# executor's `nonroot-workspace` gives.
action_dir() {
  install -d -o "$uid" -g "$gid" "$root/tmp/$1"
}
# Runs ARGS as the image's user inside the root, in /tmp/DIR.
in_image() {
  local dir=$1
  shift
  env -i "$path" "$unshare" --root="$root" --wd="/tmp/$dir" \
    --setgid "$gid" --setuid "$uid" "$@"
}

passed=0
failed=0
check() {
  local name=$1
  shift
  if "$@"; then
    echo "PASS $name"
    passed=$((passed + 1))
  else
    echo "FAIL $name"
    failed=$((failed + 1))
  fi
}
has_file() { # FILE EXPECTED-CONTENT
  [ -f "$1" ] && [ "$(cat "$1")" = "$2" ] || {
    echo "  $1: expected '$2', found '$(cat "$1" 2>/dev/null || echo '<missing>')'"
    return 1
  }
}
grep_log() { # LOG PATTERN
  grep -q -- "$2" "$1" || {
    echo "  '$2' not in $1:"
    sed 's/^/    /' "$1"
    return 1
  }
}

echo "image: $layout:$version, user $user, $path"
echo "root: $(cd "$root" && find . | sort | tr '\n' ' ')"

# 1. Remote one-shot: the executor runs the command with its @argfile.
action_dir oneshot
echo "out.txt" >"$root/tmp/oneshot/request.args"
oneshot() {
  in_image oneshot persistent-worker @request.args 2>"$work/oneshot.err" &&
    grep_log "$work/oneshot.err" '^ONE-SHOT START$' &&
    has_file "$root/tmp/oneshot/out.txt" "out.txt"
}
check "one-shot @argfile, exit 0, ONE-SHOT START" oneshot

# 2. Remote persistent worker as BuildBuddy starts it: --persistent_worker
# (worker-client adds it), proto framing, then JSON.
bazel() { # DIR CLIENT-OPTIONS... -- WORKER-OPTIONS...
  local dir=$1
  shift
  action_dir "$dir"
  local client_opts=()
  while [ "$1" != -- ]; do
    client_opts+=("$1")
    shift
  done
  shift
  "$client" bazel "${client_opts[@]}" --request 'out-{n}.txt' --repeat 3 -- \
    env -i "$path" "$unshare" --root="$root" --wd="/tmp/$dir" \
    --setgid "$gid" --setuid "$uid" persistent-worker "$@" >"$work/$dir.log" 2>&1 &&
    grep_log "$work/$dir.log" 'Bazel persistent worker' &&
    for n in 0 1 2; do has_file "$root/tmp/$dir/out-$n.txt" "out-$n.txt" || return 1; done
}
check "Bazel worker, proto framing" bazel bazel-proto --
check "Bazel worker, --worker-protocol json" bazel bazel-json --json -- --worker-protocol json

# 3. Buck2: gRPC on WORKER_SOCKET inside the root. worker-client names a
# socket under the host's /tmp; the worker binds one under the root's /tmp,
# and a symlink at worker-client's path leads there.
action_dir buck2
install -d -o "$uid" -g "$gid" "$root/tmp/socket"
cat >"$work/buck2-worker" <<WRAPPER
#!/bin/sh
ln -s "$root/tmp/socket/socket" "\$WORKER_SOCKET" || exit 1
exec env -i "$path" WORKER_SOCKET=/tmp/socket/socket "$unshare" --root="$root" --wd=/tmp/buck2 \
  --setgid "$gid" --setuid "$uid" persistent-worker "\$@"
WRAPPER
chmod +x "$work/buck2-worker"
buck2() {
  "$client" buck2 --concurrency 2 --request 'out-{n}.txt' --repeat 3 -- \
    "$work/buck2-worker" --concurrency 2 >"$work/buck2.log" 2>&1 &&
    grep_log "$work/buck2.log" 'Buck2 persistent worker' &&
    for n in 0 1 2; do has_file "$root/tmp/buck2/out-$n.txt" "out-$n.txt" || return 1; done
}
check "Buck2 worker over WORKER_SOCKET" buck2

echo "image test: $passed passed, $failed failed"
[ "$failed" -eq 0 ]

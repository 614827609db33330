#!/usr/bin/env bash
# The self-contained release binary: glibc, libstdc++ and libgcc linked in
# statically, so it runs in an image that holds nothing else.
# Not position-independent: a static-pie binary relocates itself at start,
# dirtying ~370 KiB of pages in every process; a fixed address dirties none.
# Usage: ci/release.sh [CARGO ARGS]  -> target/x86_64-unknown-linux-gnu/release/
#   (bench.sh passes --examples to build its floors the same way)
set -euo pipefail
cd "$(dirname "$0")/.."
triple=x86_64-unknown-linux-gnu
mkdir -p target
# RUSTFLAGS with --target reaches only the target's crates, not build scripts.
RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static -C relocation-model=static" \
  cargo build --release --locked --target "$triple" --bin persistent-worker --bin worker-client "$@" 2>&1 |
  tee target/release-build.log
if grep -Ei 'warning: .*(getaddrinfo|getpwnam|getpwuid|dlopen|gethostbyname)' target/release-build.log; then
  echo "release.sh: the static link pulled in NSS or dlopen (see above)" >&2
  exit 1
fi
for bin in persistent-worker worker-client; do
  path="target/$triple/release/$bin"
  bytes=$(stat -c %s "$path")
  echo "$path: $bytes bytes ($(awk -v b="$bytes" 'BEGIN { printf "%.2f", b / 1048576 }') MiB)"
  file -b "$path"
  # ldd exits non-zero for a static binary; its message is the proof.
  ldd "$path" 2>&1 || true
done

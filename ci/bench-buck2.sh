#!/usr/bin/env bash
# Buck2 mode figures: start-up to accepting, no-op Execute round trip,
# requests/s at concurrency 4 and 16, idle RSS, stripped binary size.
# Release build: gRPC's C core is compiled with optimisations there.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --release --test buck2_worker -- --ignored --exact bench_buck2 --nocapture 2>&1 \
    | grep -E '^(exec to|Execute round|concurrency|idle RSS)'
bin=target/release/persistent-worker
stripped=$(mktemp)
trap 'rm -f "$stripped"' EXIT
strip -o "$stripped" "$bin"
echo "binary size: $(stat -c %s "$bin") bytes, stripped $(stat -c %s "$stripped") bytes"

#!/usr/bin/env bash
# CPU time the hypervisor gave to other guests (steal, the eighth field of
# /proc/stat's cpu line), for the benchmarks to print and store beside their
# figures: a run on a host that took a tenth of the cores measures that too.
# Usage: ci/cpu-stolen.sh              -> "TOTAL STEAL" (jiffies so far)
#        ci/cpu-stolen.sh TOTAL STEAL  -> "N.N % of CPU time stolen by the
#                                         hypervisor during the run"
set -euo pipefail
read -r total steal < <(awk '/^cpu / { t = 0; for (i = 2; i <= 9; i++) t += $i; print t, $9 }' /proc/stat)
if (($# == 0)); then
  echo "$total $steal"
elif (($# == 2)); then
  awk -v t=$((total - $1)) -v s=$((steal - $2)) \
    'BEGIN { printf "%.1f %% of CPU time stolen by the hypervisor during the run\n", t ? 100 * s / t : 0 }'
else
  sed -n '5,7p' "$0" >&2
  exit 2
fi

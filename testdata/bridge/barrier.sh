#!/bin/sh
# A JSON-protocol worker whose requests finish only when $2 requests are
# being served at once, each by its own process: every process marks its
# arrival in directory $1 and waits (at most 10 s) for $2 marks. The output
# carries start and end times in nanoseconds, so a client can see the overlap.
dir=$1
want=$2
while IFS= read -r line; do
  start=$(date +%s%N)
  : > "$dir/arrived.$$"
  deadline=$(( $(date +%s) + 10 ))
  while :; do
    n=$(ls "$dir" | grep -c '^arrived\.')
    [ "$n" -ge "$want" ] && break
    [ "$(date +%s)" -ge "$deadline" ] && break
    sleep 0.01
  done
  end=$(date +%s%N)
  code=0
  [ "$n" -ge "$want" ] || code=1
  printf '{"exitCode":%d,"output":"pid %s start %s end %s arrived %s\\n"}\n' "$code" "$$" "$start" "$end" "$n"
done

#!/bin/sh
# A JSON-protocol worker with faults chosen by the request's text: "crash"
# exits in the middle of the request, "garbage" writes a line that is not a
# response, "wrong-id" answers a request id it was not asked; anything else
# succeeds. Every start is counted in the file named by $1.
echo start >> "$1"
echo "faulty worker $$ ready" >&2
while IFS= read -r line; do
  case "$line" in
    *crash*) echo "faulty worker $$: crashing on purpose" >&2; exit 3 ;;
    *garbage*) echo "this is not a response"; continue ;;
    *wrong-id*) printf '{"exitCode":0,"requestId":99}\n'; continue ;;
  esac
  printf '{"exitCode":0,"output":"faulty worker %s: fine\\n"}\n' "$$"
done

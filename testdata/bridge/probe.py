# A JSON-protocol worker that reports on itself, for the bridge's tests of
# per-environment children and recycling. Each request's arguments are steps,
# done in order; the output starts with "pid P" and adds one word per step:
#   env NAME       "NAME=VALUE" from this process's environment ("NAME unset")
#   grow MIB       allocates MIB MiB, touches every page and keeps it: the
#                  process grows on purpose, request after request
#   wait DIR N     marks its arrival in DIR and waits (at most 10 s) until N
#                  processes have, so a client can see requests overlap
# Every start is counted in the file named by the first argument, if any.
import json
import os
import sys
import time

kept = []

if len(sys.argv) > 1 and sys.argv[1] != "--persistent_worker":
    with open(sys.argv[1], "a") as starts:
        starts.write("start %d\n" % os.getpid())


def serve(arguments):
    words = ["pid %d" % os.getpid()]
    code = 0
    steps = list(arguments)
    while steps:
        step = steps.pop(0)
        if step == "env" and steps:
            name = steps.pop(0)
            value = os.environ.get(name)
            words.append("%s unset" % name if value is None else "%s=%s" % (name, value))
        elif step == "grow" and steps:
            mib = int(steps.pop(0))
            # Multiplying a one-byte array writes every byte: the pages are
            # resident, not merely reserved.
            kept.append(bytearray(b"\x01") * (mib << 20))
            words.append("grew %d MiB" % mib)
        elif step == "wait" and len(steps) >= 2:
            directory, want = steps.pop(0), int(steps.pop(0))
            open(os.path.join(directory, "arrived.%d" % os.getpid()), "w").close()
            deadline = time.monotonic() + 10
            while True:
                arrived = [n for n in os.listdir(directory) if n.startswith("arrived.")]
                if len(arrived) >= want or time.monotonic() > deadline:
                    break
                time.sleep(0.01)
            if len(arrived) < want:
                code = 1
            words.append("arrived %d" % len(arrived))
        else:
            words.append("unknown step %r" % step)
            code = 2
    return code, " ".join(words) + "\n"


for line in sys.stdin:
    if not line.strip():
        continue
    request = json.loads(line)
    code, output = serve(request.get("arguments", []))
    response = {"exitCode": code, "output": output}
    if "requestId" in request:
        response["requestId"] = request["requestId"]
    sys.stdout.write(json.dumps(response) + "\n")
    sys.stdout.flush()

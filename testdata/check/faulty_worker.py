#!/usr/bin/env python3
"""A Bazel-protocol worker in Python for tests/check.rs, with faults a test
switches on one at a time so each verdict of `worker-client check` can be
seen to flip.

Without faults it does what a careful worker does: multiplex (a thread per
request, responses written whole under a lock), cancellation
(`was_cancelled`), JSON with `--worker-protocol json` (camelCase and
snake_case), `sandbox_dir`, and `@file` / `--flagfile=` expanded relative to
the sandbox. A request is `[--work-ms N] OUTFILE`: after N ms (cut short by a
cancel) it writes OUTFILE's name and a newline to OUTFILE.

Faults, as startup flags (before --persistent_worker):
  --stray-stdout    prints a line to stdout before the first response
  --wrong-id        answers a non-zero request_id with request_id + 1
  --ignore-cancel   reads cancels and does nothing with them
  --serial          runs one request at a time, in the order read
  --ignore-sandbox  resolves paths against its cwd, not sandbox_dir

Protobuf is coded by hand (the few fields used) so that it needs nothing
beyond python3.
"""

import json
import os
import sys
import threading

FAULTS = {"--stray-stdout", "--wrong-id", "--ignore-cancel", "--serial", "--ignore-sandbox"}


def varint(value):
    out = bytearray()
    value &= (1 << 64) - 1
    while True:
        low = value & 0x7F
        value >>= 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def read_varint(stream):
    shift = value = 0
    while True:
        byte = stream.read(1)
        if not byte:
            return None
        value |= (byte[0] & 0x7F) << shift
        if byte[0] < 0x80:
            return value
        shift += 7


def decode(data, i):
    shift = value = 0
    while True:
        byte = data[i]  # IndexError on a truncated field: the worker exits
        i += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, i
        shift += 7


def parse_proto(data):
    request = {"arguments": [], "request_id": 0, "cancel": False, "sandbox_dir": ""}
    i = 0
    while i < len(data):
        key, i = decode(data, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, i = decode(data, i)
            if field == 3:
                request["request_id"] = value - (1 << 64) if value >= 1 << 63 else value
            elif field == 4:
                request["cancel"] = bool(value)
        elif wire == 2:
            length, i = decode(data, i)
            chunk = data[i : i + length]
            if len(chunk) != length:
                raise ValueError("field runs past the frame")
            if field == 1:
                request["arguments"].append(chunk.decode())
            elif field == 6:
                request["sandbox_dir"] = chunk.decode()
            i += length
        else:
            raise ValueError(f"unexpected wire type {wire}")
    return request


def parse_json(line):
    obj = json.loads(line)

    def field(camel, snake, default):
        return obj.get(camel, obj.get(snake, default))

    return {
        "arguments": field("arguments", "arguments", []),
        "request_id": field("requestId", "request_id", 0),
        "cancel": field("cancel", "cancel", False),
        "sandbox_dir": field("sandboxDir", "sandbox_dir", ""),
    }


def encode_proto(exit_code, output, request_id, cancelled):
    body = b""
    if exit_code:
        body += b"\x08" + varint(exit_code)
    if output:
        text = output.encode()
        body += b"\x12" + varint(len(text)) + text
    if request_id:
        body += b"\x18" + varint(request_id)
    if cancelled:
        body += b"\x20\x01"
    return varint(len(body)) + body


def encode_json(exit_code, output, request_id, cancelled):
    obj = {"exitCode": exit_code, "output": output, "requestId": request_id}
    if cancelled:
        obj["wasCancelled"] = True
    return (json.dumps(obj) + "\n").encode()


class Worker:
    def __init__(self, faults, use_json):
        self.faults = faults
        self.encode = encode_json if use_json else encode_proto
        self.lock = threading.Lock()
        self.running = {}  # request_id -> threading.Event, set on cancel
        self.strayed = False
        self.threads = []

    def reply(self, request_id, exit_code, output, cancelled=False):
        if "--wrong-id" in self.faults and request_id != 0:
            request_id += 1
        with self.lock:
            out = sys.stdout.buffer
            if "--stray-stdout" in self.faults and not self.strayed:
                self.strayed = True
                out.write(b"starting the compiler\n")
            out.write(self.encode(exit_code, output, request_id, cancelled))
            out.flush()

    def expand(self, args, base):
        out = []
        for arg in args:
            name = None
            if arg.startswith("--flagfile="):
                name = arg[len("--flagfile=") :]
            elif arg.startswith("@") and not arg.startswith("@@"):
                name = arg[1:]
            if name is None:
                out.append(arg)
                continue
            with open(os.path.join(base, name)) as f:
                out.extend(line for line in f.read().splitlines() if line)
        return out

    def work(self, request, stop):
        base = request["sandbox_dir"] if "--ignore-sandbox" not in self.faults else ""
        base = base or "."
        try:
            args = self.expand(request["arguments"], base)
        except OSError as e:
            return 1, f"cannot read an argument file: {e}\n", False
        work_ms = 0
        rest = []
        i = 0
        while i < len(args):
            if args[i] == "--work-ms" and i + 1 < len(args):
                work_ms = int(args[i + 1])
                i += 2
            else:
                rest.append(args[i])
                i += 1
        if len(rest) != 1:
            return 2, "usage: [--work-ms N] OUTFILE\n", False
        if stop.wait(work_ms / 1000.0):
            return 0, "", True
        path = os.path.join(base, rest[0])
        try:
            with open(path, "w") as f:
                f.write(os.path.basename(path) + "\n")
        except OSError as e:
            return 1, f"cannot write {path}: {e}\n", False
        return 0, f"wrote {path}\n", False

    def serve(self, request):
        request_id = request["request_id"]
        stop = threading.Event()
        with self.lock:
            self.running[request_id] = stop
        try:
            exit_code, output, cancelled = self.work(request, stop)
        finally:
            with self.lock:
                self.running.pop(request_id, None)
        self.reply(request_id, exit_code, output, cancelled)

    def handle(self, request):
        if request["cancel"]:
            if "--ignore-cancel" in self.faults:
                return
            with self.lock:
                stop = self.running.get(request["request_id"])
            if stop is not None:
                stop.set()
            return
        if "--serial" in self.faults or request["request_id"] == 0:
            self.serve(request)
            return
        thread = threading.Thread(target=self.serve, args=(request,))
        thread.start()
        self.threads.append(thread)


def requests(use_json):
    stdin = sys.stdin.buffer
    while True:
        if use_json:
            line = stdin.readline()
            if not line:
                return
            if line.strip():
                yield parse_json(line)
        else:
            length = read_varint(stdin)
            if length is None:
                return
            data = stdin.read(length)
            if len(data) != length:
                return
            yield parse_proto(data)


def main():
    argv = sys.argv[1:]
    if "--persistent_worker" not in argv:
        print("faulty_worker.py: only --persistent_worker is served", file=sys.stderr)
        return 2
    faults = {a for a in argv if a in FAULTS}
    use_json = "json" in argv and "--worker-protocol" in argv
    worker = Worker(faults, use_json)
    print(f"faulty_worker.py: faults {sorted(faults)}", file=sys.stderr)
    for request in requests(use_json):
        worker.handle(request)
    for thread in worker.threads:
        thread.join()
    return 0


if __name__ == "__main__":
    sys.exit(main())

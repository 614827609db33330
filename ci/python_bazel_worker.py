#!/usr/bin/env python3
"""A minimal blocking Bazel-protocol worker in Python, for ci/bench-tail.sh:
the kind of worker a rule author writes first, beside which this worker's
tail is measured. Started with --persistent_worker, it reads varint-framed
WorkRequests on stdin and answers each in turn: `--noop` answers at once,
otherwise the one argument is OUTFILE and it writes the file's name and a
newline there, as the demo tool does. Protobuf is coded by hand (three
fields each way) so that it needs nothing beyond python3.
"""

import os
import sys


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


def parse_request(data):
    """The request's arguments and request_id; other fields are skipped."""
    args, request_id, i = [], 0, 0
    while i < len(data):
        key, i = decode(data, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, i = decode(data, i)
            if field == 3:
                request_id = value - (1 << 64) if value >= 1 << 63 else value
        elif wire == 2:
            length, i = decode(data, i)
            if field == 1:
                args.append(data[i : i + length].decode())
            i += length
        else:
            raise ValueError(f"unexpected wire type {wire}")
    return args, request_id


def decode(data, i):
    shift = value = 0
    while True:
        byte = data[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, i
        shift += 7


def response(exit_code, output, request_id):
    body = b""
    if exit_code:
        body += b"\x08" + varint(exit_code)
    if output:
        text = output.encode()
        body += b"\x12" + varint(len(text)) + text
    if request_id:
        body += b"\x18" + varint(request_id)
    return varint(len(body)) + body


def main():
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    while True:
        length = read_varint(stdin)
        if length is None:
            return
        args, request_id = parse_request(stdin.read(length))
        if args[:1] == ["--noop"]:
            answer = response(0, "", request_id)
        elif len(args) == 1:
            try:
                with open(args[0], "w") as f:
                    f.write(os.path.basename(args[0]) + "\n")
                answer = response(0, f"wrote {args[0]}\n", request_id)
            except OSError as e:
                answer = response(1, f"cannot write {args[0]}: {e}\n", request_id)
        else:
            answer = response(2, "usage: OUTFILE | --noop\n", request_id)
        stdout.write(answer)
        stdout.flush()


if __name__ == "__main__":
    main()

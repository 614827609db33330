"""A no-op Buck2 worker in Python's gRPC, for ci/bench-tail.sh.

It serves `worker.Worker/Execute` on the Unix socket named by WORKER_SOCKET
and answers every call with exit code 0 and a short stderr, without decoding
the request: what a Python worker costs before its tool does anything. The
handler runs on Python gRPC's thread pool, as a Python worker's tool would.
"""

import os
from concurrent import futures

import grpc

# ExecuteResponse{stderr: "no-op"}; exit_code 0 is the default, left out.
RESPONSE = b"\x12\x05no-op"


def execute(_request, _context):
    return RESPONSE


def main():
    handler = grpc.method_handlers_generic_handler(
        "worker.Worker",
        {"Execute": grpc.unary_unary_rpc_method_handler(execute)},
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port("unix:" + os.environ["WORKER_SOCKET"])
    server.start()
    server.wait_for_termination()


if __name__ == "__main__":
    main()

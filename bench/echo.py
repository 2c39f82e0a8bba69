"""A plain grpcio bytes echo over a unix socket: the limit of the gRPC path for a given payload size.

    python -m bench.echo --socket /tmp/echo.sock     # prints "ready" once it serves
    EchoClient("unix:/tmp/echo.sock").echo(b"...")   # the same bytes back

No protobuf at all: a generic unary handler whose (de)serialisers are the identity, with the same thread
pool size and message limits as the edgecow server, so the gap to edgecow is what edgecow adds.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from concurrent import futures

import grpc

METHOD = "/bench.Echo/Echo"
SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", 2**31 - 1),
    ("grpc.max_send_message_length", -1),
    ("grpc.so_reuseport", 0),
]
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]
WORKERS = 32  # edge_server.config.Settings.workers


def _echo(request: bytes, context: grpc.ServicerContext) -> bytes:
    return request


def serve(socket_path: str) -> None:
    handler = grpc.method_handlers_generic_handler(
        "bench.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(_echo)}
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=WORKERS), options=SERVER_OPTIONS)
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"unix:{socket_path}")
    server.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    print("ready", flush=True)
    stop.wait()
    server.stop(1).wait()


class EchoClient:
    def __init__(self, target: str) -> None:
        self._channel = grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
        self._call: grpc.UnaryUnaryMultiCallable[bytes, bytes] = self._channel.unary_unary(METHOD)

    def echo(self, payload: bytes) -> bytes:
        return self._call(payload)

    def close(self) -> None:
        self._channel.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.echo")
    parser.add_argument("--socket", required=True)
    serve(parser.parse_args(argv).socket)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The `core` part (issue 2): y = x*1 over gRPC, beside in-process onnxruntime and a plain grpcio bytes echo.

    python -m bench core [--quick]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bench import procs
from bench.echo import EchoClient
from bench.report import KB, MB, Size, heading, interleaved, mib, ms, pct, ratio, same_answer, table, us, verdict
from shm_client import EdgeClient

SIZES = [Size("1 KB", KB, 2000, 30), Size("1 MB", MB, 150, 5),
         Size("16 MB", 16 * MB, 20, 2), Size("64 MB", 64 * MB, 8, 1)]
QUICK_SIZES = SIZES[:3]  # 64 MB over gRPC takes seconds a call on a busy box; the shm part still sends it


def _variants(x: np.ndarray, session: Any, unix: EdgeClient, tcp: EdgeClient,
              echo: EchoClient) -> dict[str, Callable[[], object]]:
    return {
        "in-process": lambda: session.run(None, {"x": x})[0],
        "edgecow unix": lambda: unix.infer("scale", {"x": x})["y"],
        "edgecow tcp": lambda: tcp.infer("scale", {"x": x})["y"],
        "grpc echo unix": lambda: np.frombuffer(echo.echo(x.tobytes()), np.float32),
    }


def run(args: argparse.Namespace, workdir: Path) -> None:
    print(heading("core (issue 2): y = x*1 over gRPC; in-process onnxruntime and a bytes echo for reference"))
    repo = procs.build_repository(workdir / "models")
    session = procs.in_process_session()
    rows, ratio_rows, stats = [], [], {}
    sizes = QUICK_SIZES if args.quick else SIZES
    with procs.EdgeServer(workdir / "srv", repo) as server, procs.EchoServer(workdir) as echo_server:
        unix = EdgeClient(server.unix_target, transport="grpc")
        tcp = EdgeClient(server.tcp_target, transport="grpc")
        echo = EchoClient(echo_server.target)
        for size in sizes:
            x = procs.payload(size.nbytes)
            variants = _variants(x, session, unix, tcp, echo)
            for name, call in variants.items():
                same_answer(name, call(), x)
            samples = interleaved(variants, size.rounds(args.quick), size.warmup(args.quick), size.block(args.quick))
            p = {name: pct(s, 50) for name, s in samples.items()}
            stats[size.label] = p
            for name, s in samples.items():
                rows.append([size.label, name, len(s), ms(p[name]), ms(pct(s, 90)),
                             f"{size.nbytes / p[name] / MB:.0f}"])
            ratio_rows.append([size.label, ratio(p["edgecow unix"] / p["grpc echo unix"]),
                               ratio(p["edgecow tcp"] / p["grpc echo unix"]),
                               ratio(p["edgecow unix"] / p["in-process"]),
                               us(p["edgecow unix"] - p["grpc echo unix"])])
        server_rss_after = server.rss()
        unix.close()
        tcp.close()
        echo.close()
    print(table(["size", "variant", "calls", "p50", "p90", "MB/s@p50"], rows))
    print()
    print(table(["size", "unix/echo", "tcp/echo", "unix/in-process", "unix-echo p50"], ratio_rows))
    print()
    targets = []
    for size in sizes[1:]:
        r = stats[size.label]["edgecow unix"] / stats[size.label]["grpc echo unix"]
        targets.append([f"edgecow unix <= 1.2x echo at {size.label}", ratio(r), verdict(r <= 1.2)])
    p1 = stats["1 KB"]["edgecow unix"]
    targets.append(["edgecow unix p50 <= 0.7 ms at 1 KB", ms(p1), verdict(p1 <= 0.7e-3)])
    print(table(["target (information only)", "measured", "result"], targets))
    print()
    print(table(["server RSS", "value"], [
        [f"bench server after the core run ({sizes[-1].label} messages seen)", mib(server_rss_after)],
        ["the bundled models, just ready", "see the startup part"],
    ]))

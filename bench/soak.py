"""The `soak` part (issue 5): many checked calls from 8 client processes, server memory and /dev/shm watched.

    python -m bench soak [--quick] [--calls N]
"""

from __future__ import annotations

import argparse
import threading
from pathlib import Path

from bench import procs
from bench.report import heading, mib, ms, pct, table
from bench.workers import Job, Phase, run_clients

CLIENTS = 8


def run(args: argparse.Namespace, workdir: Path) -> None:
    calls = args.calls if args.calls is not None else (400 if args.quick else 20_000)
    print(heading(f"soak (issue 5): {calls} calls, {CLIENTS} client processes (4 shm, 4 gRPC), 4 models, 1-256 KB"))
    repo = procs.build_repository(workdir / "models")
    with procs.EdgeServer(workdir / "srv", repo) as server:
        shm_start = procs.dev_shm_entries({server.pid})
        rss_start = server.rss()
        per_client = [calls // CLIENTS + (1 if i < calls % CLIENTS else 0) for i in range(CLIENTS)]
        jobs = [Job(server.unix_target, [Phase("shm" if i < CLIENTS // 2 else "grpc", calls=n)], mix="soak", seed=i)
                for i, n in enumerate(per_client)]
        with _RssSampler(server) as sampler:
            result = run_clients(jobs)[0]
        rss_end = server.rss()
        ours = {server.pid, *result["pids"]}
        shm_end = procs.dev_shm_entries(ours)
    shm_after = procs.dev_shm_entries(ours)
    lat = result["latencies"]
    print(table(["calls", "seconds", "calls/s", "p50", "p99", "max", "errors"], [[
        len(lat) + result["errors"], f"{result['elapsed']:.1f}", f"{len(lat) / result['elapsed']:.0f}",
        ms(pct(lat, 50)), ms(pct(lat, 99)), ms(float(lat.max())), result["errors"],
    ]]))
    for message in result["messages"][:5]:
        print(f"  error: {message}")
    print()
    print(table(["server RSS", "value"], [
        ["start (ready, no calls yet)", mib(rss_start)],
        ["peak while soaking (sampled every 0.25 s)", mib(max(sampler.samples, default=rss_end))],
        ["end (clients closed)", mib(rss_end)],
        ["growth end - start", mib(rss_end - rss_start)],
    ]))
    print()
    print(table(["/dev/shm entries of this server and its clients", "count", "names"], [
        ["start (server ready)", len(shm_start), _names(shm_start)],
        ["end (clients closed, server up)", len(shm_end), _names(shm_end)],
        ["after the server stopped", len(shm_after), _names(shm_after)],
    ]))


def _names(names: list[str]) -> str:
    if not names:
        return "-"
    return ", ".join(names[:4]) + (f" (+{len(names) - 4})" if len(names) > 4 else "")


class _RssSampler:
    """The server's RSS every 0.25 s while the block runs."""

    def __init__(self, server: procs.EdgeServer) -> None:
        self.server = server
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> _RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(0.25):
            self.samples.append(self.server.rss())

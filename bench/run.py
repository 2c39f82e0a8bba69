"""The bench's command line: core (issue 2), shm (issue 3), soak (issue 5), or all of them.

    python -m bench                      # everything, full size (a few minutes on a 2-core box)
    python -m bench core --quick         # one part, smoke size
    python -m bench soak --calls 50000

Every figure is printed, none is asserted: targets show as PASS/MISS for information.
"""

from __future__ import annotations

import argparse
import multiprocessing
import queue
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from bench import procs
from bench.echo import EchoClient
from bench.report import heading, interleaved, mib, ms, pct, ratio, table, us, verdict
from bench.workers import Job, client_loop
from shm_client import EdgeClient

KB, MB = 1024, 1024 * 1024


@dataclass(frozen=True)
class Size:
    label: str
    nbytes: int
    iterations: int  # interleaved rounds, full run
    quick: int  # interleaved rounds, --quick

    def rounds(self, quick: bool) -> int:
        return self.quick if quick else self.iterations


CORE_SIZES = [Size("1 KB", KB, 2000, 30), Size("1 MB", MB, 150, 5),
              Size("16 MB", 16 * MB, 20, 2), Size("64 MB", 64 * MB, 8, 1)]
SHM_SIZES = [Size("4 KB", 4 * KB, 2000, 30), Size("1 MB", MB, 200, 5),
             Size("16 MB", 16 * MB, 25, 2), Size("64 MB", 64 * MB, 10, 1)]


def in_process_session() -> ort.InferenceSession:
    """The same y = x*1 model, in this process, default session options (as the server's)."""
    return ort.InferenceSession(procs.scale_model_bytes(), providers=["CPUExecutionProvider"])


def _checked(name: str, call: Callable[[], np.ndarray], x: np.ndarray) -> None:
    """One call outside the timing: the bench must measure a correct answer."""
    y = call()
    if not np.array_equal(np.asarray(y).reshape(-1), x):
        raise SystemExit(f"bench: {name} returned a wrong result")


def _warmup(size: Size) -> int:
    return 2 if size.nbytes >= 16 * MB else 10 if size.nbytes >= MB else 50


# -- core ----------------------------------------------------------------------------------------------
def run_core(args: argparse.Namespace, workdir: Path) -> None:
    print(heading("core (issue 2): y = x*1 over gRPC; in-process onnxruntime and a bytes echo for reference"))
    repo = procs.build_repository(workdir / "models")
    session = in_process_session()
    rows, ratio_rows, stats = [], [], {}
    with procs.EdgeServer(workdir / "srv", repo) as server, procs.EchoServer(workdir) as echo_server:
        unix = EdgeClient(server.unix_target, transport="grpc")
        tcp = EdgeClient(server.tcp_target, transport="grpc")
        echo = EchoClient(echo_server.target)
        for size in CORE_SIZES:
            x = procs.payload(size.nbytes)
            variants = {
                "in-process": lambda x=x: session.run(None, {"x": x})[0],
                "edgecow unix": lambda x=x: unix.infer("scale", {"x": x})["y"],
                "edgecow tcp": lambda x=x: tcp.infer("scale", {"x": x})["y"],
                "grpc echo unix": lambda x=x: np.frombuffer(echo.echo(x.tobytes()), np.float32),
            }
            for name, call in variants.items():
                _checked(name, call, x)
            samples = interleaved(variants, size.rounds(args.quick), _warmup(size))
            stats[size.label] = {name: (pct(s, 50), pct(s, 90)) for name, s in samples.items()}
            for name, s in samples.items():
                p50 = pct(s, 50)
                rows.append([size.label, name, len(s), ms(p50), ms(pct(s, 90)), f"{size.nbytes / p50 / MB:.0f}"])
            p = {name: v[0] for name, v in stats[size.label].items()}
            ratio_rows.append([size.label, ratio(p["edgecow unix"] / p["grpc echo unix"]),
                               ratio(p["edgecow tcp"] / p["grpc echo unix"]),
                               ratio(p["edgecow unix"] / p["in-process"]),
                               us(p["edgecow unix"] - p["grpc echo unix"])])
        server_rss_after = server.rss()
        for client in (unix, tcp, echo):
            client.close()
    print(table(["size", "variant", "calls", "p50", "p90", "MB/s@p50"], rows))
    print()
    print(table(["size", "unix/echo", "tcp/echo", "unix/in-process", "unix-echo p50"], ratio_rows))

    baseline = _example_server_rss(workdir)
    print()
    targets = []
    for size in CORE_SIZES[1:]:
        p = stats[size.label]
        r = p["edgecow unix"][0] / p["grpc echo unix"][0]
        targets.append([f"edgecow unix <= 1.2x echo at {size.label}", ratio(r), verdict(r <= 1.2)])
    p1 = stats["1 KB"]["edgecow unix"][0]
    targets.append(["edgecow unix p50 <= 0.7 ms at 1 KB", ms(p1), verdict(p1 <= 0.7e-3)])
    print(table(["target (information only)", "measured", "result"], targets))
    print()
    print(table(["server RSS", "value"], [
        ["example repository (no --model-repository), just ready", mib(baseline)],
        ["bench server after the core run (64 MB messages seen)", mib(server_rss_after)],
    ]))


def _example_server_rss(workdir: Path) -> int:
    with procs.EdgeServer(workdir / "example", None) as server:
        time.sleep(0.5)
        return server.rss()


# -- shm -----------------------------------------------------------------------------------------------
def run_shm(args: argparse.Namespace, workdir: Path) -> None:
    print(heading("shm (issue 3): y = x*1 over shared memory vs gRPC on the unix socket vs in-process"))
    repo = procs.build_repository(workdir / "models")
    session = in_process_session()
    rows, ratio_rows, stats = [], [], {}
    with procs.EdgeServer(workdir / "srv", repo) as server:
        shm = EdgeClient(server.unix_target, transport="shm")
        grpc_unix = EdgeClient(server.unix_target, transport="grpc")

        def zero_copy(x: np.ndarray) -> tuple[int, ...]:
            with shm.infer("scale", {"x": x}, zero_copy=True) as result:
                return result["y"].shape

        for size in SHM_SIZES:
            x = procs.payload(size.nbytes)
            x_shm = shm.empty(x.shape, x.dtype)  # the caller builds its input in shared memory
            x_shm[...] = x
            variants = {
                "in-process": lambda x=x: session.run(None, {"x": x})[0],
                "edgecow shm": lambda x=x: shm.infer("scale", {"x": x})["y"],
                "edgecow shm zero-copy": lambda x=x_shm: zero_copy(x),
                "edgecow grpc unix": lambda x=x: grpc_unix.infer("scale", {"x": x})["y"],
            }
            for name, call in variants.items():
                if name != "edgecow shm zero-copy":
                    _checked(name, call, x)
            with shm.infer("scale", {"x": x_shm}, zero_copy=True) as result:
                if not np.array_equal(result["y"], x):
                    raise SystemExit("bench: edgecow shm zero-copy returned a wrong result")
            samples = interleaved(variants, size.rounds(args.quick), _warmup(size))
            stats[size.label] = {name: pct(s, 50) for name, s in samples.items()}
            for name, s in samples.items():
                rows.append([size.label, name, len(s), ms(pct(s, 50)), ms(pct(s, 90))])
            p = stats[size.label]
            ratio_rows.append([size.label, ratio(p["edgecow shm"] / p["in-process"]),
                               ratio(p["edgecow shm zero-copy"] / p["in-process"]),
                               us(p["edgecow shm"] - p["in-process"]),
                               ratio(p["edgecow grpc unix"] / p["edgecow shm"]),
                               ratio(p["edgecow grpc unix"] / p["edgecow shm zero-copy"])])
        shm.close()
        grpc_unix.close()
        concurrent = _concurrent(args, server)
    print(table(["size", "variant", "calls", "p50", "p90"], rows))
    print("(shm: inputs copied into pooled segments, outputs copied out: the default; shm zero-copy: input made "
          "with client.empty(), output a view (zero_copy=True))")
    print()
    print(table(["size", "shm/in-process", "zero-copy/in-process", "shm-in-process p50", "grpc/shm",
                 "grpc/zero-copy"], ratio_rows))
    print()
    print(table(["8 clients (processes), 4 KB", "calls", "calls/s", "p50", "p99", "errors"], concurrent))
    print()
    targets = []
    for variant, label in (("edgecow shm", "shm"), ("edgecow shm zero-copy", "shm zero-copy")):
        for size in SHM_SIZES[1:]:
            r = stats[size.label][variant] / stats[size.label]["in-process"]
            targets.append([f"{label} <= 1.10x in-process at {size.label}", ratio(r), verdict(r <= 1.10)])
    for variant, label in (("edgecow shm", "shm"), ("edgecow shm zero-copy", "shm zero-copy")):
        speedup = stats["64 MB"]["edgecow grpc unix"] / stats["64 MB"][variant]
        targets.append([f"{label} >= 30x faster than gRPC at 64 MB", ratio(speedup), verdict(speedup >= 30)])
    overhead = stats["4 KB"]["edgecow shm"] - stats["4 KB"]["in-process"]
    targets.append(["shm overhead over in-process <= 400 µs p50 at 4 KB", us(overhead), verdict(overhead <= 400e-6)])
    print(table(["target (information only)", "measured", "result"], targets))


def _concurrent(args: argparse.Namespace, server: procs.EdgeServer) -> list[list[object]]:
    """8 client processes at 4 KB, shm and gRPC rounds alternating (2 each, 1 with --quick)."""
    seconds = 0.5 if args.quick else 3.0
    collected: dict[str, list[dict]] = {"shm": [], "grpc": []}
    for _ in range(1 if args.quick else 2):
        for transport in ("shm", "grpc"):
            jobs = [Job(server.unix_target, transport, seconds=seconds, seed=i) for i in range(8)]
            collected[transport].append(_run_clients(jobs))
    rows = []
    for transport, rounds in collected.items():
        lat = np.concatenate([r["latencies"] for r in rounds])
        calls = len(lat)
        rate = float(np.median([len(r["latencies"]) / r["elapsed"] for r in rounds]))
        rows.append([f"edgecow {transport}", calls, f"{rate:.0f}", ms(pct(lat, 50)), ms(pct(lat, 99)),
                     sum(r["errors"] for r in rounds)])
    return rows


def _run_clients(jobs: list[Job]) -> dict:
    """Start one process per job, release them together, merge what they report."""
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(len(jobs))
    results = ctx.Queue()
    workers = [ctx.Process(target=client_loop, args=(job, barrier, results), daemon=True) for job in jobs]
    for worker in workers:
        worker.start()
    reports = []
    for _ in workers:
        try:
            reports.append(results.get(timeout=600))
        except queue.Empty:
            break
    for worker in workers:
        worker.join(10)
        if worker.is_alive():
            worker.kill()
    if len(reports) < len(jobs):
        raise SystemExit(f"bench: only {len(reports)} of {len(jobs)} client processes reported")
    messages = [m for r in reports for m in r["messages"]]
    return {
        "latencies": np.concatenate([r["latencies"] for r in reports]),
        "errors": sum(r["errors"] for r in reports),
        "messages": messages,
        "pids": [worker.pid for worker in workers],
        # clients start together; the slowest one bounds the wall time
        "elapsed": max(r["elapsed"] for r in reports) or 1e-9,
    }


# -- soak ----------------------------------------------------------------------------------------------
def run_soak(args: argparse.Namespace, workdir: Path) -> None:
    calls = args.calls if args.calls is not None else (400 if args.quick else 20_000)
    print(heading(f"soak (issue 5): {calls} calls, 8 client processes (4 shm, 4 gRPC), 4 models, 1-256 KB"))
    repo = procs.build_repository(workdir / "models")
    with procs.EdgeServer(workdir / "srv", repo) as server:
        time.sleep(0.2)
        shm_start = procs.dev_shm_entries({server.pid})
        rss_start = server.rss()
        per_client = [calls // 8 + (1 if i < calls % 8 else 0) for i in range(8)]
        jobs = [Job(server.unix_target, "shm" if i < 4 else "grpc", calls=n, mix="soak", seed=i)
                for i, n in enumerate(per_client)]
        sampler = _RssSampler(server)
        sampler.start()
        result = _run_clients(jobs)
        sampler.stop()
        time.sleep(0.2)
        rss_end = server.rss()
        ours = {server.pid, *result["pids"]}
        shm_end = procs.dev_shm_entries(ours)
    time.sleep(0.2)
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


def _names(names: set[str]) -> str:
    listed = sorted(names)
    return ", ".join(listed[:4]) + (f" (+{len(listed) - 4})" if len(listed) > 4 else "") if listed else "-"


class _RssSampler:
    def __init__(self, server: procs.EdgeServer) -> None:
        import threading

        self.server = server
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(0.25):
            self.samples.append(self.server.rss())


# -- entry point ---------------------------------------------------------------------------------------
PARTS = {"core": run_core, "shm": run_shm, "soak": run_soak}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("part", nargs="?", default="all", choices=("all", *PARTS))
    parser.add_argument("--quick", action="store_true", help="smoke size: few iterations, seconds not minutes")
    parser.add_argument("--calls", type=int, default=None, help="soak calls (default 20000, 400 with --quick)")
    args = parser.parse_args(argv)
    parts = list(PARTS) if args.part == "all" else [args.part]
    print(f"edgecow bench: {', '.join(parts)}{' (quick)' if args.quick else ''}; "
          f"python {sys.version.split()[0]}, onnxruntime {ort.__version__}, {multiprocessing.cpu_count()} CPUs")
    began = time.perf_counter()
    for part in parts:
        with tempfile.TemporaryDirectory(prefix=f"edgecow-bench-{part}-") as tmp:
            PARTS[part](args, Path(tmp))
    print(f"\nbench done in {time.perf_counter() - began:.0f} s")
    return 0

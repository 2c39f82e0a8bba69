"""The `startup` part (issue 10): how long `edgecow serve` takes to READY with the bundled models, its RSS
at READY beside an in-process onnxruntime holding the same models, and its CPU use while idle.

    python -m bench startup [--quick]

READY is READY=1 on a NOTIFY_SOCKET the bench binds (what systemd waits for), timed from spawning the
process; idle CPU is utime + stime from /proc/<pid>/stat, read before and after the idle window.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench import procs
from bench.report import heading, mib, table, verdict
from edge_server.config import EXAMPLES
from tests.support.processes import REPO_ROOT

READY_TARGET = 2.0  # seconds
RSS_TARGET = 40e6  # bytes over the in-process session
IDLE_TARGET = 0.01  # of one core: ~0, no busy polling
# The first second after READY is reported apart: work that finishes once is not polling.
SETTLE = 1.0


def bundled_models() -> list[Path]:
    """The highest version of every model in the example repository, as the server loads them."""
    files = []
    for model in sorted(p for p in EXAMPLES.iterdir() if p.is_dir()):
        versions = [v for v in model.iterdir() if v.name.isdigit() and (v / "model.onnx").exists()]
        if versions:
            files.append(max(versions, key=lambda v: int(v.name)) / "model.onnx")
    return files


def in_process_rss(files: list[Path]) -> dict[str, int]:
    providers = ",".join(procs.server_providers())
    done = subprocess.run([sys.executable, "-m", "bench.footprint", providers, *map(str, files)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise SystemExit(f"bench: the in-process footprint child failed:\n{done.stderr[-2000:]}")
    result: dict[str, int] = json.loads(done.stdout.splitlines()[-1])
    return result


def _cpu_over(server: procs.EdgeServer, seconds: float) -> tuple[float, float]:
    """(CPU seconds the server used, wall seconds) over a window in which nobody calls it."""
    cpu_before, began = server.cpu_seconds(), time.monotonic()
    time.sleep(seconds)  # the measurement itself: a window with no calls
    return server.cpu_seconds() - cpu_before, time.monotonic() - began


def run(args: argparse.Namespace, workdir: Path) -> None:
    starts = 1 if args.quick else 3
    idle = 1.0 if args.quick else 10.0
    program = procs.edgecow_command()
    command = " ".join([Path(program[0]).name, *program[1:]])
    print(heading(f"startup (issue 10): `{command} serve` with the bundled models, {starts} start(s), "
                  f"idle {idle:.0f} s"))
    ready, rss_ready = [], []
    for i in range(starts):
        with procs.EdgeServer(workdir / f"srv{i}", None, console=True, notify=True) as server:
            ready.append(server.ready_after)
            rss_ready.append(server.rss())
            if i == 0:
                settle_cpu, settle = _cpu_over(server, SETTLE)
                cpu, wall = _cpu_over(server, idle)
                rss_idle = server.rss()
    files = bundled_models()
    baseline = in_process_rss(files)
    server_rss = int(statistics.median(rss_ready))
    extra = server_rss - baseline["loaded"]
    share = cpu / wall
    print(table(["startup and footprint", "value"], [
        [f"READY=1 after spawning (median of {starts})", f"{statistics.median(ready):.2f} s"],
        ["  each start", ", ".join(f"{t:.2f} s" for t in ready)],
        ["server RSS at READY (median)", mib(server_rss)],
        ["in-process: python + numpy + onnxruntime imported", mib(baseline["imported"])],
        [f"in-process: + the same {len(files)} models loaded", mib(baseline["loaded"])],
        ["server - in-process", f"{extra / 1e6:+.1f} MB"],
        [f"server CPU in the first {settle:.1f} s after READY", f"{settle_cpu * 1e3:.0f} ms"],
        [f"server CPU while idle, the next {wall:.1f} s", f"{cpu * 1e3:.0f} ms ({100 * share:.2f} % of one core)"],
        ["server RSS after the idle window", mib(rss_idle)],
    ]))
    print()
    print(table(["target (issue 10, information only)", "measured", "result"], [
        [f"READY <= {READY_TARGET:.0f} s after start", f"{statistics.median(ready):.2f} s",
         verdict(statistics.median(ready) <= READY_TARGET)],
        ["server RSS <= in-process + 40 MB", f"{extra / 1e6:+.1f} MB", verdict(extra <= RSS_TARGET)],
        ["idle CPU ~0 (<= 1 % of one core, no busy polling)", f"{100 * share:.2f} %", verdict(share <= IDLE_TARGET)],
    ]))

"""The `outside` part (issue 10): Triton's perf_analyzer, a client edgecow did not write, against the bench's
server: y = x*1 at 4 KB, shared memory `none` and `system`, concurrency 1 and 4.

    PERF_ANALYZER=/path/to/perf_analyzer python -m bench outside [--quick]

perf_analyzer is looked for in $PERF_ANALYZER, then $EDGECOW_PERF_ANALYZER (what the compat test reads),
then on PATH, then beside this Python (where the tritonclient wheel's scripts land). The binary in tritonclient's
wheel links the CUDA runtime even for CPU-only work; when libcudart is missing and the `nvidia-cuda-runtime-cu12`
package is importable, its library folder is used. Where it cannot run, the part prints one line saying why and
the bench goes on.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

from bench import procs
from bench.report import heading, table

MODEL, SHAPE, OUTPUT_BYTES = "scale", "x:1024", 4096  # FP32[1024]: the 4 KB of the shm part
MODES = ("none", "system")
CONCURRENCY = "1:4:3"  # start:end:step, so 1 and 4
ENV_VARIABLES = ("PERF_ANALYZER", "EDGECOW_PERF_ANALYZER")


def locate() -> tuple[str | None, str]:
    """(path, "") or (None, why it is not there)."""
    for variable in ENV_VARIABLES:
        explicit = os.environ.get(variable)
        if explicit:
            usable = os.access(explicit, os.X_OK)
            return (explicit, "") if usable else (None, f"${variable}={explicit} is not an executable file")
    found = shutil.which("perf_analyzer") or shutil.which("perf_analyzer", path=str(Path(sys.executable).parent))
    if found:
        return found, ""
    return None, ("perf_analyzer is not on PATH and $PERF_ANALYZER is not set (it ships in the tritonclient 2.40.0 "
                  "wheel for Linux x86_64, as a data script; see bench/README.md)")


def _cuda_runtime_dir() -> str | None:
    try:
        spec = importlib.util.find_spec("nvidia.cuda_runtime")
    except ModuleNotFoundError:
        return None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if (Path(folder) / "lib" / "libcudart.so.12").exists():
            return str(Path(folder) / "lib")
    return None


def runnable(binary: str) -> tuple[dict[str, str] | None, str]:
    """The environment to run `binary` in, or (None, the loader's complaint)."""
    env = dict(os.environ)
    for attempt in range(2):
        done = subprocess.run([binary, "--version"], env=env, capture_output=True, text=True, timeout=60)
        if "error while loading shared libraries" not in done.stderr:
            return env, ""
        libdir = _cuda_runtime_dir()
        if attempt or libdir is None or "libcudart" not in done.stderr:
            return None, done.stderr.strip().splitlines()[-1]
        env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [libdir, env.get("LD_LIBRARY_PATH")]))
    return None, "unreachable"


def run(args: argparse.Namespace, workdir: Path) -> None:
    print(heading("outside (issue 10): perf_analyzer, y = x*1 at 4 KB, shm none/system, concurrency 1 and 4"))
    binary, why = locate()
    env = None
    if binary is not None:
        env, why = runnable(binary)
    if binary is None or env is None:
        print(f"perf_analyzer skipped: {why}")
        return
    interval = 200 if args.quick else 2000
    rows = []
    with procs.EdgeServer(workdir / "srv", procs.build_repository(workdir / "models")) as server:
        for mode in MODES:
            rows += _measure(binary, env, server.unix_target, mode, interval, workdir / f"{mode}.csv")
    print(table(["shared memory", "concurrency", "p50", "p90", "p99", "infer/s"], rows))
    print(f"({binary}: gRPC on the unix socket, {interval} ms windows, its own "
          "stability rule; `system`: inputs and outputs in regions it creates and registers)")


def _measure(binary: str, env: dict[str, str], target: str, mode: str, interval: int,
             report: Path) -> list[list[object]]:
    cmd = [binary, "-m", MODEL, "-i", "grpc", "-u", target, "--shape", SHAPE, "--shared-memory", mode,
           "--concurrency-range", CONCURRENCY, "--measurement-interval", str(interval),
           "--stability-percentage", "50", "--max-trials", "10", "-f", str(report)]
    if mode != "none":
        cmd += ["--output-shared-memory-size", str(OUTPUT_BYTES)]
    try:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60 + 40 * interval / 1000)
    except subprocess.TimeoutExpired:
        return [[mode, "-", "timed out", "", "", ""]]
    if done.returncode != 0 or not report.exists():
        said = (done.stderr or done.stdout).strip().splitlines() or [f"exit status {done.returncode}"]
        return [[mode, "-", f"failed: {said[-1][:120]}", "", "", ""]]
    with report.open() as f:
        lines = list(csv.DictReader(f))
    lines.sort(key=lambda line: int(line["Concurrency"]))
    return [[mode, line["Concurrency"], _ms(line["p50 latency"]), _ms(line["p90 latency"]), _ms(line["p99 latency"]),
             f"{float(line['Inferences/Second']):.0f}"] for line in lines]


def _ms(microseconds: str) -> str:
    return f"{int(microseconds) / 1000:.3f} ms"

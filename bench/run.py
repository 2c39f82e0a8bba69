"""The bench's command line: one part or all of them, full size or --quick.

    python -m bench                      # everything, full size (several minutes on a 2-core box)
    python -m bench models --quick       # one part, smoke size
    python -m bench soak --calls 50000

Every figure is printed, none is asserted: targets show as PASS/MISS for information.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import onnxruntime as ort
from google.protobuf.internal import api_implementation

from bench import core, outside, realistic, shm, soak, startup

PARTS: dict[str, Callable[[argparse.Namespace, Path], None]] = {
    "core": core.run, "shm": shm.run, "models": realistic.run, "outside": outside.run, "startup": startup.run,
    "soak": soak.run,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("part", nargs="?", default="all", choices=("all", *PARTS))
    parser.add_argument("--quick", action="store_true", help="smoke size: few iterations, seconds not minutes")
    parser.add_argument("--calls", type=int, default=None, help="soak calls (default 20000, 400 with --quick)")
    args = parser.parse_args(argv)
    parts = list(PARTS) if args.part == "all" else [args.part]
    print(f"edgecow bench: {', '.join(parts)}{' (quick)' if args.quick else ''}; "
          f"python {sys.version.split()[0]}, onnxruntime {ort.__version__}, protobuf {api_implementation.Type()}, "
          f"{multiprocessing.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    began = time.perf_counter()
    for part in parts:
        part_began = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix=f"edgecow-bench-{part}-") as tmp:
            PARTS[part](args, Path(tmp))
        print(f"({part}: {time.perf_counter() - part_began:.1f} s)")
    # The load says how far to trust this run's absolute figures; the ratios were taken side by side.
    print(f"\nbench done in {time.perf_counter() - began:.0f} s; load average now {os.getloadavg()[0]:.1f}")
    return 0

"""Where a call's time goes: py-spy on the server and cProfile on the client, for one transport and size.

    python -m bench.profile --transport grpc --size 1024 --seconds 15
    python -m bench.profile --transport shm --size 67108864 --seconds 20 --native

Needs py-spy (`pip install py-spy`). Samples only the thread holding the GIL (what serialises a Python server)
unless --all-threads. Prints the server's hottest frames (own time and time including
callees, from py-spy's collapsed stacks) and the client's cProfile top entries.
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import io
import pstats
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import procs
from shm_client import EdgeClient


def _summarise(collapsed: str, top: int) -> str:
    own: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        samples += n
        frames = stack.split(";")
        own[frames[-1]] += n
        for frame in set(frames):
            total[frame] += n
    out = [f"server samples: {samples}", "", "own time (leaf frames):"]
    out += [f"  {100 * n / samples:5.1f}%  {frame}" for frame, n in own.most_common(top)]
    out += ["", "including callees:"]
    out += [f"  {100 * n / samples:5.1f}%  {frame}" for frame, n in total.most_common(top)]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile")
    parser.add_argument("--transport", choices=("grpc", "shm"), default="grpc")
    parser.add_argument("--size", type=int, default=1024, help="input bytes (FP32)")
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--native", action="store_true", help="py-spy --native (C frames too)")
    parser.add_argument("--all-threads", action="store_true", help="sample every thread, not only the GIL holder")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    with tempfile.TemporaryDirectory(prefix="edgecow-profile-") as tmp:
        workdir = Path(tmp)
        repo = procs.build_repository(workdir / "models")
        with procs.EdgeServer(workdir / "srv", repo) as server:
            client = EdgeClient(server.unix_target, transport=args.transport)
            x = procs.payload(args.size)
            for _ in range(5):
                client.infer("scale", {"x": x})
            out = workdir / "server.txt"
            cmd = [spy, "record", "--format", "raw", "--rate", "250", "-o", str(out), "-p", str(server.pid),
                   "-d", str(int(args.seconds))]
            cmd += (["--native"] if args.native else []) + ([] if args.all_threads else ["--gil"])
            recorder = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            time.sleep(1.0)
            profiler = cProfile.Profile()
            calls, began = 0, time.perf_counter()
            deadline = began + args.seconds - 2
            profiler.enable()
            while time.perf_counter() < deadline:
                client.infer("scale", {"x": x})
                calls += 1
            profiler.disable()
            elapsed = time.perf_counter() - began
            _, err = recorder.communicate()
            client.close()
            print(f"{calls} calls over {args.transport} at {args.size} bytes in {elapsed:.1f} s "
                  f"({1e3 * elapsed / max(calls, 1):.3f} ms/call, client profiled)\n")
            if out.exists():
                print(_summarise(out.read_text(), args.top))
            else:
                print(f"py-spy wrote nothing: {err.strip()[-500:]}")
    stream = io.StringIO()
    pstats.Stats(profiler, stream=stream).sort_stats("tottime").print_stats(args.top)
    print("\nclient (cProfile, by own time):")
    print("\n".join(stream.getvalue().splitlines()[:args.top + 12]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

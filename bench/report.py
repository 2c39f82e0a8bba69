"""Timing loops and plain-text tables.

    samples = interleaved({"a": call_a, "b": call_b}, iterations=100, warmup=5)
    print(table(["variant", "p50"], [["a", ms(p50(samples["a"]))]]))
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

KB, MB = 1024, 1024 * 1024


@dataclass(frozen=True)
class Size:
    """One payload size and how many interleaved rounds it gets (full run, --quick)."""

    label: str
    nbytes: int
    iterations: int
    quick: int

    def rounds(self, quick: bool) -> int:
        return self.quick if quick else self.iterations

    def block(self, quick: bool = False) -> int:
        """Counted calls per turn (see interleaved), after one uncounted call that settles what the
        previous variant left running (at 16 MB and more, that is a gRPC call's buffers being freed);
        --quick times its one or two large calls without one."""
        if self.nbytes >= 16 * MB:
            return 1 if quick else 2
        return 10 if self.nbytes < MB else 5

    def warmup(self, quick: bool) -> int:
        """Calls of each variant before the timing, beside the one that checks its answer: fewer for the
        large sizes, fewest with --quick."""
        if self.nbytes >= 16 * MB:
            return 0 if quick else 2
        return (3 if quick else 10) if self.nbytes >= MB else (10 if quick else 50)


def same_answer(name: str, got: object, want: np.ndarray, exact: bool = True) -> bool:
    """Checks one variant's answer outside the timing (a fast wrong path must not look good): raises
    SystemExit when it is not close; returns whether it is bit-identical (always True when `exact`)."""
    array = np.asarray(got).reshape(want.shape)
    if np.array_equal(array, want):
        return True
    if exact:
        raise SystemExit(f"bench: {name} returned a wrong result")
    if not np.allclose(array, want, rtol=1e-4, atol=1e-5):
        raise SystemExit(f"bench: {name} returned a result that differs from in-process onnxruntime")
    return False


def interleaved(
    variants: Mapping[str, Callable[[], object]], iterations: int, warmup: int, block: int = 1
) -> dict[str, np.ndarray]:
    """Seconds per call for each variant (`iterations` each), taken in turns, so that a noisy neighbour
    slows every variant alike instead of whichever happened to run then. The starting variant rotates
    every round and every other cycle of rounds runs in reverse, so each variant follows each other one
    equally often.

    With `block` > 1 a turn is one uncounted call, then `block` counted ones: a call pays for what the
    previous variant left running (a gRPC call's threads finish their work for ~0.1 ms after it returns,
    onnxruntime's threads spin on), which a caller that keeps to one path never pays, and which with
    single-call turns would be charged to every variant of small calls."""
    names = list(variants)
    for name in names:
        for _ in range(warmup):
            variants[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    clock = time.perf_counter
    n = len(names)
    settle = 1 if block > 1 else 0
    for i in range(max(1, iterations // block)):
        order = [names[(i + j) % n] for j in range(n)]
        for name in reversed(order) if (i // n) % 2 else order:
            call = variants[name]
            for _ in range(settle):
                call()
            for _ in range(block):
                start = clock()
                call()
                samples[name].append(clock() - start)
    return {name: np.asarray(values) for name, values in samples.items()}


def pct(samples: np.ndarray, q: float) -> float:
    return float(np.percentile(samples, q))


def ms(seconds: float) -> str:
    value = seconds * 1e3
    if value < 10:
        return f"{value:.3f} ms"
    if value < 100:
        return f"{value:.2f} ms"
    return f"{value:.1f} ms"


def us(seconds: float) -> str:
    return f"{seconds * 1e6:.0f} µs"


def ratio(value: float) -> str:
    return f"{value:.2f}x"


def mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:.1f} MiB"


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Columns aligned: text left, everything that starts with a digit (or a sign) right."""
    cells = [[str(h) for h in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def numeric(text: str) -> bool:
        return text[:1].isdigit() or (text[:1] in ("+", "-") and text[1:2].isdigit())

    def line(row: list[str]) -> str:
        parts = [c.rjust(w) if numeric(c) else c.ljust(w) for c, w in zip(row, widths)]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), rule, *(line(row) for row in cells[1:])])


def heading(text: str) -> str:
    return f"\n== {text} " + "=" * max(0, 100 - len(text))

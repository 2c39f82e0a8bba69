"""The in-process baseline for the server's memory: a plain Python process that imports onnxruntime and opens
the given models with the server's providers, as an application would without the server.

    python -m bench.footprint CPUExecutionProvider a.onnx b.onnx   # {"imported": RSS, "loaded": RSS} as JSON

Run as a child of the bench, so nothing the bench itself imported counts.
"""

from __future__ import annotations

import json
import os
import sys


def _rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main(argv: list[str] | None = None) -> int:
    """argv: the providers, comma-separated (the server's, see bench.procs.server_providers), then the models."""
    providers, *paths = sys.argv[1:] if argv is None else argv
    import numpy  # noqa: F401  (the server has it too; count it on both sides)
    import onnxruntime as ort

    imported = _rss()
    sessions = [ort.InferenceSession(path, providers=providers.split(",")) for path in paths]
    print(json.dumps({"imported": imported, "loaded": _rss(), "models": len(sessions)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

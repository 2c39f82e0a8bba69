"""Rebuild the example repository that ships inside the package (edge_server/examples/).

    python scripts/make_examples.py

The models are tiny and built with onnx.helper from tests/models.py, so `edgecow serve` works with no
arguments on a fresh machine and the files can be checked against their source.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import models  # noqa: E402
import onnx  # noqa: E402
from onnx import TensorProto  # noqa: E402

EXAMPLES = ROOT / "edge_server" / "examples"


def main() -> int:
    repo = EXAMPLES / "models"
    shutil.rmtree(repo, ignore_errors=True)
    # y = x * 1 over a float32 vector of any length: the benchmark's model and a smoke test.
    models.write_model(repo, "identity", 1, models.scale_model(factor=1.0))
    # Several inputs of several dtypes, variable lengths.
    models.write_model(repo, "mixed", 1, models.mixed_model())
    # Triton's classic example: two FP32[1,16] inputs, their sum and difference.
    models.write_model(repo, "add_sub", 1, models.add_sub_model())
    # Text in, text out (v2 BYTES).
    models.write_model(repo, "strings", 1, models.string_model())
    onnx.save(models.identity_model(TensorProto.FLOAT, [1]), EXAMPLES / "probe.onnx")
    for path in sorted(EXAMPLES.rglob("*.onnx")):
        print(path.relative_to(ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())

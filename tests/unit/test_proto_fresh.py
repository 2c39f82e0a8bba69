"""The committed shm_client/shared/_proto is what scripts/gen_proto.py makes from proto/ today.

    python scripts/gen_proto.py            # run this when the test fails, and commit the result
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.support.processes import REPO_ROOT

COMMITTED = REPO_ROOT / "shm_client" / "shared" / "_proto"


def test_generated_protobuf_modules_are_not_stale(tmp_path: Path) -> None:
    fresh = tmp_path / "_proto"
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "gen_proto.py"), "--out", str(fresh)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    generated = {p.name for p in fresh.iterdir() if p.is_file()}
    committed = {p.name for p in COMMITTED.iterdir() if p.is_file() and p.suffix in (".py", ".pyi")}
    assert generated == committed, "run `python scripts/gen_proto.py` and commit shm_client/shared/_proto"
    stale = [name for name in sorted(generated) if (fresh / name).read_bytes() != (COMMITTED / name).read_bytes()]
    assert not stale, f"{', '.join(stale)} differ from proto/; run `python scripts/gen_proto.py` and commit them"


def test_every_proto_source_has_its_generated_module() -> None:
    for proto in (REPO_ROOT / "proto").glob("*.proto"):
        assert (COMMITTED / f"{proto.stem}_pb2.py").is_file()
        assert (COMMITTED / f"{proto.stem}_pb2_grpc.py").is_file()
        # mypy-protobuf's stubs: what `mypy --strict` and users of the py.typed client read.
        assert (COMMITTED / f"{proto.stem}_pb2.pyi").is_file()
        assert (COMMITTED / f"{proto.stem}_pb2_grpc.pyi").is_file()

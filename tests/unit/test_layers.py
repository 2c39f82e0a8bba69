"""The import graph runs one way: the shared layer imports neither side, and the client never the server.

    .venv/bin/pytest tests/unit/test_layers.py
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.support.processes import REPO_ROOT


def _imports(path: Path) -> set[str]:
    """Absolute names of every module `path` imports (relative imports resolved against its package)."""
    package = ".".join(path.relative_to(REPO_ROOT).with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(part for part in (base, node.module or "") if part)
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def _modules(package: str) -> list[Path]:
    return [p for p in (REPO_ROOT / package).rglob("*.py") if "_pb2" not in p.name]


def test_the_shared_layer_imports_neither_the_client_nor_the_server() -> None:
    client_only = ("shm_client.client", "shm_client.session", "shm_client.pool", "shm_client.lane")
    for path in _modules("shm_client/shared"):
        wrong = {name for name in _imports(path) if name.startswith(("edge_server", *client_only))}
        assert not wrong, f"{path.relative_to(REPO_ROOT)} imports {sorted(wrong)}"


def test_the_client_never_imports_the_server_or_onnxruntime() -> None:
    for path in _modules("shm_client"):
        wrong = {name for name in _imports(path) if name.startswith(("edge_server", "onnxruntime", "onnx"))}
        assert not wrong, f"{path.relative_to(REPO_ROOT)} imports {sorted(wrong)}"


def test_request_types_do_not_depend_on_the_data_plane() -> None:
    for module in ("messages.py", "convert.py"):
        imported = _imports(REPO_ROOT / "edge_server" / module)
        assert "edge_server.dataplane" not in imported, f"edge_server/{module} imports the data plane"

"""Shared fixtures: the model repository most tests use, a real server process on it, polling.

    def test_x(server): EdgeClient(server.unix_target).infer("scale", {"x": np.ones(4, np.float32)})

    pytestmark = pytest.mark.shared_server   # the module's `server` is the worker's one shared server

What the fixtures are made of lives in tests/support (the launcher, model builders, helpers).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from shm_client.shared.segments import Segment
from tests.support import waiting
from tests.support.gate import Gate
from tests.support.models import build_repository
from tests.support.processes import ServerProcess, serving
from tests.support.shm import TEST_PREFIX, owned_segments
from tests.support.stubs import idle

# Every server the tests start (ServerProcess, the CLI, an installed wheel) serves its metrics on a free port:
# the default 127.0.0.1:8002 would clash between servers running at once.
os.environ.setdefault("EDGECOW_METRICS_LISTEN", "127.0.0.1:0")


def pytest_configure(config: pytest.Config) -> None:
    """xdist hands out files in the order collected (below) instead of most tests first, which left the one-test
    bench and load files for last. Before xdist 3.8 there is no such choice, and only the order suffers."""
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Files holding `slow` tests run first, each still whole and in file order, so that no worker starts a
    wheel build or a bench run while the others are running out of files."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow") is not None}
    items.sort(key=lambda item: item.path not in slow_files)  # stable: the rest keep their order


@pytest.fixture(scope="session")
def model_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_repository(tmp_path_factory.mktemp("repo") / "models")


@pytest.fixture(scope="session")
def shared_server(model_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One server per worker process for the modules marked `shared_server`: a start costs about half a second
    of CPU, and those modules only make calls (no loads, settings, restarts or exact statistics)."""
    yield from serving(model_repo, tmp_path_factory.mktemp("shared-srv"))


@pytest.fixture(scope="module")
def server(request: pytest.FixtureRequest, model_repo: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The module's server: its own, or with the `shared_server` mark the shared one, which each module must
    hand back alive with no calls in flight and no shared memory registered (so no module sees another's)."""
    if request.node.get_closest_marker("shared_server") is None:
        proc = ServerProcess(model_repo, tmp_path_factory.mktemp("srv")).start()
        yield proc
        proc.stop()
        return
    shared: ServerProcess = request.getfixturevalue("shared_server")
    yield shared
    assert shared.alive(), f"the shared server died during {request.node.name}"
    assert waiting.wait_until(lambda: idle(shared.unix_target), timeout=30), (
        f"{request.node.name} left calls in flight or shared memory registered on the shared server"
    )


@pytest.fixture
def gate(server: ServerProcess) -> Iterator[Gate]:
    """A shut gate registered on `server`: calls made with `gate.request(x)` hold until `gate.open()`."""
    with Gate(server.unix_target) as made:
        yield made


@pytest.fixture(name="segments")
def segments_fixture() -> Iterator[Callable[..., Segment]]:
    """`segments(suffix, size, fill=b"")`: segments named TEST_PREFIX + suffix, closed and unlinked after
    the test (so `our_shm_entries` counts them while they live)."""
    with owned_segments(TEST_PREFIX) as make:
        yield make


@pytest.fixture
def wait_until() -> Callable[..., object]:
    """Poll `predicate` until it is true or `timeout` passes; returns its last value."""
    return waiting.wait_until

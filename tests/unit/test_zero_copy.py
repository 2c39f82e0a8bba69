"""Proofs that tensors in shared memory are never copied on their way into or out of onnxruntime.

    .venv/bin/pytest tests/unit/test_zero_copy.py

In-process, with the real parts: a real /dev/shm segment (the client's side), a RegionRegistry that maps it
again (the server's side), and a ModelRuntime loaded from an ONNX file written by the test.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from edge_server.config import Settings
from edge_server.dataplane import DataPlane
from edge_server.messages import InferRequest, InputTensor, RequestedOutput, ShmRef
from edge_server.regions import RegionRegistry
from edge_server.repository import ModelStore, Repository
from edge_server.runtime import ModelOptions, ModelRuntime
from shm_client.shared.segments import Segment, unique_key
from tests.support import models

STATIC_SHAPE = (4, 256)
STATIC_BYTES = 4 * 256 * 4
FACTOR = 3.0


@pytest.fixture(scope="module")
def zc_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("zc") / "models"
    models.write_model(root, "static", 1, models.scale_model(shape=list(STATIC_SHAPE), factor=FACTOR))
    models.write_model(root, "scale", 1, models.scale_model(factor=2.0))
    return root


@pytest.fixture(scope="module")
def static_model(zc_repo: Path) -> ModelRuntime:
    path = zc_repo / "static" / "1" / "model.onnx"
    return ModelRuntime.load("static", 1, path, ModelOptions(providers=("CPUExecutionProvider",)))


@pytest.fixture
def segment() -> Iterator[Segment]:
    """The client's side: a segment of three pages."""
    seg = Segment.create(unique_key() + "-zc", 3 * 4096)
    yield seg
    seg.close()
    seg.unlink()


@pytest.fixture
def registry(segment: Segment) -> Iterator[RegionRegistry]:
    """The server's side: the segment registered (and so mapped a second time) as region "r"."""
    registry = RegionRegistry()
    registry.register("r", "/" + segment.key, offset=0, byte_size=segment.size)
    yield registry
    registry.close()


def test_input_view_is_the_shared_mapping(segment: Segment, registry: RegionRegistry) -> None:
    x = np.arange(np.prod(STATIC_SHAPE), dtype=np.float32).reshape(STATIC_SHAPE)
    segment.write(x, offset=64)
    with registry.use("r") as region:
        view = region.view(64, STATIC_BYTES, np.dtype(np.float32), STATIC_SHAPE, "input 'x'")
        mapping = np.frombuffer(region.segment.buffer, dtype=np.uint8)
        assert np.shares_memory(view, mapping)
        assert view.ctypes.data == region.segment.address() + 64
        np.testing.assert_array_equal(view, x)
        # The same physical pages: a write by the client shows through the server's view.
        segment.array(np.float32, (1,), offset=64)[0] = -7.0
        assert view[0, 0] == -7.0


def test_bound_input_ortvalue_points_at_the_view(
    segment: Segment, registry: RegionRegistry, static_model: ModelRuntime
) -> None:
    segment.write(np.ones(STATIC_SHAPE, np.float32))
    with registry.use("r") as region:
        view = region.view(0, STATIC_BYTES, np.dtype(np.float32), STATIC_SHAPE, "input 'x'")
        _binding, values = static_model.bind({"x": view}, ["y"], {})
        assert values[0].data_ptr() == view.ctypes.data == region.segment.address()


def test_static_output_is_written_in_place(
    segment: Segment, registry: RegionRegistry, static_model: ModelRuntime
) -> None:
    x = np.linspace(-1, 1, np.prod(STATIC_SHAPE), dtype=np.float32).reshape(STATIC_SHAPE)
    segment.write(x)
    out_offset = 2 * 4096
    with registry.use("r") as region:
        x_view = region.view(0, STATIC_BYTES, np.dtype(np.float32), STATIC_SHAPE, "input 'x'")
        y_view = region.view(out_offset, STATIC_BYTES, np.dtype(np.float32), STATIC_SHAPE, "output 'y'")
        binding, _keep = static_model.bind({"x": x_view}, ["y"], {"y": y_view})
        static_model.session.run_with_iobinding(binding)
        (output,) = binding.get_outputs()
        assert output.data_ptr() == y_view.ctypes.data == region.segment.address() + out_offset
    np.testing.assert_array_equal(segment.array(np.float32, STATIC_SHAPE, offset=out_offset), x * FACTOR)


def test_run_returns_the_bound_buffer_itself(
    segment: Segment, registry: RegionRegistry, static_model: ModelRuntime
) -> None:
    segment.write(np.full(STATIC_SHAPE, 2.0, np.float32))
    with registry.use("r") as region:
        x_view = region.view(0, STATIC_BYTES, np.dtype(np.float32), STATIC_SHAPE, "input 'x'")
        y_view = region.view(4096, STATIC_BYTES, np.dtype(np.float32), STATIC_SHAPE, "output 'y'")
        result = static_model.run({"x": x_view}, ["y"], {"y": y_view})
        assert result["y"] is y_view
    assert (segment.array(np.float32, STATIC_SHAPE, offset=4096) == 2.0 * FACTOR).all()


# -- the same through the DataPlane, which picks views and bindings by itself ----------------------------


@pytest.fixture(scope="module")
def plane(zc_repo: Path) -> Iterator[DataPlane]:
    settings = Settings(model_repository=zc_repo, providers=["CPUExecutionProvider"])
    store = ModelStore(Repository(zc_repo), settings)
    store.load_all()
    registry = RegionRegistry()
    yield DataPlane(store, registry, settings)
    registry.close()


def _shm_request(model: str, shape: tuple[int, ...], in_offset: int, out_offset: int, out_size: int) -> InferRequest:
    nbytes = int(np.prod(shape)) * 4
    return InferRequest(
        model,
        inputs=[InputTensor("x", "FP32", shape, shm=ShmRef("r", nbytes, in_offset))],
        outputs=[RequestedOutput("y", shm=ShmRef("r", out_size, out_offset))],
    )


@pytest.mark.parametrize("out_offset", [4096, 4098], ids=["aligned", "unaligned"])
def test_dataplane_puts_static_output_in_the_region(plane: DataPlane, segment: Segment, out_offset: int) -> None:
    plane.registry.register("r", "/" + segment.key, offset=0, byte_size=segment.size)
    try:
        x = np.arange(np.prod(STATIC_SHAPE), dtype=np.float32).reshape(STATIC_SHAPE)
        segment.write(x)
        response = plane.infer(_shm_request("static", STATIC_SHAPE, 0, out_offset, STATIC_BYTES), local=True)
        (output,) = response.outputs
        assert output.array is None and output.shape == STATIC_SHAPE
        got = np.frombuffer(segment.buffer, np.uint8, STATIC_BYTES, out_offset).view(np.float32)
        np.testing.assert_array_equal(got.reshape(STATIC_SHAPE), x * FACTOR)
    finally:
        plane.registry.unregister("r")


def test_dataplane_copies_dynamic_output_once_into_the_region(plane: DataPlane, segment: Segment) -> None:
    plane.registry.register("r", "/" + segment.key, offset=0, byte_size=segment.size)
    try:
        x = np.arange(100, dtype=np.float32)
        segment.write(x, offset=8)
        response = plane.infer(_shm_request("scale", (100,), 8, 4096, 4096), local=True)
        (output,) = response.outputs
        assert output.array is None and output.shape == (100,)
        np.testing.assert_array_equal(segment.array(np.float32, (100,), offset=4096), x * 2.0)
    finally:
        plane.registry.unregister("r")

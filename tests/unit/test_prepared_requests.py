"""The lane's remembered requests (InferAdapter.infer_body): bounded, only for all-shared-memory calls, and
checked once per model without holding the model.

    pytest tests/unit/test_prepared_requests.py
"""

from __future__ import annotations

import gc
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import cast

import numpy as np

from edge_server.config import Settings
from edge_server.dataplane import DataPlane
from edge_server.messages import Cancellation, InferRequest, InferResponse
from edge_server.regions import RegionRegistry
from edge_server.repository import ModelStore, Repository
from edge_server.runtime import BINDINGS_PER_THREAD
from edge_server.transport import PREPARED_MAX_BYTES, PREPARED_REQUESTS, InferAdapter
from shm_client.session import encode_request
from shm_client.shared._proto import inference_pb2 as pb
from shm_client.shared.segments import Segment
from tests.support.models import scale_model, write_model
from tests.support.stubs import scale_shm_request


class _Plane:
    """Records the requests it is given and answers with no outputs."""

    def __init__(self) -> None:
        self.seen: list[InferRequest] = []

    def infer(self, request: InferRequest, local: bool) -> InferResponse:
        self.seen.append(request)
        return InferResponse(request.model, "1", request.id, [])


def _body(region: str, raw: bytes | None = None, timeout_us: int = 0) -> bytes:
    request = pb.ModelInferRequest(model_name="scale")
    tensor = request.inputs.add(name="x", datatype="FP32", shape=[4])
    if raw is None:
        tensor.parameters["shared_memory_region"].string_param = region
        tensor.parameters["shared_memory_byte_size"].int64_param = 16
    if timeout_us:
        request.parameters["timeout"].int64_param = timeout_us
    return encode_request((request, [] if raw is None else [raw]))


def _adapter() -> tuple[InferAdapter, _Plane]:
    plane = _Plane()
    return InferAdapter(cast(DataPlane, plane)), plane


def test_the_cache_holds_at_most_its_limit() -> None:
    adapter, plane = _adapter()
    for i in range(PREPARED_REQUESTS + 50):
        adapter.infer_body(_body(f"r{i}"), local=True, cancellation=Cancellation())
    assert len(adapter._prepared) == PREPARED_REQUESTS
    assert [r.inputs[0].shm.region for r in plane.seen[-2:] if r.inputs[0].shm] == [
        f"r{PREPARED_REQUESTS + 48}", f"r{PREPARED_REQUESTS + 49}"]


def test_each_call_gets_its_own_request_deadline_and_cancellation() -> None:
    adapter, plane = _adapter()
    body = _body("a", timeout_us=250_000)
    cancellations = [Cancellation(), Cancellation()]
    for cancellation in cancellations:
        adapter.infer_body(body, local=True, cancellation=cancellation)
    first, second = plane.seen
    assert first is not second and [first.cancellation, second.cancellation] == cancellations
    assert first.deadline is not None and second.deadline is not None and second.deadline >= first.deadline
    assert len(adapter._prepared) == 1


def test_a_transport_deadline_is_each_calls_own() -> None:
    """Over gRPC a call also has the transport's deadline: the nearer one counts, call by call."""
    adapter, plane = _adapter()
    body = _body("a", timeout_us=60_000_000)
    for remaining in (5.0, 0.5, None):
        before = time.monotonic()
        adapter.infer_body(body, local=True, cancellation=Cancellation(), transport_remaining=remaining)
        deadline = plane.seen[-1].deadline
        assert deadline is not None
        assert before + (remaining or 60.0) <= deadline <= time.monotonic() + (remaining or 60.0)


def test_requests_carrying_tensor_bytes_are_not_remembered() -> None:
    adapter, _ = _adapter()
    adapter.infer_body(_body("", raw=np.ones(4, np.float32).tobytes()), local=True, cancellation=Cancellation())
    big = _body("r" * (PREPARED_MAX_BYTES + 1))
    assert len(big) > PREPARED_MAX_BYTES
    adapter.infer_body(big, local=True, cancellation=Cancellation())
    assert adapter._prepared == {}


def _plane_on(root: Path) -> tuple[InferAdapter, RegionRegistry, ModelStore]:
    write_model(root, "scale", 1, scale_model(factor=2.0))
    settings = Settings(model_repository=root)
    store = ModelStore(Repository(root), settings)
    store.load_all()
    registry = RegionRegistry()
    return InferAdapter(DataPlane(store, registry, settings)), registry, store


def test_a_remembered_request_is_checked_once_per_model_and_never_keeps_a_model_alive(
    tmp_path: Path, segments: Callable[..., Segment]
) -> None:
    adapter, registry, store = _plane_on(tmp_path / "models")
    source, target = segments("memo-in", 4096), segments("memo-out", 4096)
    registry.register("memo-in", "/" + source.key, 0, 16)
    registry.register("memo-out", "/" + target.key, 0, 16)
    body = encode_request((scale_shm_request("memo-in", "memo-out", 4), []))
    for step in range(3):  # new data in the same regions, through the same remembered request
        x = np.arange(4, dtype=np.float32) + step
        source.write(x.tobytes())
        adapter.infer_body(body, local=True, cancellation=Cancellation())
        np.testing.assert_array_equal(np.frombuffer(target.bytes_view(0, 16), np.float32), x * 2)
    (template, _), = adapter._prepared.values()
    assert template.memo is not None and len(template.memo) == 1  # checked for the one model
    model = weakref.ref(store.get("scale"))
    store.unload("scale")
    gc.collect()
    assert model() is None, "the remembered request kept the unloaded model alive"
    assert len(template.memo) == 0
    registry.close()


def test_buffers_used_in_turn_each_get_their_own_answer(tmp_path: Path, segments: Callable[..., Segment]) -> None:
    """Callers that take turns over a few sets of buffers (double buffering, a pool handing segments out
    in turn), more sets than a thread keeps bindings for: every answer lands in its own output."""
    adapter, registry, _ = _plane_on(tmp_path / "models")
    sets = BINDINGS_PER_THREAD + 2
    bodies = []
    for i in range(sets):
        source, target = segments(f"turn-in-{i}", 4096), segments(f"turn-out-{i}", 4096)
        registry.register(f"turn-in-{i}", "/" + source.key, 0, 16)
        registry.register(f"turn-out-{i}", "/" + target.key, 0, 16)
        bodies.append((source, target, encode_request((scale_shm_request(f"turn-in-{i}", f"turn-out-{i}", 4), []))))
    for step in range(3 * sets):
        source, target, body = bodies[step % sets]
        x = np.arange(4, dtype=np.float32) + step
        source.write(x.tobytes())
        adapter.infer_body(body, local=True, cancellation=Cancellation())
        np.testing.assert_array_equal(np.frombuffer(target.bytes_view(0, 16), np.float32), x * 2)
    registry.close()

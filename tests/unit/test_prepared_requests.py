"""The lane's remembered requests (InferAdapter.infer_body): bounded, and only for all-shared-memory calls.

    pytest tests/unit/test_prepared_requests.py
"""

from __future__ import annotations

from typing import cast

import numpy as np

from edge_server.dataplane import DataPlane
from edge_server.messages import Cancellation, InferRequest, InferResponse
from edge_server.transport import PREPARED_MAX_BYTES, PREPARED_REQUESTS, InferAdapter
from shm_client.session import encode_request
from shm_client.shared._proto import inference_pb2 as pb


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


def test_requests_carrying_tensor_bytes_are_not_remembered() -> None:
    adapter, _ = _adapter()
    adapter.infer_body(_body("", raw=np.ones(4, np.float32).tobytes()), local=True, cancellation=Cancellation())
    big = _body("r" * (PREPARED_MAX_BYTES + 1))
    assert len(big) > PREPARED_MAX_BYTES
    adapter.infer_body(big, local=True, cancellation=Cancellation())
    assert adapter._prepared == {}

"""The request and response types the transports hand the data plane, and the cancellation they share.

    request = InferRequest("scale", inputs=[InputTensor("x", "FP32", (4,), raw=data)])
    response = plane.infer(request, local=True)      # an InferResponse; convert.py turns it into protobuf

Nothing here knows protobuf or onnxruntime: convert.py maps these to and from the wire, dataplane.py runs them.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

INT64_MAX = 2**63 - 1


@dataclass(frozen=True)
class ShmRef:
    """Where a tensor lives in a registered region."""

    region: str
    byte_size: int
    offset: int = 0


@dataclass(frozen=True)
class Contents:
    """Values sent as typed contents, left in the transport's message until the data plane has checked
    their count and size against the limits: decoding allocates in proportion to the count."""

    count: int  # values given
    data_bytes: int  # at least the bytes the values hold (what a BYTES tensor's elements carry)
    decode: Callable[[], np.ndarray]


@dataclass
class InputTensor:
    name: str
    datatype: str
    shape: tuple[int, ...]
    raw: bytes | memoryview | None = None
    contents: Contents | None = None
    shm: ShmRef | None = None


@dataclass
class RequestedOutput:
    name: str
    shm: ShmRef | None = None
    classification: int = 0  # > 0: the top this many entries as "score:index[:label]" BYTES instead


class Cancellation:
    """Set by the transport when the caller has gone; a run in progress is told to stop."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[], None]] = []
        self.cancelled = False

    def cancel(self) -> None:
        with self._lock:
            self.cancelled = True
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback()

    def clear(self) -> None:
        """Forget the callbacks once the work they would stop is over."""
        with self._lock:
            self._callbacks = []

    def on_cancel(self, callback: Callable[[], None]) -> None:
        with self._lock:
            if not self.cancelled:
                self._callbacks.append(callback)
                return
        callback()


@dataclass
class InferRequest:
    model: str
    version: str = ""
    id: str = ""
    inputs: list[InputTensor] = field(default_factory=list)
    outputs: list[RequestedOutput] = field(default_factory=list)
    deadline: float | None = None  # time.monotonic() value
    cancellation: Cancellation | None = None
    # Shared by the calls of one remembered request (see transport.InferAdapter.infer_body): what the data
    # plane found its names, types and shapes to mean for a model, so that it checks them once per model.
    # Weakly keyed by the model, so that it never keeps an unloaded version's session alive.
    memo: MutableMapping[Any, object] | None = None


@dataclass
class OutputTensor:
    name: str
    datatype: str
    shape: tuple[int, ...]
    array: np.ndarray | None  # None when the output was placed in shared memory
    shm: ShmRef | None = None


@dataclass
class InferResponse:
    model: str
    version: str
    id: str
    outputs: list[OutputTensor]

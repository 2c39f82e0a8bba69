"""Calls that stay in flight until the test releases them, on the `gate` model (see models.gate_model).

    with Gate(server.unix_target) as gate:
        call = Call(lambda: stub.ModelInfer(gate.request(x), timeout=60))
        assert wait_until(lambda: gate.in_flight() == 1)      # from here the call certainly runs
        ...                                                    # swap, drain, unregister, admit others
        gate.open()
        reply = call.result()

The gate is an INT32 in a shared-memory region the test registers; the server hands onnxruntime a
pointer into it and the model re-reads it every round, so the call ends when the test writes 1 there,
never sooner and never later, whatever the machine's speed.
"""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Callable
from typing import Generic, TypeVar, cast

import grpc
import numpy as np

from shm_client.shared._proto import inference_pb2 as pb
from shm_client.shared.segments import Segment
from tests.support.stubs import in_flight, v2_stub

T = TypeVar("T")
_numbers = itertools.count()


class Gate:
    """A registered region holding the `gate` input: shut (0) when made, open (1) after open()."""

    def __init__(self, target: str, model: str = "gate") -> None:
        self.target = target
        self.model = model
        number = next(_numbers)
        self.region = f"gate-{os.getpid()}-{number}"
        self._segment = Segment.create(f"gatetest-{os.getpid()}-{number}", 4096)
        self.flag = self._segment.array(np.int32, (1,))
        self.flag[0] = 0
        self._stub = v2_stub(target)
        self._stub.SystemSharedMemoryRegister(
            pb.SystemSharedMemoryRegisterRequest(name=self.region, key="/" + self._segment.key, byte_size=4),
            timeout=10,
        )

    def add_input(self, request: pb.ModelInferRequest) -> pb.ModelInferRequest:
        """Add the `gate` input, read from this gate's region, to `request`."""
        tensor = request.inputs.add(name="gate", datatype="INT32", shape=[1])
        tensor.parameters["shared_memory_region"].string_param = self.region
        tensor.parameters["shared_memory_byte_size"].int64_param = 4
        return request

    def request(self, x: np.ndarray, version: str = "") -> pb.ModelInferRequest:
        """A call of the gate model on `x` (sent in the request) that holds until the gate opens."""
        request = pb.ModelInferRequest(model_name=self.model, model_version=version)
        request.inputs.add(name="x", datatype="FP32", shape=list(x.shape))
        request.raw_input_contents.append(np.ascontiguousarray(x, np.float32).tobytes())
        return self.add_input(request)

    def in_flight(self) -> int:
        """Calls of this gate's model the server is running now (held ones included)."""
        return in_flight(self.target, self.model)

    def open(self) -> None:
        self.flag[0] = 1

    def shut(self) -> None:
        self.flag[0] = 0

    def close(self) -> None:
        """Open the gate (so nothing stays held), unregister the region and remove it."""
        self.open()
        try:
            self._stub.SystemSharedMemoryUnregister(
                pb.SystemSharedMemoryUnregisterRequest(name=self.region), timeout=10
            )
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.UNAVAILABLE:  # a server that has gone took its regions along
                raise
        del self.flag
        self._segment.close()
        self._segment.unlink()

    def __enter__(self) -> Gate:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def inline_gate_request(x: np.ndarray, gate: int, model: str = "gate") -> pb.ModelInferRequest:
    """A gate model call whose gate travels in the request itself: 1 answers at once; 0 never opens, so
    that call runs until it is cancelled or its deadline passes."""
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name="x", datatype="FP32", shape=list(x.shape))
    request.inputs.add(name="gate", datatype="INT32", shape=[1])
    request.raw_input_contents.extend([np.ascontiguousarray(x, np.float32).tobytes(), np.int32([gate]).tobytes()])
    return request


class Call(Generic[T]):
    """`fn()` on a thread of its own, started at once.

        call = Call(lambda: stub.ModelInfer(request, timeout=60)); ...; reply = call.result()
    """

    def __init__(self, fn: Callable[[], T]) -> None:
        self._fn = fn
        self._value: T | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._value = self._fn()
        except BaseException as err:  # handed to whoever asks for the result
            self._error = err

    def running(self) -> bool:
        return self._thread.is_alive()

    def join(self, timeout: float = 60.0) -> bool:
        """Wait for the call to end; True when it has."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def error(self, timeout: float = 60.0) -> BaseException | None:
        """What the call raised (None when it returned), once it has ended."""
        if not self.join(timeout):
            raise TimeoutError(f"the call was still running after {timeout}s")
        return self._error

    def result(self, timeout: float = 60.0) -> T:
        """What the call returned, once it has ended; what it raised is raised here."""
        error = self.error(timeout)
        if error is not None:
            raise error
        return cast(T, self._value)

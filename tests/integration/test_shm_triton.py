"""tritonclient's system shared-memory flow, exactly as its simple_grpc_shm_client example plays it.

    .venv/bin/pytest tests/integration/test_shm_triton.py

Real server process, real /dev/shm objects made by tritonclient.utils.shared_memory.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.utils.shared_memory as shm
from tritonclient import utils
from tritonclient.utils import InferenceServerException

from shm_client.shared.segments import SHM_DIR

pytestmark = pytest.mark.shared_server  # calls only: see tests/conftest.py

KEY_PREFIX = f"edgecow-test-{os.getpid()}-"


def _key(name: str) -> str:
    return f"/{KEY_PREFIX}{name}"


def _our_entries() -> list[str]:
    return sorted(name for name in os.listdir(SHM_DIR) if name.startswith(KEY_PREFIX))


@pytest.fixture
def triton(server) -> Iterator[grpcclient.InferenceServerClient]:
    # Shared memory is for callers on the unix socket (loopback TCP is remote unless the operator opts in).
    client = grpcclient.InferenceServerClient(f"unix://{server.socket}")
    yield client
    # Every case leaves nothing behind: no registration, no /dev/shm object.
    assert client.get_system_shared_memory_status(as_json=True).get("regions", {}) == {}
    client.close()
    assert _our_entries() == []
    assert server.alive()


def test_add_sub_through_shared_memory_like_the_triton_example(triton: grpcclient.InferenceServerClient) -> None:
    triton.unregister_system_shared_memory()
    triton.unregister_cuda_shared_memory()  # a CPU-only server must accept this

    input0 = np.arange(16, dtype=np.float32).reshape(1, 16)
    input1 = np.full((1, 16), 0.5, dtype=np.float32)
    input_byte_size = input0.nbytes
    output_byte_size = input_byte_size

    shm_op_handle = shm.create_shared_memory_region("output_data", _key("output_simple"), output_byte_size * 2)
    triton.register_system_shared_memory("output_data", _key("output_simple"), output_byte_size * 2)
    shm_ip_handle = shm.create_shared_memory_region("input_data", _key("input_simple"), input_byte_size * 2)
    shm.set_shared_memory_region(shm_ip_handle, [input0])
    shm.set_shared_memory_region(shm_ip_handle, [input1], offset=input_byte_size)
    triton.register_system_shared_memory("input_data", _key("input_simple"), input_byte_size * 2)

    inputs = [grpcclient.InferInput("a", [1, 16], "FP32"), grpcclient.InferInput("b", [1, 16], "FP32")]
    inputs[0].set_shared_memory("input_data", input_byte_size)
    inputs[1].set_shared_memory("input_data", input_byte_size, offset=input_byte_size)
    outputs = [grpcclient.InferRequestedOutput("sum"), grpcclient.InferRequestedOutput("diff")]
    outputs[0].set_shared_memory("output_data", output_byte_size)
    outputs[1].set_shared_memory("output_data", output_byte_size, offset=output_byte_size)

    results = triton.infer(model_name="add_sub", inputs=inputs, outputs=outputs)

    status = triton.get_system_shared_memory_status(as_json=True)["regions"]
    assert set(status) == {"input_data", "output_data"}
    assert status["input_data"]["key"] == _key("input_simple")
    assert int(status["output_data"]["byte_size"]) == output_byte_size * 2

    sum_tensor = results.get_output("sum")
    diff_tensor = results.get_output("diff")
    assert list(results.get_response().raw_output_contents) == [b"", b""]  # the data is in shm
    got_sum = shm.get_contents_as_numpy(
        shm_op_handle, utils.triton_to_np_dtype(sum_tensor.datatype), sum_tensor.shape
    )
    got_diff = shm.get_contents_as_numpy(
        shm_op_handle, utils.triton_to_np_dtype(diff_tensor.datatype), diff_tensor.shape, offset=output_byte_size
    )
    assert list(sum_tensor.shape) == [1, 16] and sum_tensor.datatype == "FP32"
    np.testing.assert_array_equal(got_sum, input0 + input1)
    np.testing.assert_array_equal(got_diff, input0 - input1)

    triton.unregister_system_shared_memory()
    shm.destroy_shared_memory_region(shm_ip_handle)
    shm.destroy_shared_memory_region(shm_op_handle)


def test_dynamic_shape_output_is_copied_once_into_shared_memory(triton: grpcclient.InferenceServerClient) -> None:
    x = np.linspace(-3, 3, 1000, dtype=np.float32)
    in_handle = shm.create_shared_memory_region("dyn_in", _key("dyn_in"), x.nbytes)
    out_handle = shm.create_shared_memory_region("dyn_out", _key("dyn_out"), 8192)
    try:
        shm.set_shared_memory_region(in_handle, [x])
        triton.register_system_shared_memory("dyn_in", _key("dyn_in"), x.nbytes)
        triton.register_system_shared_memory("dyn_out", _key("dyn_out"), 8192)
        for version, factor in (("1", 1.0), ("2", 2.0)):
            inp = grpcclient.InferInput("x", [1000], "FP32")
            inp.set_shared_memory("dyn_in", x.nbytes)
            out = grpcclient.InferRequestedOutput("y")
            out.set_shared_memory("dyn_out", 8192)
            results = triton.infer("scale", [inp], outputs=[out], model_version=version)
            y = results.get_output("y")
            assert list(y.shape) == [1000] and y.datatype == "FP32"
            got = shm.get_contents_as_numpy(out_handle, utils.triton_to_np_dtype(y.datatype), y.shape)
            np.testing.assert_array_equal(got, x * factor)
    finally:
        triton.unregister_system_shared_memory()
        shm.destroy_shared_memory_region(in_handle)
        shm.destroy_shared_memory_region(out_handle)


def test_output_slot_too_small_says_the_size_needed(triton: grpcclient.InferenceServerClient) -> None:
    x = np.ones(1000, dtype=np.float32)
    handle = shm.create_shared_memory_region("small", _key("small"), 8192)
    try:
        shm.set_shared_memory_region(handle, [x])
        triton.register_system_shared_memory("small", _key("small"), 8192)
        inp = grpcclient.InferInput("x", [1000], "FP32")
        inp.set_shared_memory("small", x.nbytes)
        out = grpcclient.InferRequestedOutput("y")
        out.set_shared_memory("small", 100, offset=4096)
        with pytest.raises(InferenceServerException) as err:
            triton.infer("scale", [inp], outputs=[out])
        assert err.value.status() == "StatusCode.INVALID_ARGUMENT"
        assert "4000" in err.value.message()
    finally:
        triton.unregister_system_shared_memory()
        shm.destroy_shared_memory_region(handle)


def test_output_in_shm_and_output_in_response_in_one_call(triton: grpcclient.InferenceServerClient) -> None:
    a = np.arange(16, dtype=np.float32).reshape(1, 16)
    handle = shm.create_shared_memory_region("mixed_out", _key("mixed_out"), 64)
    try:
        triton.register_system_shared_memory("mixed_out", _key("mixed_out"), 64)
        inputs = [grpcclient.InferInput("a", [1, 16], "FP32"), grpcclient.InferInput("b", [1, 16], "FP32")]
        inputs[0].set_data_from_numpy(a)
        inputs[1].set_data_from_numpy(a)
        outputs = [grpcclient.InferRequestedOutput("sum"), grpcclient.InferRequestedOutput("diff")]
        outputs[1].set_shared_memory("mixed_out", 64)
        results = triton.infer("add_sub", inputs, outputs=outputs)
        np.testing.assert_array_equal(results.as_numpy("sum"), a + a)
        diff = results.get_output("diff")
        np.testing.assert_array_equal(shm.get_contents_as_numpy(handle, np.float32, diff.shape), a - a)
    finally:
        triton.unregister_system_shared_memory()
        shm.destroy_shared_memory_region(handle)


def test_strings_as_bytes_input_through_shared_memory(triton: grpcclient.InferenceServerClient) -> None:
    text = np.array([b"alpha", "bêta".encode(), b"", b"x" * 300], dtype=object)
    serialized = utils.serialize_byte_tensor(text)
    in_size = utils.serialized_byte_size(serialized)
    in_handle = shm.create_shared_memory_region("text_in", _key("text_in"), in_size)
    out_handle = shm.create_shared_memory_region("text_out", _key("text_out"), 4096)
    try:
        shm.set_shared_memory_region(in_handle, [serialized])
        triton.register_system_shared_memory("text_in", _key("text_in"), in_size)
        triton.register_system_shared_memory("text_out", _key("text_out"), 4096)
        inp = grpcclient.InferInput("text", [len(text)], "BYTES")
        inp.set_shared_memory("text_in", in_size)
        echo = grpcclient.InferRequestedOutput("echo")
        echo.set_shared_memory("text_out", 2048)
        count = grpcclient.InferRequestedOutput("count")
        count.set_shared_memory("text_out", 8, offset=2048)
        results = triton.infer("strings", [inp], outputs=[echo, count])
        echo_tensor = results.get_output("echo")
        assert echo_tensor.datatype == "BYTES" and list(echo_tensor.shape) == [4]
        got = shm.get_contents_as_numpy(out_handle, np.object_, echo_tensor.shape)
        assert list(got) == list(text)
        count_tensor = results.get_output("count")
        assert shm.get_contents_as_numpy(out_handle, np.int64, count_tensor.shape, offset=2048) == 4
    finally:
        triton.unregister_system_shared_memory()
        shm.destroy_shared_memory_region(in_handle)
        shm.destroy_shared_memory_region(out_handle)


def test_unaligned_offsets_give_the_right_data(triton: grpcclient.InferenceServerClient) -> None:
    """Triton allows any offset; a FP32 tensor at byte 2 must neither crash nor lose its result."""
    a = np.arange(16, dtype=np.float32).reshape(1, 16)
    b = np.full((1, 16), 2.0, dtype=np.float32)
    handle = shm.create_shared_memory_region("odd", _key("odd"), 4096)
    try:
        shm.set_shared_memory_region(handle, [a], offset=2)
        shm.set_shared_memory_region(handle, [b], offset=66)
        triton.register_system_shared_memory("odd", _key("odd"), 4096)
        inputs = [grpcclient.InferInput("a", [1, 16], "FP32"), grpcclient.InferInput("b", [1, 16], "FP32")]
        inputs[0].set_shared_memory("odd", 64, offset=2)
        inputs[1].set_shared_memory("odd", 64, offset=66)
        outputs = [grpcclient.InferRequestedOutput("sum"), grpcclient.InferRequestedOutput("diff")]
        outputs[0].set_shared_memory("odd", 64, offset=1001)
        outputs[1].set_shared_memory("odd", 64, offset=2048)
        triton.infer("add_sub", inputs, outputs=outputs)
        np.testing.assert_array_equal(shm.get_contents_as_numpy(handle, np.float32, [1, 16], offset=1001), a + b)
        np.testing.assert_array_equal(shm.get_contents_as_numpy(handle, np.float32, [1, 16], offset=2048), a - b)
    finally:
        triton.unregister_system_shared_memory()
        shm.destroy_shared_memory_region(handle)


def test_register_with_offset_is_relative_to_the_region(triton: grpcclient.InferenceServerClient) -> None:
    a = np.arange(16, dtype=np.float32).reshape(1, 16)
    handle = shm.create_shared_memory_region("off", _key("off"), 8192)
    try:
        shm.set_shared_memory_region(handle, [a], offset=4096)
        shm.set_shared_memory_region(handle, [a], offset=4096 + 64)
        triton.register_system_shared_memory("off", _key("off"), 4096, offset=4096)
        inputs = [grpcclient.InferInput("a", [1, 16], "FP32"), grpcclient.InferInput("b", [1, 16], "FP32")]
        inputs[0].set_shared_memory("off", 64)
        inputs[1].set_shared_memory("off", 64, offset=64)
        outputs = [grpcclient.InferRequestedOutput("sum")]
        outputs[0].set_shared_memory("off", 64, offset=128)
        triton.infer("add_sub", inputs, outputs=outputs)
        np.testing.assert_array_equal(shm.get_contents_as_numpy(handle, np.float32, [1, 16], offset=4096 + 128), a * 2)
    finally:
        triton.unregister_system_shared_memory()
        shm.destroy_shared_memory_region(handle)


def test_cuda_shared_memory_calls_on_a_cpu_server(triton: grpcclient.InferenceServerClient) -> None:
    triton.unregister_cuda_shared_memory()
    triton.unregister_cuda_shared_memory("anything")
    assert triton.get_cuda_shared_memory_status(as_json=True).get("regions", {}) == {}
    metadata = triton.get_server_metadata(as_json=True)
    assert "system_shared_memory" in metadata["extensions"]

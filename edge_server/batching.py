"""Whether a model batches along its first dimension, and the batch-size check that goes with it.

    limit = max_batch_size("detector", model.inputs, model.outputs, configured=None)   # 4, or 0
    check_batch_size(model, request.inputs)                 # INVALID_ARGUMENT past model.max_batch_size

A batching model is reported the way Triton's onnxruntime backend reports it: ModelConfig.max_batch_size
above 0 and `dims` without the batch dimension, while the metadata shapes keep -1 first. config.toml's
`max_batch_size` decides (0 = no batching); without it a model batches with Triton's default of 4 when
every input and output has a variable first dimension and at least one more. Triton also counts tensors
whose only dimension is variable, but such a dimension is as often a length (tokens, samples, detections)
as a batch, and capping it at 4 would refuse most calls to those models: they batch only when asked.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from shm_client.shared.errors import InvalidArgument

if TYPE_CHECKING:
    from .messages import InputTensor
    from .runtime import ModelRuntime, TensorSpec

# Triton's --backend-config=onnxruntime,default-max-batch-size, which its onnxruntime backend fills in
# for a model that can batch and whose configuration gives no max_batch_size.
DEFAULT_MAX_BATCH_SIZE = 4
# ModelConfig.max_batch_size is an int32.
MAX_BATCH_SIZE_LIMIT = 2**31 - 1


def max_batch_size(
    model: str, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec], configured: int | None
) -> int:
    """The model's max_batch_size: `configured` when given (checked against the model's shapes), else
    DEFAULT_MAX_BATCH_SIZE when every tensor has a variable first dimension and rank 2 or
    more, else 0. InvalidArgument when a configured batch size does not fit the model."""
    tensors = [("input", spec) for spec in inputs] + [("output", spec) for spec in outputs]
    if configured is None:
        batches = bool(tensors) and all(len(spec.shape) >= 2 and spec.shape[0] < 0 for _, spec in tensors)
        return DEFAULT_MAX_BATCH_SIZE if batches else 0
    if configured:
        for kind, spec in tensors:
            shape = list(spec.shape)
            if not shape or shape[0] >= 0:
                raise InvalidArgument(
                    f"max_batch_size = {configured} needs a variable first dimension on every input and output, "
                    f"but {kind} {spec.name!r} of model {model} has shape {shape}; "
                    "set max_batch_size = 0 for a model that does not batch"
                )
    return configured


def config_dims(model: ModelRuntime, spec: TensorSpec) -> tuple[int, ...]:
    """`spec`'s dims as ModelConfig gives them: without the batch dimension when the model batches."""
    if model.max_batch_size > 0 and spec.shape and spec.shape[0] < 0:
        return spec.shape[1:]
    return spec.shape


def batch_size(model: ModelRuntime, inputs: Sequence[InputTensor]) -> int:
    """The inferences one request holds: its batch for a batching model (after check_batch_size), else 1."""
    if model.max_batch_size > 0:
        for tensor in inputs:
            spec = model.spec(tensor.name)
            if spec is not None and spec.shape and spec.shape[0] < 0 and tensor.shape:
                return tensor.shape[0]
    return 1


def check_batch_size(model: ModelRuntime, inputs: Sequence[InputTensor]) -> None:
    """For a batching model: the inputs that carry the batch (those whose first dimension is variable,
    not an initializer given a new value) agree on its size, and it is at most max_batch_size. Names
    must have been checked against the model first."""
    limit = model.max_batch_size
    if limit <= 0:
        return
    batch = None
    for tensor in inputs:
        spec = model.spec(tensor.name)
        if spec is None or not spec.shape or spec.shape[0] >= 0:
            continue
        if not tensor.shape:
            raise InvalidArgument(f"input {tensor.name!r} needs the batch dimension first; model {model.name!r} "
                                  "batches")
        size = tensor.shape[0]
        if size > limit:
            raise InvalidArgument(
                f"input {tensor.name!r} has batch size {size} but model {model.name!r} takes at most {limit} "
                "(max_batch_size); split the request or raise max_batch_size in the model's config.toml"
            )
        if batch is not None and size != batch:
            raise InvalidArgument(
                f"input {tensor.name!r} has batch size {size} but an earlier input has {batch}; the inputs of "
                f"model {model.name!r} share their first dimension"
            )
        batch = size

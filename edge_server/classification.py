"""The v2 classification extension: an output asked for with `classification = k` comes back as its top k
entries, as BYTES strings "score:index" or "score:index:label".

    check_classifiable(spec.datatype, "output 'probs'")       # INVALID_ARGUMENT for BYTES, BOOL, FP16, BF16
    top = classify(scores, 3, batched=True, labels=("cat", "dog"))   # [[b"0.700000:1:dog", ...], ...]

Triton's rules, kept here: a batching model's output is ranked per batch row (shape [batch, k]), any
other output over all its elements (shape [k]); k is capped at the elements there are; the score is
printed as C's "%f" for floating types and as an integer otherwise; the label is the line of the
model's labels file at that index, left out when there is none. Equal scores keep index order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from shm_client.shared.datatypes import DataType
from shm_client.shared.errors import InvalidArgument

# The datatypes Triton ranks; it refuses the others (BYTES, BOOL, FP16, BF16) the same way.
CLASSIFIABLE = ("UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP32", "FP64")


def check_classifiable(datatype: DataType, what: str) -> None:
    """INVALID_ARGUMENT unless an output of `datatype` is one classification can rank."""
    if datatype.name not in CLASSIFIABLE:
        raise InvalidArgument(
            f"{what} is {datatype.name}, which classification cannot rank; ask for it without the classification "
            f"parameter (classification takes {', '.join(CLASSIFIABLE)})"
        )


def classify(values: np.ndarray, count: int, batched: bool, labels: Sequence[str] = ()) -> np.ndarray:
    """The top `count` entries of `values` as an object array of bytes: shape [batch, k] when `batched`
    (and `values` has a first dimension), [k] otherwise, where k = min(count, entries ranked per row)."""
    per_batch = batched and values.ndim >= 1
    # Sizes spelled out rather than -1: a batch of 0 rows leaves -1 nothing to infer from.
    rows = values.reshape(values.shape[0], math.prod(values.shape[1:])) if per_batch else values.reshape(1, values.size)
    k = min(count, rows.shape[1])
    order = _descending(rows)[:, :k]
    scores = np.take_along_axis(rows, order, axis=1)
    floating = values.dtype.kind == "f"
    out = np.empty(order.shape, dtype=object)
    for r in range(order.shape[0]):
        for j in range(k):
            index = int(order[r, j])
            item = f"{_score_text(scores[r, j], floating)}:{index}"
            if index < len(labels) and labels[index]:
                item += f":{labels[index]}"
            out[r, j] = item.encode("utf-8")
    return out if per_batch else out.reshape(k)


def _descending(rows: np.ndarray) -> np.ndarray:
    """Indices that sort each row from the highest value down, ties in index order."""
    # Negation for floats (NaN stays NaN and sorts last); bitwise not for integers, which reverses the
    # order of any integer type without overflowing it.
    key = -rows if rows.dtype.kind == "f" else ~rows
    return np.argsort(key, axis=1, kind="stable")


def _score_text(value: np.generic, floating: bool) -> str:
    """The score as C++'s std::to_string writes it, which is what Triton sends: "%f" for floats."""
    return f"{float(value):f}" if floating else str(int(value))


def read_labels(path: Path, shown: str) -> tuple[str, ...]:
    """The labels in a text file, one per line (line i names class i); `shown` names the file in errors
    (as config.toml wrote it, never the server's path)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise InvalidArgument(f"labels file {shown!r} named in config.toml does not exist in the model's directory") \
            from None
    except OSError as err:
        raise InvalidArgument(f"labels file {shown!r} named in config.toml cannot be read: {err.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidArgument(f"labels file {shown!r} is not UTF-8 text; save it as UTF-8, one label per line") \
            from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the newline that ends the last line starts no label
    return tuple(line.removesuffix("\r") for line in lines)

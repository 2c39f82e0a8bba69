"""Realistic models for the bench, built with onnx.helper and random weights (no torch, nothing downloaded).

    write_model(repo, "resnet18", resnet18())            # repo/resnet18/1/model.onnx, FP32 [1,3,224,224]
    write_model(repo, "encoder", encoder())              # INT64 ids [1,128] -> FP32 hidden [1,128,256]

The weights are random but scaled (He for convolutions, 0.02 for the encoder) so activations stay finite and
the answers can be compared between in-process and the server.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17  # LayerNormalization is in the default domain from 17
IR_VERSION = 8
RESNET_INPUT = "input"
RESNET_OUTPUT = "logits"
ENCODER_INPUT = "ids"
ENCODER_OUTPUT = "hidden"


@dataclass
class _Graph:
    """Nodes and initializers collected while a model is built; names are made unique by a counter."""

    rng: np.random.Generator
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    weights: list[onnx.TensorProto] = field(default_factory=list)
    count: int = 0

    def name(self, stem: str) -> str:
        self.count += 1
        return f"{stem}_{self.count}"

    def weight(self, stem: str, array: np.ndarray) -> str:
        name = self.name(stem)
        self.weights.append(numpy_helper.from_array(array, name))
        return name

    def normal(self, stem: str, shape: tuple[int, ...], std: float) -> str:
        return self.weight(stem, (self.rng.standard_normal(shape) * std).astype(np.float32))

    def op(self, op_type: str, inputs: list[str], stem: str | None = None, **attrs: Any) -> str:
        out = self.name(stem or op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [out], **attrs))
        return out


def _finish(graph: _Graph, name: str, inputs: list[onnx.ValueInfoProto], output: str,
            out_info: onnx.ValueInfoProto) -> onnx.ModelProto:
    # The last node writes the graph's named output.
    graph.nodes[-1].output[0] = output
    body = helper.make_graph(graph.nodes, name, inputs, [out_info], initializer=graph.weights)
    model = helper.make_model(body, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="edgecow-bench")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model


# -- ResNet-18 -----------------------------------------------------------------------------------------
def _conv_bn(g: _Graph, x: str, c_in: int, c_out: int, kernel: int, stride: int, relu: bool) -> str:
    """Convolution without bias, batch normalisation (onnxruntime folds it into the convolution), ReLU."""
    w = g.normal("conv_w", (c_out, c_in, kernel, kernel), math.sqrt(2.0 / (c_in * kernel * kernel)))
    pad = kernel // 2
    y = g.op("Conv", [x, w], kernel_shape=[kernel, kernel], strides=[stride, stride], pads=[pad] * 4)
    scale = g.weight("bn_scale", g.rng.uniform(0.8, 1.2, c_out).astype(np.float32))
    bias = g.weight("bn_bias", (g.rng.standard_normal(c_out) * 0.05).astype(np.float32))
    mean = g.weight("bn_mean", (g.rng.standard_normal(c_out) * 0.05).astype(np.float32))
    var = g.weight("bn_var", g.rng.uniform(0.8, 1.2, c_out).astype(np.float32))
    y = g.op("BatchNormalization", [y, scale, bias, mean, var], epsilon=1e-5)
    return g.op("Relu", [y]) if relu else y


def _basic_block(g: _Graph, x: str, c_in: int, c_out: int, stride: int) -> str:
    y = _conv_bn(g, x, c_in, c_out, 3, stride, relu=True)
    y = _conv_bn(g, y, c_out, c_out, 3, 1, relu=False)
    shortcut = x if stride == 1 and c_in == c_out else _conv_bn(g, x, c_in, c_out, 1, stride, relu=False)
    return g.op("Relu", [g.op("Add", [y, shortcut])])


def resnet18(seed: int = 0, classes: int = 1000) -> onnx.ModelProto:
    """ResNet-18's layout (about 11.7 M parameters): FP32 `input` [1,3,224,224] -> `logits` [1,classes]."""
    g = _Graph(np.random.default_rng(seed))
    y = _conv_bn(g, RESNET_INPUT, 3, 64, 7, 2, relu=True)
    y = g.op("MaxPool", [y], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    c_in = 64
    for c_out, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        y = _basic_block(g, y, c_in, c_out, stride)
        y = _basic_block(g, y, c_out, c_out, 1)
        c_in = c_out
    y = g.op("Flatten", [g.op("GlobalAveragePool", [y])])
    w = g.normal("fc_w", (classes, c_in), math.sqrt(1.0 / c_in))
    b = g.weight("fc_b", np.zeros(classes, np.float32))
    g.op("Gemm", [y, w, b], transB=1)
    return _finish(g, "resnet18", [helper.make_tensor_value_info(RESNET_INPUT, TensorProto.FLOAT, [1, 3, 224, 224])],
                   RESNET_OUTPUT, helper.make_tensor_value_info(RESNET_OUTPUT, TensorProto.FLOAT, [1, classes]))


# -- transformer encoder -------------------------------------------------------------------------------
@dataclass(frozen=True)
class EncoderShape:
    vocab: int = 8192
    seq: int = 128
    width: int = 256
    heads: int = 4
    ffn: int = 1024
    layers: int = 4


def _linear(g: _Graph, x: str, n_in: int, n_out: int) -> str:
    w = g.normal("linear_w", (n_in, n_out), 0.02)
    b = g.weight("linear_b", np.zeros(n_out, np.float32))
    return g.op("Add", [g.op("MatMul", [x, w]), b])


def _layer_norm(g: _Graph, x: str, width: int) -> str:
    gamma = g.weight("ln_g", np.ones(width, np.float32))
    beta = g.weight("ln_b", np.zeros(width, np.float32))
    return g.op("LayerNormalization", [x, gamma, beta], axis=-1, epsilon=1e-5)


def _attention(g: _Graph, x: str, s: EncoderShape) -> str:
    head = s.width // s.heads
    split = g.weight("split_shape", np.array([0, 0, s.heads, head], np.int64))
    merge = g.weight("merge_shape", np.array([0, 0, s.width], np.int64))

    def heads(t: str, perm: list[int]) -> str:
        return g.op("Transpose", [g.op("Reshape", [t, split])], perm=perm)

    q = heads(_linear(g, x, s.width, s.width), [0, 2, 1, 3])  # [1, heads, seq, head]
    k = heads(_linear(g, x, s.width, s.width), [0, 2, 3, 1])  # [1, heads, head, seq]
    v = heads(_linear(g, x, s.width, s.width), [0, 2, 1, 3])
    scale = g.weight("attn_scale", np.array(1.0 / math.sqrt(head), np.float32))
    scores = g.op("Mul", [g.op("MatMul", [q, k]), scale])
    context = g.op("MatMul", [g.op("Softmax", [scores], axis=-1), v])
    context = g.op("Reshape", [g.op("Transpose", [context], perm=[0, 2, 1, 3]), merge])
    return _linear(g, context, s.width, s.width)


def _gelu(g: _Graph, x: str) -> str:
    """0.5 x (1 + erf(x / sqrt 2)), the form onnxruntime fuses into one Gelu kernel."""
    root2 = g.weight("sqrt2", np.array(math.sqrt(2.0), np.float32))
    one = g.weight("one", np.array(1.0, np.float32))
    half = g.weight("half", np.array(0.5, np.float32))
    erf = g.op("Add", [g.op("Erf", [g.op("Div", [x, root2])]), one])
    return g.op("Mul", [g.op("Mul", [x, erf]), half])


def encoder(seed: int = 0, shape: EncoderShape | None = None) -> onnx.ModelProto:
    """A pre-norm transformer encoder: token + position embedding, `layers` x (self-attention + GELU MLP),
    LayerNormalization; INT64 `ids` [1,seq] -> FP32 `hidden` [1,seq,width]."""
    s = shape or EncoderShape()
    g = _Graph(np.random.default_rng(seed))
    table = g.normal("token_embedding", (s.vocab, s.width), 0.02)
    position = g.normal("position_embedding", (1, s.seq, s.width), 0.02)
    h = g.op("Add", [g.op("Gather", [table, ENCODER_INPUT], axis=0), position])
    for _ in range(s.layers):
        h = g.op("Add", [h, _attention(g, _layer_norm(g, h, s.width), s)])
        mlp = _linear(g, _gelu(g, _linear(g, _layer_norm(g, h, s.width), s.width, s.ffn)), s.ffn, s.width)
        h = g.op("Add", [h, mlp])
    _layer_norm(g, h, s.width)
    return _finish(g, "encoder", [helper.make_tensor_value_info(ENCODER_INPUT, TensorProto.INT64, [1, s.seq])],
                   ENCODER_OUTPUT,
                   helper.make_tensor_value_info(ENCODER_OUTPUT, TensorProto.FLOAT, [1, s.seq, s.width]))


def parameters(model: onnx.ModelProto) -> int:
    """How many numbers the initializers hold (shape tensors included, which are a handful)."""
    return sum(int(np.prod(t.dims)) for t in model.graph.initializer)


def write_model(root: Path, name: str, model: onnx.ModelProto) -> Path:
    """root/name/1/model.onnx, the repository layout the server reads."""
    path = Path(root) / name / "1" / "model.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString())
    return path

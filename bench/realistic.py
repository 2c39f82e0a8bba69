"""The `models` part (issue 10): realistic models in-process vs over shared memory vs over gRPC, with the time
the server adds in µs and in % of in-process.

    python -m bench models [--quick]

A ResNet-18-sized CNN (FP32 [1,3,224,224]) and a small transformer encoder (INT64 ids [1,128]), built by
bench/models.py with random weights. Answers are checked outside the timing against in-process onnxruntime.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from bench import models, procs
from bench.report import heading, interleaved, ms, pct, same_answer, table, us, verdict
from shm_client import EdgeClient

IN_PROCESS, SHM, GRPC = "in-process", "edgecow shm", "edgecow grpc unix"


@dataclass(frozen=True)
class Workload:
    name: str
    build: Callable[[], onnx.ModelProto]
    inputs: Callable[[np.random.Generator], dict[str, np.ndarray]]
    output: str
    rounds: int  # interleaved rounds, full run
    quick: int  # interleaved rounds, --quick
    target: str  # how issue 10 bounds the time shm adds
    within: Callable[[float, float], bool]  # (added seconds, in-process seconds) -> target met


WORKLOADS = [
    Workload("resnet18", models.resnet18,
             lambda rng: {models.RESNET_INPUT: rng.standard_normal((1, 3, 224, 224)).astype(np.float32)},
             models.RESNET_OUTPUT, 150, 3, "<= 2 % of in-process", lambda added, base: added <= 0.02 * base),
    Workload("encoder", models.encoder,
             lambda rng: {models.ENCODER_INPUT: rng.integers(0, models.EncoderShape().vocab, (1, 128), np.int64)},
             models.ENCODER_OUTPUT, 500, 10, "<= 0.3 ms", lambda added, base: added <= 0.3e-3),
]


def run(args: argparse.Namespace, workdir: Path) -> None:
    print(heading("models (issue 10): ResNet-18-sized CNN and a transformer encoder, in-process vs shm vs gRPC"))
    repo = workdir / "models"
    facts = []
    for work in WORKLOADS:
        model = work.build()
        path = models.write_model(repo, work.name, model)
        facts.append([work.name, f"{models.parameters(model) / 1e6:.1f} M", f"{path.stat().st_size / 2**20:.1f} MiB",
                      _shapes(model.graph.input), _shapes(model.graph.output)])
    print(table(["model", "parameters", "file", "input", "output"], facts))
    print()
    rows, targets = [], []
    with procs.EdgeServer(workdir / "srv", repo) as server:
        shm = EdgeClient(server.unix_target, transport="shm")
        grpc_unix = EdgeClient(server.unix_target, transport="grpc")
        for work in WORKLOADS:
            session = procs.in_process_session(repo / work.name / "1" / "model.onnx")
            inputs = work.inputs(np.random.default_rng(7))
            variants = {
                IN_PROCESS: _in_process(session, inputs),
                SHM: _remote(shm, work.name, inputs, work.output),
                GRPC: _remote(grpc_unix, work.name, inputs, work.output),
            }
            want = np.asarray(variants[IN_PROCESS]())
            identical = {name: same_answer(f"{name} ({work.name})", call(), want, exact=False)
                         for name, call in variants.items()}
            rounds = work.quick if args.quick else work.rounds
            # In blocks of 5 after a settling call: onnxruntime's threads spin on after a run, and with one call
            # per turn that would slow whichever variant came next.
            samples = interleaved(variants, rounds, warmup=max(1, rounds // 10), block=5 if rounds >= 50 else 1)
            base = pct(samples[IN_PROCESS], 50)
            for name, s in samples.items():
                p50 = pct(s, 50)
                extra = [us(p50 - base), f"{100 * (p50 - base) / base:+.1f} %"] if name != IN_PROCESS else ["", ""]
                rows.append([work.name, name, len(s), ms(p50), ms(pct(s, 90)), *extra,
                             "yes" if identical[name] else "no (allclose)"])
            added = pct(samples[SHM], 50) - base
            targets.append([f"{work.name} over shm: added time {work.target}",
                            f"{us(added)} ({100 * added / base:+.1f} %)", verdict(work.within(added, base))])
        shm.close()
        grpc_unix.close()
    print(table(["model", "variant", "calls", "p50", "p90", "added p50", "added %", "bit-identical"], rows))
    print()
    print(table(["target (issue 10, information only)", "measured", "result"], targets))


def _in_process(session: Any, inputs: dict[str, np.ndarray]) -> Callable[[], object]:
    return lambda: session.run(None, inputs)[0]


def _remote(client: EdgeClient, model: str, inputs: dict[str, np.ndarray], output: str) -> Callable[[], object]:
    return lambda: client.infer(model, inputs)[output]


def _shapes(values: Any) -> str:
    out = []
    for value in values:
        kind = onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type).name
        dims = ",".join(str(d.dim_value) for d in value.type.tensor_type.shape.dim)
        out.append(f"{value.name} {kind} [{dims}]")
    return "; ".join(out)

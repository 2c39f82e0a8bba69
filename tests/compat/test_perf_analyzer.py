"""Triton's perf_analyzer (the C++ binary of the tritonclient 2.40.0 wheel) against a real edgecow server:
gRPC, unary and streaming, with tensors in the request (`--shared-memory none`, outputs checked against
`validation_data`) and in system shared memory (`--shared-memory system`, over the unix socket).

    perf_analyzer -m add_sub_int32 -u unix:/path/edgecow.sock -i grpc --shared-memory system --streaming

The binary comes from $EDGECOW_PERF_ANALYZER, else from the wheel, fetched with pip into the session's
temporary directory. It links Debian's libb64 (package libb64-0d) and CUDA's runtime, libcudart.so.12
(pip's nvidia-cuda-runtime-cu12, in the `test` extra; no GPU is needed); .ci/run installs both.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest

from shm_client.shared._proto import inference_pb2 as pb
from shm_client.shared._proto import inference_pb2_grpc as pb_grpc
from tests.support.models import build_repository
from tests.support.processes import ServerProcess

WHEEL = "tritonclient==2.40.0"
A = np.arange(16, dtype=np.int32)
B = np.full(16, 3, np.int32)
X = np.linspace(-2.0, 2.0, 16, dtype=np.float32)


@dataclass
class PerfAnalyzer:
    binary: Path
    env: dict[str, str]

    def run(self, *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(self.binary), *args], env=self.env, capture_output=True, text=True,
                              timeout=timeout)


def _from_wheel(directory: Path) -> Path:
    """perf_analyzer out of the tritonclient wheel that still carried it, downloaded with pip."""
    fetched = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
         "-q", "-d", str(directory), WHEEL],
        capture_output=True, text=True, timeout=600,
    )
    if fetched.returncode != 0:
        lines = (fetched.stderr or fetched.stdout).strip().splitlines()
        pytest.skip(f"perf_analyzer cannot be had: pip could not download {WHEEL} ({lines[-1] if lines else '?'})")
    (wheel,) = directory.glob("tritonclient-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        members = [name for name in archive.namelist() if name.endswith("/data/bin/perf_analyzer")]
        if not members:
            pytest.skip(f"perf_analyzer cannot be had: the {wheel.name} wheel for this platform carries none")
        binary = Path(archive.extract(members[0], directory))
    binary.chmod(0o755)
    return binary


def _cuda_runtime_dir() -> str | None:
    """The directory of libcudart.so.12 from pip's nvidia-cuda-runtime-cu12, when it is installed."""
    spec = importlib.util.find_spec("nvidia.cuda_runtime")
    if spec is None or not spec.submodule_search_locations:
        return None
    return next((str(Path(p) / "lib") for p in spec.submodule_search_locations if (Path(p) / "lib").is_dir()), None)


@pytest.fixture(scope="session")
def perf_analyzer(tmp_path_factory: pytest.TempPathFactory) -> PerfAnalyzer:
    given = os.environ.get("EDGECOW_PERF_ANALYZER")
    binary = Path(given) if given else _from_wheel(tmp_path_factory.mktemp("perf_analyzer"))
    env = dict(os.environ)
    cuda = _cuda_runtime_dir()
    if cuda:
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (cuda, env.get("LD_LIBRARY_PATH")) if p)
    linked = subprocess.run(["ldd", str(binary)], env=env, capture_output=True, text=True, timeout=60)
    missing = sorted(set(re.findall(r"^\s*(\S+) => not found", linked.stdout, re.MULTILINE)))
    if missing:
        pytest.skip(f"perf_analyzer cannot start: {', '.join(missing)} not found (Debian's libb64-0d gives "
                    "libb64.so.0d, pip's nvidia-cuda-runtime-cu12 libcudart.so.12; .ci/run installs both)")
    return PerfAnalyzer(binary, env)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A server of its own, logging at debug level so that the test can see the regions registered."""
    root = tmp_path_factory.mktemp("perf")
    proc = ServerProcess(build_repository(root / "models"), root, "--log-level", "debug").start()
    yield proc
    proc.stop()


def _tensor(array: np.ndarray) -> dict[str, object]:
    return {"content": array.ravel().tolist(), "shape": list(array.shape)}  # content is flat, row-major


CASES: dict[str, tuple[list[str], dict[str, np.ndarray], dict[str, np.ndarray]]] = {
    # model: (extra flags, input data, the outputs they must give; perf_analyzer 2.40 checks only outputs
    # whose shape the model fixes, so the variable-sized identity's are not given)
    "add_sub_int32": ([], {"a": A.reshape(1, 16), "b": B.reshape(1, 16)},
                      {"sum": (A + B).reshape(1, 16), "diff": (A - B).reshape(1, 16)}),
    "identity_float": (["--shape", "x:16"], {"x": X}, {}),
}


def _input_data(directory: Path, model: str, validate: bool) -> Path:
    _, inputs, outputs = CASES[model]
    data: dict[str, object] = {"data": [{name: _tensor(a) for name, a in inputs.items()}]}
    if validate and outputs:
        data["validation_data"] = [{name: _tensor(a) for name, a in outputs.items()}]
    path = directory / f"{model}-{'checked' if validate else 'plain'}.json"
    path.write_text(json.dumps(data))
    return path


def _statistics(server: ServerProcess, model: str) -> pb.ModelStatistics:
    with grpc.insecure_channel(server.unix_target) as channel:
        reply = pb_grpc.GRPCInferenceServiceStub(channel).ModelStatistics(
            pb.ModelStatisticsRequest(name=model, version="1"), timeout=10
        )
    return reply.model_stats[0]


# Every mode with unary and streaming calls, the outputs checked both ways in `none`, and the variable-sized
# model too: four runs, as perf_analyzer sleeps a second between its (at least three) measurement windows
# whatever it is told.
RUNS = [
    ("none", False, "add_sub_int32"),
    ("none", True, "add_sub_int32"),
    ("system", False, "identity_float"),
    ("system", True, "add_sub_int32"),
]


@pytest.mark.slow  # four perf_analyzer runs of about 3 s each
@pytest.mark.parametrize(("shared_memory", "streaming", "model"), RUNS,
                         ids=[f"{m}-{'streaming' if s else 'unary'}-{n}" for m, s, n in RUNS])
def test_perf_analyzer_measures_edgecow(
    perf_analyzer: PerfAnalyzer, server: ServerProcess, tmp_path: Path, model: str, streaming: bool,
    shared_memory: str,
) -> None:
    # Shared memory is for callers on this machine, which the unix socket proves; tensors in the
    # request go over TCP like any remote caller's. perf_analyzer cannot check outputs it does not
    # receive in the answer, so validation_data goes with `none` only.
    url = f"unix:{server.socket}" if shared_memory == "system" else server.tcp_target
    before = _statistics(server, model)
    flags, _, _ = CASES[model]
    result = perf_analyzer.run(
        "-m", model, "-u", url, "-i", "grpc", "--shared-memory", shared_memory,
        "--input-data", str(_input_data(tmp_path, model, validate=shared_memory == "none")),
        "--concurrency-range", "1:1", "--measurement-mode", "count_windows", "--measurement-request-count", "50",
        "--stability-percentage", "1000", "--max-trials", "5", *flags, *(["--streaming"] if streaming else []),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"Concurrency: 1, throughput: [0-9.]+ infer/sec", result.stdout), result.stdout
    after = _statistics(server, model)
    assert after.inference_stats.fail.count == before.inference_stats.fail.count
    assert after.inference_stats.success.count >= before.inference_stats.success.count + 50
    if shared_memory == "system":
        assert re.search(r"registered shm region \S+ \(", server.log), "perf_analyzer's regions never registered"
    assert server.alive() and "Traceback" not in server.log
    with grpc.insecure_channel(server.unix_target) as channel:  # perf_analyzer unregistered what it made
        status = pb_grpc.GRPCInferenceServiceStub(channel).SystemSharedMemoryStatus(
            pb.SystemSharedMemoryStatusRequest(), timeout=10
        )
    assert dict(status.regions) == {}


def test_perf_analyzer_reports_outputs_that_differ(perf_analyzer: PerfAnalyzer, server: ServerProcess,
                                                   tmp_path: Path) -> None:
    """The validation above checks something: wrong expected outputs make perf_analyzer fail."""
    data = json.loads(_input_data(tmp_path, "add_sub_int32", validate=True).read_text())
    data["validation_data"][0]["sum"]["content"][0] += 1
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps(data))
    result = perf_analyzer.run(
        "-m", "add_sub_int32", "-u", server.tcp_target, "-i", "grpc", "--input-data", str(wrong),
        "--concurrency-range", "1:1", "--measurement-mode", "count_windows", "--measurement-request-count", "10",
        "--max-trials", "2",
    )
    assert result.returncode != 0
    assert "Output doesn't match expected output" in result.stdout + result.stderr

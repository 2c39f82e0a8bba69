"""Streams cannot starve the server: they are bounded in total and per peer, health and unary calls
always answer, the watchdog keeps pinging, and a stream caller that goes away cancels its call.

    pytest tests/adversarial/test_streams.py
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from edge_server.config import ConfigError, load_settings
from tests.support.gate import inline_gate_request
from tests.support.notify import NotifyListener
from tests.support.processes import ServerProcess
from tests.support.stubs import IdleStream, in_flight, live, scale_answers, v2_stub

WORKERS = 8


def test_idle_streams_leave_health_unary_calls_and_the_watchdog_alone(
    model_repo, tmp_path, wait_until
) -> None:
    notify = NotifyListener(tmp_path / "notify")
    server = ServerProcess(
        model_repo, tmp_path, "--workers", str(WORKERS), "--max-streams", "3", "--max-streams-per-peer", "2",
        env=notify.env(watchdog_usec=400_000),
    ).start()
    tcp, unix = v2_stub(server.tcp_target), v2_stub(server.unix_target)
    streams: list[IdleStream] = []
    try:
        # As many idle streams as there are workers, from one TCP peer: two get in, the rest are refused.
        streams += [IdleStream(tcp) for _ in range(WORKERS)]
        assert [s.open for s in streams] == [True, True] + [False] * (WORKERS - 2)
        for refused in streams[2:]:
            assert refused.error is not None
            assert refused.error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert refused.error.details().endswith("raise max_streams_per_peer")
        # Unix callers count as one peer; the third stream in all is the server's last.
        streams += [IdleStream(unix) for _ in range(2)]
        assert streams[-2].open and not streams[-1].open
        assert streams[-1].error is not None and streams[-1].error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert streams[-1].error.details().endswith("raise max_streams")

        assert live(unix) and live(tcp)
        assert scale_answers(unix) and scale_answers(tcp)
        assert notify.wait_for_pings(3), "the watchdog stopped pinging while streams were open"

        assert all(stream.close() for stream in streams), "a stream did not end"
        # Every slot came back: the server takes three streams again.
        again = [IdleStream(unix), IdleStream(tcp), IdleStream(tcp)]
        assert all(stream.open for stream in again)
        assert all(stream.close() for stream in again)
        assert server.alive()
    finally:
        for stream in streams:
            stream.close(timeout=1)
        assert server.stop() == 0
        notify.close()


def test_a_stream_caller_that_goes_away_cancels_its_call(server: ServerProcess, wait_until) -> None:
    stub = v2_stub(server.unix_target)
    request = inline_gate_request(np.ones(4, np.float32), 0)  # never opens: only a cancel ends the call
    call = stub.ModelStreamInfer(iter([request]), timeout=120)
    try:
        assert wait_until(lambda: in_flight(server.unix_target, "gate") == 1, timeout=30), "the call never started"
        call.cancel()
        assert wait_until(lambda: in_flight(server.unix_target, "gate") == 0, timeout=15), "the run kept going"
    finally:
        call.cancel()
    assert scale_answers(stub)


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"workers": 8, "max_streams": 8}, "below workers"),
        ({"workers": 8, "max_streams": 3, "max_streams_per_peer": 4}, "must not exceed max_streams"),
        ({"max_streams": -1}, "must not be negative"),
    ],
)
def test_stream_limits_that_could_starve_the_workers_are_refused(overrides: dict, named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        load_settings(overrides=overrides, environ={})


def test_default_stream_limits_leave_half_the_workers_free() -> None:
    assert load_settings(overrides={"workers": 32}, environ={}).stream_limits() == (16, 8)
    assert load_settings(overrides={"workers": 3}, environ={}).stream_limits() == (1, 1)

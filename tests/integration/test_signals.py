"""A storm of signals: the server keeps reloading and still stops cleanly (handlers must not take locks).

    pytest tests/integration/test_signals.py
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from tests.support.processes import ServerProcess


def test_a_storm_of_sighup_then_sigterm_still_exits_cleanly(model_repo: Path, tmp_path: Path) -> None:
    server = ServerProcess(model_repo, tmp_path).start()
    end = time.monotonic() + 3.0
    while time.monotonic() < end:  # a signal lands at every point of the main loop, locks included
        os.kill(server.pid, signal.SIGHUP)
    for _ in range(100):
        os.kill(server.pid, signal.SIGTERM)
    try:
        assert server.wait(60) == 0, server.log[-2000:]
    finally:
        server.kill()
    assert not server.socket.exists()

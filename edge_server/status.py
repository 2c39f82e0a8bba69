"""The process and host figures edgecow's GetStatus reports, gathered with psutil.

    response = edgecow_pb2.GetStatusResponse()
    add_host_figures(response, started=server_start_time, show_pid=caller_is_local)
"""

from __future__ import annotations

import os
import shutil
import time

import psutil

from shm_client.shared._proto import edgecow_pb2

# One Process object for the server's life: cpu_percent(interval=None) measures since its previous call on
# the same object, so a fresh one each time would always report 0.
_PROCESS = psutil.Process()


def add_host_figures(response: edgecow_pb2.GetStatusResponse, started: float, show_pid: bool) -> None:
    """Fill the process's and the machine's figures; the pid only for a caller on this machine."""
    proc = _PROCESS
    with proc.oneshot():
        response.process.pid = proc.pid if show_pid else 0
        response.process.rss_bytes = proc.memory_info().rss
        response.process.cpu_percent = proc.cpu_percent(interval=None)
        response.process.threads = proc.num_threads()
        response.process.open_files = proc.num_fds()
        response.process.uptime_seconds = time.time() - started
    memory = psutil.virtual_memory()
    response.system.memory_total_bytes = memory.total
    response.system.memory_available_bytes = memory.available
    response.system.cpu_percent = psutil.cpu_percent(interval=None)
    response.system.load_average_1m = os.getloadavg()[0]
    try:
        shm = shutil.disk_usage("/dev/shm")
        response.system.shm_total_bytes = shm.total
        response.system.shm_free_bytes = shm.free
    except OSError:
        pass

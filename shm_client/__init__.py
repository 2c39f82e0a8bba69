"""The light edgecow client: grpcio, protobuf, numpy and posix-ipc, no ML library.

    from shm_client import EdgeClient
    y = EdgeClient().infer("identity", {"x": np.ones(1024, np.float32)})["y"]
"""

from .client import EdgeClient, ZeroCopyResult, resolve_target
from .shared.errors import EdgecowError

__all__ = ["EdgeClient", "EdgecowError", "ZeroCopyResult", "resolve_target"]

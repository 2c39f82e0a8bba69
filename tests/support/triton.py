"""tritonclient on a test server's unix socket, for the compatibility checks.

    @pytest.fixture
    def triton(server): yield from triton_client(server)
"""

from __future__ import annotations

from collections.abc import Iterator

import tritonclient.grpc as grpcclient

from tests.support.processes import ServerProcess


def triton_client(server: ServerProcess) -> Iterator[grpcclient.InferenceServerClient]:
    client = grpcclient.InferenceServerClient(f"unix://{server.socket}")
    yield client
    client.close()

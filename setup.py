"""What pyproject.toml cannot say: the top-level systemd/ directory ships inside the package as edge_server/units.

    pip wheel . --no-deps -w dist/     # the wheel holds edge_server/units/edgecow.service, ...

A package-dir mapping needs an explicit package list, and pyproject.toml cannot combine one with a search.
"""

from setuptools import find_namespace_packages, setup

setup(
    packages=[*find_namespace_packages(include=["shm_client*", "edge_server*"]), "edge_server.units"],
    package_dir={"edge_server.units": "systemd"},
)

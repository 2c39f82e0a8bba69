"""deploy/: the Kubernetes manifests validate offline against the schemas of a pinned Kubernetes version
(kubernetes-validate ships them), the GPU overlay's patch still gives a valid DaemonSet, and the pieces agree
with each other and with the server: the ConfigMap's edgecow.toml is a settings file the server accepts, the
probes and the Service reach the port it listens on, client pods share its socket directory, IPC namespace
and group, and the Containerfile builds the user, group, directory and port the manifests expect.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from edge_server.config import load_settings

KUBERNETES_VERSION = "1.31.0"  # pinned: the schemas kubernetes-validate ships for it, nothing fetched
DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
MANIFESTS = DEPLOY / "kubernetes"
SOCKET_DIR = "/run/edgecow"


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def resource_files() -> list[Path]:
    return sorted(p for p in MANIFESTS.rglob("*.yaml") if p.name != "kustomization.yaml")


def one(name: str, kind: str) -> dict[str, Any]:
    (doc,) = [d for d in documents(MANIFESTS / name) if d["kind"] == kind]
    return doc


def apply_json_patch(document: dict[str, Any], operations: list[dict[str, Any]]) -> None:
    """The `add` operations of RFC 6902 the overlay uses, with its ~1 and ~0 escapes."""
    for op in operations:
        assert op["op"] == "add", op
        *parents, last = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].strip("/").split("/")]
        node: Any = document
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        node[last] = op["value"]


def test_there_are_manifests_to_check() -> None:
    kinds = {doc["kind"] for path in resource_files() for doc in documents(path)}
    assert {"Namespace", "ConfigMap", "DaemonSet", "Service", "Pod"} <= kinds


@pytest.mark.parametrize("path", resource_files(), ids=lambda p: str(p.relative_to(MANIFESTS)))
def test_every_manifest_validates_strictly_against_the_pinned_schemas(path: Path) -> None:
    docs = documents(path)
    assert docs, f"{path} holds no resource"
    for doc in docs:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_the_validator_rejects_what_is_wrong() -> None:
    """The check is real: an unknown field and a wrongly typed one both fail."""
    daemonset = one("daemonset.yaml", "DaemonSet")
    daemonset["spec"]["template"]["spec"]["hostIpc"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(daemonset, KUBERNETES_VERSION, strict=True)
    service = one("service.yaml", "Service")
    service["spec"]["ports"][0]["port"] = "eight thousand and one"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(service, KUBERNETES_VERSION, strict=True)


def test_kustomizations_name_files_that_exist() -> None:
    for kustomization in MANIFESTS.rglob("kustomization.yaml"):
        (doc,) = documents(kustomization)
        for resource in doc["resources"]:
            assert (kustomization.parent / resource).exists(), f"{kustomization}: {resource}"
    (base,) = documents(MANIFESTS / "kustomization.yaml")
    listed = set(base["resources"])
    assert {"namespace.yaml", "configmap.yaml", "daemonset.yaml", "service.yaml"} <= listed
    assert "client-pod.yaml" not in listed  # the sample is applied on its own


def test_the_gpu_overlay_patches_into_a_valid_daemonset_with_one_gpu() -> None:
    (overlay,) = documents(MANIFESTS / "gpu" / "kustomization.yaml")
    (patch,) = overlay["patches"]
    assert patch["target"]["kind"] == "DaemonSet" and patch["target"]["name"] == "edgecow"
    daemonset = one("daemonset.yaml", "DaemonSet")
    apply_json_patch(daemonset, yaml.safe_load(patch["patch"]))
    kubernetes_validate.validate(daemonset, KUBERNETES_VERSION, strict=True)
    (container,) = daemonset["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_the_configmap_is_a_settings_file_the_server_accepts(tmp_path: Path) -> None:
    config = one("configmap.yaml", "ConfigMap")
    toml = tmp_path / "edgecow.toml"
    toml.write_text(config["data"]["edgecow.toml"])
    settings = load_settings(config_file=toml, environ={})
    assert str(settings.socket).startswith(f"{SOCKET_DIR}/")
    assert settings.listen.endswith(":8001")


def test_the_daemonset_mounts_probes_and_serves_what_the_config_says() -> None:
    daemonset = one("daemonset.yaml", "DaemonSet")
    config = one("configmap.yaml", "ConfigMap")
    pod = daemonset["spec"]["template"]["spec"]
    assert pod["hostIPC"] is True
    assert pod["securityContext"]["runAsNonRoot"] is True
    (container,) = pod["containers"]
    assert "--config" in container["args"]
    config_dir = next(m["mountPath"] for m in container["volumeMounts"] if m["name"] == "config")
    assert container["args"][container["args"].index("--config") + 1] == f"{config_dir}/edgecow.toml"
    assert any(v.get("configMap", {}).get("name") == config["metadata"]["name"] for v in pod["volumes"])
    (port,) = container["ports"]
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert container[probe]["grpc"]["port"] == port["containerPort"] == 8001, probe
    assert container["readinessProbe"]["grpc"]["service"] == "inference.GRPCInferenceService"
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    host_paths = {v["name"]: v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v}
    assert host_paths[mounts[SOCKET_DIR]] == SOCKET_DIR
    assert host_paths[mounts["/dev/shm"]] == "/dev/shm"
    service = one("service.yaml", "Service")
    assert service["spec"]["selector"].items() <= daemonset["spec"]["template"]["metadata"]["labels"].items()
    assert service["spec"]["ports"][0]["targetPort"] == port["name"]


def test_the_sample_client_shares_socket_ipc_and_group_with_the_daemon() -> None:
    server = one("daemonset.yaml", "DaemonSet")["spec"]["template"]["spec"]
    client = one("client-pod.yaml", "Pod")["spec"]
    assert client["hostIPC"] is True
    assert server["securityContext"]["runAsGroup"] in client["securityContext"]["supplementalGroups"]
    (container,) = client["containers"]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    host_paths = {v["name"]: v["hostPath"]["path"] for v in client["volumes"] if "hostPath" in v}
    assert host_paths[mounts[SOCKET_DIR]] == SOCKET_DIR
    assert host_paths[mounts["/dev/shm"]] == "/dev/shm"
    target = {e["name"]: e["value"] for e in container["env"]}["EDGECOW_TARGET"]
    assert target == f"unix://{SOCKET_DIR}/edgecow.sock"
    script = container["command"][-1]
    compile(script, "client-pod.yaml", "exec")
    assert "EdgeClient" in script


def test_the_containerfile_builds_what_the_manifests_expect() -> None:
    text = (DEPLOY / "Containerfile").read_text()
    gid = one("daemonset.yaml", "DaemonSet")["spec"]["template"]["spec"]["securityContext"]["runAsGroup"]
    assert re.search(rf"^ARG EDGECOW_GID={gid}$", text, re.M)
    assert "groupadd --system --gid" in text and " edgecow" in text
    assert re.search(r"^USER edgecow:edgecow$", text, re.M)
    assert re.search(r"^EXPOSE 8001$", text, re.M)
    assert f"-m 2770 {SOCKET_DIR}" in text
    assert re.search(r"^FROM docker\.io/library/python:3\.\d+-slim$", text, re.M)
    assert "[server]" in text
    assert re.search(r"^HEALTHCHECK ", text, re.M)

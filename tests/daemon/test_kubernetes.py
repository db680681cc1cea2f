"""configs/kubernetes: every manifest valid (strict schemas), clean under checkov, and in agreement with the
hotswapd config it mounts (socket, token, cache, probes), as the real config loader reads it.

Built-in kinds are checked with kubernetes-validate against Kubernetes KUBERNETES_VERSION's strict schemas.
PodMonitor and PrometheusRule (Prometheus Operator CRDs) have no built-in schema: they are checked against the
CRDs' own openAPIV3Schema, vendored in configs/kubernetes/schemas/ (prometheus-operator v0.93.0), made strict
(unknown fields are errors, as with ``kubectl apply --validate=strict``). The kustomization is rendered with
``kubectl kustomize`` and the rendered output, which is what a cluster receives, is checked too.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import shutil
import subprocess
from pathlib import Path, PurePosixPath
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from hotswap_core.config import Config, config_from_dict, split_host_port

ROOT = Path(__file__).parents[2] / "configs" / "kubernetes"
SCHEMAS = ROOT / "schemas"
KUBERNETES_VERSION = "1.32.0"
COHORTS = ("stable", "canary")
CRD_KINDS = {("monitoring.coreos.com/v1", "PodMonitor"), ("monitoring.coreos.com/v1", "PrometheusRule")}

Doc = dict[str, Any]


def _docs(path: Path) -> list[Doc]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _kustomizations() -> list[Path]:
    return sorted(ROOT.rglob("kustomization.yaml"))


def _listed() -> tuple[set[Path], set[Path]]:
    """(manifest files, configMapGenerator files) that the kustomizations name; folders must be kustomizations."""
    manifests: set[Path] = set()
    generated: set[Path] = set()
    for k in _kustomizations():
        spec = yaml.safe_load(k.read_text())
        for entry in spec.get("resources", []):
            target = (k.parent / entry).resolve()
            assert target.exists(), f"{k}: resource {entry} does not exist"
            if target.is_dir():
                assert (target / "kustomization.yaml").is_file(), f"{k}: {entry} is a folder without kustomization.yaml"
            else:
                manifests.add(target)
        for gen in spec.get("configMapGenerator", []) + spec.get("secretGenerator", []):
            for f in gen.get("files", []):
                generated.add((k.parent / f.split("=")[-1]).resolve())
    return manifests, generated


@pytest.fixture(scope="module")
def rendered() -> list[Doc]:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl is needed to render configs/kubernetes (kubectl kustomize)"
    out = subprocess.run([kubectl, "kustomize", str(ROOT)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d is not None]


def _strict(schema: Any) -> Any:
    """The CRD schema with additionalProperties: false wherever it lists properties and allows no others."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if (
            "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


def _validate(doc: Doc) -> None:
    """Raise when ``doc`` does not match its kind's strict schema."""
    api_kind = (doc.get("apiVersion"), doc.get("kind"))
    if api_kind in CRD_KINDS:
        schema = json.loads((SCHEMAS / f"monitoring.coreos.com_v1_{doc['kind'].lower()}.json").read_text())
        jsonschema.Draft7Validator(_strict(schema)).validate(doc)
        return
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_every_yaml_file_is_a_kustomization_a_listed_manifest_or_a_generated_config() -> None:
    manifests, generated = _listed()
    kustomizations = {k.resolve() for k in _kustomizations()}
    files = {p.resolve() for p in ROOT.rglob("*") if p.suffix in (".yaml", ".yml")}
    assert files - kustomizations - manifests - generated == set(), "YAML files no kustomization.yaml lists"
    assert (ROOT / "base" / "deployment.yaml").resolve() in manifests
    assert all(p.is_relative_to(ROOT.resolve()) for p in manifests | generated), "a resource outside configs/kubernetes"
    assert {p.relative_to(ROOT.resolve()).as_posix() for p in generated} == {f"{c}/hotswapd.yaml" for c in COHORTS}


def test_every_manifest_and_the_rendered_output_match_their_schemas(rendered: list[Doc]) -> None:
    manifests, _ = _listed()
    docs = [(f"{p.relative_to(ROOT)}[{i}]", d) for p in sorted(manifests) for i, d in enumerate(_docs(p))]
    docs += [(f"rendered {d['kind']}/{d['metadata']['name']}", d) for d in rendered]
    problems = []
    for where, doc in docs:
        try:
            _validate(doc)
        except (kubernetes_validate.ValidationError, jsonschema.ValidationError) as exc:
            problems.append(f"{where}: {exc.message}")
    assert problems == []
    kinds = sorted(d["kind"] for d in rendered)
    assert kinds.count("Deployment") == 2 and kinds.count("ConfigMap") == 2 and kinds.count("PodDisruptionBudget") == 2
    assert {"Namespace", "PersistentVolumeClaim", "Service", "PodMonitor", "PrometheusRule"} <= set(kinds)


def test_the_validation_is_strict(rendered: list[Doc]) -> None:
    """A misspelt field fails, in a built-in kind and in both CRDs (else the test above would prove little)."""
    for kind, field in (("Deployment", "replica"), ("PodMonitor", "podTargetLabel"), ("PrometheusRule", "group")):
        doc = copy.deepcopy(next(d for d in rendered if d["kind"] == kind))
        doc["spec"][field] = doc["spec"].pop(next(iter(doc["spec"])))
        with pytest.raises((kubernetes_validate.ValidationError, jsonschema.ValidationError)):
            _validate(doc)
    rule = copy.deepcopy(next(d for d in rendered if d["kind"] == "PrometheusRule"))
    rule["spec"]["groups"][0]["rules"][0]["for"] = 5  # a duration is a string
    with pytest.raises(jsonschema.ValidationError):
        _validate(rule)


def test_checkov_finds_nothing_and_every_skip_has_a_reason(rendered: list[Doc], tmp_path: Path) -> None:
    skips = {}
    for doc in rendered:
        template = doc.get("spec", {}).get("template", {}).get("metadata", {})
        for meta in (doc["metadata"], template):
            for key, value in (meta.get("annotations") or {}).items():
                if key.startswith("checkov.io/skip"):
                    m = re.fullmatch(r"(CKV2?_K8S_\d+)=(.{20,})", value)
                    assert m and " " in m[2], f"{doc['kind']}/{doc['metadata']['name']}: {key}: {value!r} (no reason)"
                    skips[m[1]] = m[2]
    checkov = shutil.which("checkov")
    assert checkov, "checkov is not installed: pip install -e '.[test]'"
    manifest = tmp_path / "rendered.yaml"
    manifest.write_text(yaml.safe_dump_all(rendered))
    # --skip-download: no call to Prisma Cloud for guidelines and severities (the checks themselves are local).
    cmd = [checkov, "-f", str(manifest), "--framework", "kubernetes", "-o", "json", "--skip-download"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    report = json.loads(out.stdout)
    summary, results = report["summary"], report["results"]
    failed = [(c["check_id"], c["check_name"], c["resource"]) for c in results["failed_checks"]]
    assert failed == [] and out.returncode == 0, failed
    assert summary["parsing_errors"] == 0 and summary["passed"] > 100 and summary["resource_count"] >= len(rendered)
    assert {c["check_id"] for c in results["skipped_checks"]} == set(skips)


def _cohort(rendered: list[Doc], cohort: str) -> tuple[Config, Doc, Doc]:
    """(the cohort's config as the pod reads it, its Deployment, its ConfigMap)."""
    (deployment,) = [d for d in rendered if d["kind"] == "Deployment" and d["metadata"]["name"] == f"hotswapd-{cohort}"]
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    (configmap,) = [
        d
        for d in rendered
        if d["kind"] == "ConfigMap" and d["metadata"]["name"] == volumes["config"]["configMap"]["name"]
    ]
    return config_from_dict(yaml.safe_load(configmap["data"]["hotswapd.yaml"])), deployment, configmap


def _under(path: str, mount: str) -> bool:
    return PurePosixPath(path).is_relative_to(PurePosixPath(mount))


@pytest.mark.parametrize("cohort", COHORTS)
def test_the_pod_agrees_with_its_config(rendered: list[Doc], cohort: str) -> None:
    config, deployment, configmap = _cohort(rendered, cohort)
    # The file beside the kustomization is what the ConfigMap carries (loaded with the real loader too).
    assert configmap["data"]["hotswapd.yaml"] == (ROOT / cohort / "hotswapd.yaml").read_text()
    assert config.source.kind == "hub" and config.source.hub.revision == cohort and config.model.device == "cuda"

    pod = deployment["spec"]["template"]
    spec = pod["spec"]
    assert pod["metadata"]["labels"]["cohort"] == cohort == deployment["spec"]["selector"]["matchLabels"]["cohort"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    containers = {c["name"]: c for c in spec["containers"]}
    daemon, app = containers.pop("hotswapd"), containers.pop("application")
    mounts = {
        m["mountPath"]: volumes[m["name"]] | {"readOnly": m.get("readOnly", False)} for m in daemon["volumeMounts"]
    }
    app_mounts = {m["mountPath"]: m["name"] for m in app["volumeMounts"]}

    def volume_of(path: str) -> Doc:
        (mount,) = [m for m in mounts if _under(path, m)] or [None]
        assert mount is not None, f"{path} is on no volume of the hotswapd container"
        return mounts[mount]

    assert daemon["command"] + daemon["args"][:3] == ["hotswapd", "run", "--config", "/etc/hotswapd/hotswapd.yaml"]
    assert volume_of("/etc/hotswapd/hotswapd.yaml")["name"] == "config"

    # The socket: on an emptyDir both containers mount at the same place.
    socket_dir = str(PurePosixPath(config.server.socket).parent)
    assert "emptyDir" in volume_of(config.server.socket)
    assert app_mounts.get(socket_dir) == volume_of(socket_dir)["name"], "the application cannot reach the socket"
    # The Hub token: the Secret's key, at token_file.
    assert config.source.hub.token_file
    token = PurePosixPath(config.source.hub.token_file)
    secret = volume_of(str(token))["secret"]
    assert [i["path"] for i in secret["items"]] == [token.name] and token.parent.as_posix() in mounts
    # Writable where hotswapd writes (the root filesystem is read-only); the caches on the PVC.
    env = {e["name"]: e["value"] for e in daemon["env"]}
    assert config.model.compile.cache_dir
    for path in (config.model.compile.cache_dir, env["HF_HOME"], env["TRITON_CACHE_DIR"]):
        assert volume_of(path)["persistentVolumeClaim"]["claimName"] == "hotswapd-cache"
    for path in (config.state_dir, env["HOME"], env["TMPDIR"], socket_dir, config.model.compile.cache_dir):
        assert not volume_of(path)["readOnly"], path
    assert "emptyDir" in volume_of(config.state_dir)
    assert volume_of("/dev/shm")["emptyDir"]["medium"] == "Memory"

    # Probes on the metrics listener, which listens on the pod's address.
    listen = split_host_port(config.metrics.listen)
    ports = {p["name"]: p["containerPort"] for p in daemon["ports"]}
    assert listen == ("0.0.0.0", ports["metrics"])
    probes = {k: daemon[k]["httpGet"] for k in ("startupProbe", "readinessProbe", "livenessProbe")}
    assert {k: (p["path"], ports[p["port"]]) for k, p in probes.items()} == {
        "startupProbe": ("/readyz", listen[1]), "readinessProbe": ("/readyz", listen[1]),
        "livenessProbe": ("/healthz", listen[1]),
    }  # fmt: skip
    startup = daemon["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600, "a cold compile takes minutes"
    assert spec["terminationGracePeriodSeconds"] > config.server.drain_timeout_s

    # A GPU each; non-root, read-only, no privilege, seccomp.
    for kind in ("requests", "limits"):
        assert daemon["resources"][kind]["nvidia.com/gpu"] == 1
    pod_sc = spec["securityContext"]
    assert pod_sc["runAsNonRoot"] and pod_sc["runAsUser"] > 0 and pod_sc["runAsGroup"] > 0 and "fsGroup" in pod_sc
    assert pod_sc["seccompProfile"] == {"type": "RuntimeDefault"}
    for c in (daemon, app):
        sc = c["securityContext"]
        assert (
            sc["readOnlyRootFilesystem"]
            and not sc["allowPrivilegeEscalation"]
            and sc["capabilities"]["drop"] == ["ALL"]
        )
        assert "@sha256:" in c["image"] and c["resources"]["limits"] and c["resources"]["requests"]
    assert spec["automountServiceAccountToken"] is False


def test_the_cohorts_differ_only_in_the_branch(rendered: list[Doc]) -> None:
    (stable, *_), (canary, *_) = (_cohort(rendered, c) for c in COHORTS)
    assert stable != canary
    hub = dataclasses.replace(canary.source.hub, revision=stable.source.hub.revision)
    assert dataclasses.replace(canary, source=dataclasses.replace(canary.source, hub=hub)) == stable


def test_the_pod_monitor_and_service_reach_every_cohort_s_metrics_port(rendered: list[Doc]) -> None:
    (monitor,) = [d for d in rendered if d["kind"] == "PodMonitor"]
    (service,) = [d for d in rendered if d["kind"] == "Service"]
    assert "cohort" in monitor["spec"]["podTargetLabels"]
    assert [e["port"] for e in monitor["spec"]["podMetricsEndpoints"]] == ["metrics"]
    assert monitor["spec"]["podMetricsEndpoints"][0].get("path", "/metrics") == "/metrics"
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["metrics"]
    for cohort in COHORTS:
        _, deployment, _ = _cohort(rendered, cohort)
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
        assert service["spec"]["selector"].items() <= labels.items()
        (pdb,) = [
            d for d in rendered if d["kind"] == "PodDisruptionBudget" and d["metadata"]["name"] == f"hotswapd-{cohort}"
        ]
        assert pdb["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    namespaces = {d["metadata"].get("namespace") for d in rendered if d["kind"] != "Namespace"}
    assert namespaces == {"hotswapd"}

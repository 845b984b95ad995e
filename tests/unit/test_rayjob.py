"""jobs/rayjob.yaml: the KubeRay RayJob is valid, runs a jobs/ script tl-ray accepts, on GPUs, with shared storage.

Offline and fast: no Kubernetes, no Ray started. The manifest is validated against the schema of the
RayJob CRD's served storage version (tests/data/kuberay/ray.io_rayjobs.yaml, KubeRay's own file) the way
the API server and `kubectl apply` check it: types, required fields, enums, patterns, int32/int64 ranges,
Kubernetes quantities (an int or a string), unique keys of list-maps (containers by name, volume mounts by
path ...) and, as kubectl's strict field validation does, no unknown fields. The schema's CEL rules
(x-kubernetes-validations) are not evaluated: a test checks that the manifest sets none of the fields they
guard. A few checks KubeRay's controller makes (name, TTL, submission mode) are repeated here.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import importlib.metadata
import json
import re
import shlex
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from tl_ray import cli
from tl_ray.options import merge
from tl_ray.training.config import TrainConfig
from tl_ray.tuning.config import TuneConfig

ROOT = Path(__file__).resolve().parents[2]
MANIFEST = ROOT / "jobs" / "rayjob.yaml"
CRD = Path(__file__).resolve().parents[1] / "data" / "kuberay" / "ray.io_rayjobs.yaml"
CONFIGS = {"train": TrainConfig, "tune": TuneConfig}
INT_RANGES = {"int32": (-(2**31), 2**31 - 1), "int64": (-(2**63), 2**63 - 1)}
SUBMISSION_MODES = {"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"}  # KubeRay's RayJob modes
MAX_RAYJOB_NAME = 47  # KubeRay: 53 for a RayCluster name, less the 6 characters the RayJob's cluster appends


# ---------------------------------------------------------------- the CRD's schema, as the API server reads it


def _json_schema(node: dict) -> dict:
    """A Kubernetes structural schema as a draft-4 JSON Schema with Kubernetes' semantics made explicit."""
    out = dict(node)
    if "properties" in node:
        out["properties"] = {name: _json_schema(sub) for name, sub in node["properties"].items()}
        if "additionalProperties" not in node and not node.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False  # unknown fields: pruned by the server, an error for kubectl
    if isinstance(node.get("additionalProperties"), dict):
        out["additionalProperties"] = _json_schema(node["additionalProperties"])
    if "items" in node:
        out["items"] = _json_schema(node["items"])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in node:
            out[key] = [_json_schema(sub) for sub in node[key]]
    if node.get("x-kubernetes-int-or-string") and "type" not in node and "anyOf" not in node:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]  # the pattern beside it applies to strings only
    if node.get("nullable") and "type" in node:
        out["type"] = [node["type"], "null"]
    return out


def _list_type(validator, list_type: str, instance: Any, schema: dict):
    """x-kubernetes-list-type: a set holds no duplicates; a map holds one item per value of its keys."""
    if not validator.is_type(instance, "array"):
        return
    if list_type == "set":
        for index, item in enumerate(instance):
            if item in instance[:index]:
                yield jsonschema.ValidationError(f"duplicate entry {item!r} in a list of type set")
    elif list_type == "map":
        keys = schema.get("x-kubernetes-list-map-keys", [])
        fields = schema.get("items", {}).get("properties", {})
        seen: set[str] = set()
        for item in instance:
            if not isinstance(item, dict):
                continue
            key = {name: item.get(name, fields.get(name, {}).get("default")) for name in keys}
            text = json.dumps(key, sort_keys=True)
            if text in seen:
                yield jsonschema.ValidationError(f"duplicate entry for key {key} in a list of type map")
            seen.add(text)


def _format_checker() -> jsonschema.FormatChecker:
    checker = jsonschema.FormatChecker(formats=())
    for name, (low, high) in INT_RANGES.items():
        checker.checks(name)(lambda value, low=low, high=high: not isinstance(value, int) or low <= value <= high)
    return checker


KubernetesValidator = jsonschema.validators.extend(
    jsonschema.Draft4Validator, {"x-kubernetes-list-type": _list_type}
)  # OpenAPI v3.0 schemas are draft-4 style (boolean exclusiveMinimum ...)


@functools.cache
def _crd() -> dict:
    return yaml.load(CRD.read_text(encoding="utf-8"), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


@functools.cache
def _storage_version() -> dict:
    versions = [v for v in _crd()["spec"]["versions"] if v.get("served") and v.get("storage")]
    assert len(versions) == 1, "a CRD has exactly one storage version"
    return versions[0]


@functools.cache
def _validator() -> jsonschema.protocols.Validator:
    schema = _json_schema(_storage_version()["schema"]["openAPIV3Schema"])
    KubernetesValidator.check_schema(schema)
    return KubernetesValidator(schema, format_checker=_format_checker())


def schema_errors(document: dict) -> list[str]:
    """Every way ``document`` breaks the CRD's schema, as 'path: message' lines (empty: valid)."""
    errors = sorted(_validator().iter_errors(document), key=lambda e: list(map(str, e.absolute_path)))
    return [f"{'.'.join(map(str, error.absolute_path)) or '<root>'}: {error.message}" for error in errors]


def _cel_guarded_paths(node: dict, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Where the schema has CEL rules (x-kubernetes-validations), which this validator does not evaluate."""
    found = [path] if "x-kubernetes-validations" in node else []
    for name, sub in node.get("properties", {}).items():
        found += _cel_guarded_paths(sub, (*path, name))
    if "items" in node:
        found += _cel_guarded_paths(node["items"], (*path, "[]"))
    if isinstance(node.get("additionalProperties"), dict):
        found += _cel_guarded_paths(node["additionalProperties"], (*path, "{}"))
    return found


def _present(value: Any, path: tuple[str, ...]) -> bool:
    if not path:
        return True
    head, rest = path[0], path[1:]
    if head == "[]":
        return isinstance(value, list) and any(_present(item, rest) for item in value)
    if head == "{}":
        return isinstance(value, dict) and any(_present(item, rest) for item in value.values())
    return isinstance(value, dict) and head in value and _present(value[head], rest)


# ---------------------------------------------------------------- the manifest


def _load_manifest() -> dict:
    documents = [doc for doc in yaml.safe_load_all(MANIFEST.read_text(encoding="utf-8")) if doc is not None]
    assert len(documents) == 1, "jobs/rayjob.yaml holds the RayJob only (the storage claim outlives it)"
    return documents[0]


@pytest.fixture
def rayjob() -> dict:
    return _load_manifest()


def _cluster(rayjob: dict) -> dict:
    return rayjob["spec"]["rayClusterSpec"]


def _groups(rayjob: dict) -> dict[str, dict]:
    """The head group and each worker group, by name."""
    cluster = _cluster(rayjob)
    return {"head": cluster["headGroupSpec"], **{g["groupName"]: g for g in cluster["workerGroupSpecs"]}}


def _ray_container(group: dict) -> dict:
    return group["template"]["spec"]["containers"][0]  # KubeRay: the Ray container is the first


def _entrypoint(rayjob: dict) -> tuple[Path, str, list[str]]:
    """(the jobs/ script, the tl-ray command it runs, its options) from the RayJob's entrypoint."""
    argv = shlex.split(rayjob["spec"]["entrypoint"])
    assert argv[0] == "python", f"the entrypoint runs a jobs/ script with the runtime env's python: {argv}"
    script = (ROOT / argv[1]).resolve()
    match = re.search(r'main\(\["([a-z-]+)"', script.read_text(encoding="utf-8")) if script.is_file() else None
    assert match, f"{argv[1]} is not a jobs/ script that runs a tl-ray command"
    return script, match.group(1), argv[2:]


def _parse(command: str, options: list[str]):
    """The config `tl-ray COMMAND OPTIONS` runs with: the CLI's parser, then the merge and checks cli.main uses."""
    try:
        namespace = cli.build_parser().parse_args([command, *options])
    except SystemExit as error:
        raise AssertionError(f"tl-ray {command} rejects {options} (see stderr)") from error
    fields = {field.name for field in dataclasses.fields(CONFIGS[command])}  # not command, --config ...
    values = {key: value for key, value in vars(namespace).items() if key in fields}
    return merge(CONFIGS[command], None, values).validate()


@pytest.fixture
def options(rayjob):
    _, command, argv = _entrypoint(rayjob)
    return _parse(command, argv)


# ---------------------------------------------------------------- schema validation


def test_the_crd_is_kuberays_rayjob_v1():
    crd = _crd()
    assert crd["kind"] == "CustomResourceDefinition"
    assert crd["spec"]["group"] == "ray.io" and crd["spec"]["names"]["kind"] == "RayJob"
    assert _storage_version()["name"] == "v1"


def test_rayjob_yaml_passes_the_crd_schema(rayjob):
    assert rayjob["apiVersion"] == f"{_crd()['spec']['group']}/{_storage_version()['name']}" == "ray.io/v1"
    assert rayjob["kind"] == "RayJob"
    assert schema_errors(rayjob) == []


def test_rayjob_yaml_sets_no_field_guarded_by_an_unchecked_cel_rule(rayjob):
    guarded = _cel_guarded_paths(_storage_version()["schema"]["openAPIV3Schema"])
    assert guarded, "the CRD has CEL rules; if it has none now, this test has nothing to check"
    assert [".".join(path) for path in guarded if _present(rayjob, path)] == []


def _parent(doc: dict, path: tuple) -> Any:
    node = doc
    for part in path[:-1]:
        node = node[part]
    return node


def _set(path: tuple, value: Any):
    return lambda doc: _parent(doc, path).__setitem__(path[-1], value)


def _rename(path: tuple, new_name: str):
    return lambda doc: _parent(doc, path).__setitem__(new_name, _parent(doc, path).pop(path[-1]))


HEAD = ("spec", "rayClusterSpec", "headGroupSpec")
WORKER = ("spec", "rayClusterSpec", "workerGroupSpecs", 0)
WORKER_CONTAINER = (*WORKER, "template", "spec", "containers", 0)
WORKER_GPUS = (*WORKER_CONTAINER, "resources", "limits", "nvidia.com/gpu")


def _duplicate_mount(doc: dict) -> None:
    mounts = _parent(doc, (*WORKER_CONTAINER, "volumeMounts", 0))
    mounts.append({"name": "other", "mountPath": mounts[0]["mountPath"]})


BROKEN = {
    "misspelled spec field": (_rename(("spec", "shutdownAfterJobFinishes"), "shutdownAfterJobFinish"), "shutdownAfter"),
    "misspelled container field": (_rename((*WORKER_CONTAINER, "volumeMounts"), "volumeMount"), "volumeMount"),
    "rayStartParams value not a string": (_set((*HEAD, "rayStartParams", "num-cpus"), 0), "num-cpus"),
    "GPU quantity not a quantity": (_set(WORKER_GPUS, "one"), "one"),
    "TTL as a string": (_set(("spec", "ttlSecondsAfterFinished"), "600"), "ttlSecondsAfterFinished"),
    "backoffLimit beyond int32": (_set(("spec", "backoffLimit"), 2**31), "backoffLimit"),
    "unknown auth mode": (_set(("spec", "rayClusterSpec", "authOptions", "mode"), "tokens"), "tokens"),
    "worker group without groupName": (lambda doc: _parent(doc, (*WORKER, "groupName")).pop("groupName"), "groupName"),
    "two mounts at one path": (_duplicate_mount, "mountPath"),
}


@pytest.mark.parametrize("name", list(BROKEN))
def test_a_broken_copy_of_rayjob_yaml_is_rejected(name):
    break_it, expected = BROKEN[name]
    broken = copy.deepcopy(_load_manifest())
    break_it(broken)
    errors = schema_errors(broken)
    assert errors, f"{name}: the schema accepted it"
    assert any(expected in error for error in errors), errors


@pytest.mark.parametrize(
    ("quantity", "valid"),
    [(1, True), ("1", True), ("500m", True), ("28Gi", True), ("one", False), (1.5, False), (True, False)],
)
def test_quantities_are_an_int_or_a_string(quantity, valid):
    doc = copy.deepcopy(_load_manifest())
    _set((*WORKER_CONTAINER, "resources", "requests", "cpu"), quantity)(doc)
    assert (schema_errors(doc) == []) is valid


# ---------------------------------------------------------------- what the manifest means for tl-ray


def test_the_entrypoint_runs_a_jobs_script_with_options_tl_ray_accepts(rayjob, options):
    script, command, _ = _entrypoint(rayjob)
    assert script.parent == ROOT / "jobs" and script.is_file()
    assert command in CONFIGS
    assert options.gpu is True, "the job trains on the GPU worker group: --gpu"
    assert options.name, "a fixed --name: a rerun of the RayJob resumes the same sweep"


def test_an_option_tl_ray_does_not_accept_would_be_caught(rayjob):
    _, command, argv = _entrypoint(rayjob)
    with pytest.raises(AssertionError, match="rejects"):
        _parse(command, [*argv, "--no-such-option", "1"])


def test_the_worker_group_requests_the_gpus_the_job_uses(rayjob, options):
    head, *workers = _groups(rayjob).values()
    gpus = 0
    for group in workers:
        resources = _ray_container(group)["resources"]
        per_pod = int(resources["limits"]["nvidia.com/gpu"])
        assert per_pod >= 1, f"worker group {group['groupName']} asks for no GPU"
        assert int(resources["requests"].get("nvidia.com/gpu", per_pod)) == per_pod, "GPU requests equal limits"
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        gpus += per_pod * group["replicas"]
    trials_at_once = getattr(options, "max_concurrent", None) or 1
    assert options.num_workers * trials_at_once <= gpus, "the cluster has a GPU for every training worker"
    head_resources = _ray_container(head)["resources"]
    assert not any("gpu" in name for part in head_resources.values() for name in part), "the head needs no GPU"
    assert head["rayStartParams"].get("num-cpus") == "0", "like cluster.yaml, the head runs no tasks"


def test_storage_is_one_shared_claim_at_the_same_path_on_every_pod(rayjob, options):
    storage = options.storage
    assert "://" not in storage, "this manifest uses the shared claim, not object storage"
    claims = {}
    for name, group in _groups(rayjob).items():
        volumes = {volume["name"]: volume for volume in group["template"]["spec"].get("volumes", [])}
        mounts = [
            mount
            for mount in _ray_container(group).get("volumeMounts", [])
            if storage == mount["mountPath"] or storage.startswith(mount["mountPath"].rstrip("/") + "/")
        ]
        assert len(mounts) == 1, f"{name}: --storage {storage} is on no mounted volume"
        mount = mounts[0]
        assert not mount.get("readOnly") and not mount.get("subPath"), f"{name}: {mount}"
        claim = volumes[mount["name"]].get("persistentVolumeClaim")
        assert claim and not claim.get("readOnly"), f"{name}: --storage must be on a writable PersistentVolumeClaim"
        claims[name] = (claim["claimName"], mount["mountPath"])
    assert len(set(claims.values())) == 1, f"head and workers must mount the same claim at the same path: {claims}"
    mount_path = next(iter(claims.values()))[1]
    if "://" not in options.data:
        assert options.data.startswith(mount_path.rstrip("/") + "/"), "a local --data must be on the shared claim"


def test_token_authentication_is_on_and_nothing_is_exposed(rayjob):
    cluster = _cluster(rayjob)
    auth = cluster["authOptions"]
    assert auth["mode"] == "token"
    assert not auth.get("enableK8sTokenAuth"), "KubeRay supports Kubernetes-delegated auth for RayClusters only"
    assert Version(cluster["rayVersion"]) >= Version("2.52.0"), "Ray token authentication needs Ray 2.52+"
    for name, group in _groups(rayjob).items():
        env = {var["name"]: var for var in _ray_container(group).get("env", [])}
        assert "RAY_AUTH_TOKEN" not in env and "RAY_AUTH_MODE" not in env, f"{name}: the operator sets these"
    head = cluster["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP" and not head.get("enableIngress")


def test_images_and_ray_version_are_the_projects(rayjob):
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    ray_requirement = next(Requirement(r) for r in project["dependencies"] if Requirement(r).name == "ray")
    ray_version = _cluster(rayjob)["rayVersion"]
    assert ray_requirement.specifier.contains(ray_version), f"rayVersion {ray_version} vs {ray_requirement}"
    assert ray_version == importlib.metadata.version("ray"), "the cluster runs the Ray the tests run"
    for name, group in _groups(rayjob).items():
        image = _ray_container(group)["image"]
        match = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py(\d)(\d+)-(gpu|cu\d+)", image)
        assert match, f"{name}: {image} is not a rayproject/ray GPU image"
        assert match.group(1) == ray_version, f"{name}: {image} is not Ray {ray_version}"
        python = f"{match.group(2)}.{match.group(3)}"
        assert SpecifierSet(project["requires-python"]).contains(python), f"{name}: Python {python}"
    assert len({_ray_container(group)["image"] for group in _groups(rayjob).values()}) == 1


def test_the_runtime_env_is_valid_and_installs_tl_ray_from_the_working_dir(rayjob):
    from ray.runtime_env import RuntimeEnv  # Ray's own parser; it starts nothing

    env = yaml.safe_load(rayjob["spec"]["runtimeEnvYAML"])
    assert isinstance(env, dict) and set(env) <= RuntimeEnv.known_fields
    RuntimeEnv(**env)  # raises on an invalid working_dir URI, pip spec or env_vars
    working_dir = env["working_dir"]
    assert "://" in working_dir and working_dir.endswith(".zip"), "a submitter pod cannot upload a local folder"
    packages = env["pip"]["packages"] if isinstance(env["pip"], dict) else env["pip"]
    tl_ray = [Requirement(spec) for spec in packages if Requirement(spec).name == "tl-ray"]
    assert [requirement.url for requirement in tl_ray] == [working_dir], "tl-ray and jobs/ from the same archive"
    submitted = yaml.safe_load((ROOT / "jobs" / "runtime_env.yaml").read_text(encoding="utf-8"))["env_vars"]
    assert submitted.items() <= env["env_vars"].items(), "the env_vars `ray job submit` gets from jobs/runtime_env.yaml"


def test_the_job_lifecycle_passes_kuberays_own_checks(rayjob):
    spec = rayjob["spec"]
    name = rayjob["metadata"]["name"]
    assert len(name) <= MAX_RAYJOB_NAME and re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name), name
    assert spec.get("submissionMode", "K8sJobMode") in SUBMISSION_MODES
    assert spec["shutdownAfterJobFinishes"] is True, "the GPUs are released when the job ends"
    assert spec.get("ttlSecondsAfterFinished", 0) >= 0
    assert spec.get("backoffLimit", 0) >= 1, "a lost head pod is retried on a new cluster, resuming from storage"
    assert "clusterSelector" not in spec, "the RayJob brings its own cluster"

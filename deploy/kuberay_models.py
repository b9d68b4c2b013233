"""Typed models of the KubeRay ray.io/v1 objects medtune deploys: RayCluster, RayJob, RayService.

    from kuberay_models import validate_kuberay
    problems = validate_kuberay(obj)       # [] when the object is valid

No package on PyPI carries the KubeRay CRD schemas (they live in the kuberay-operator Helm
chart), so these pydantic models were written by hand from the ray.io/v1 API types of KubeRay
1.7.0 (ray-operator/apis/ray/v1/*_types.go). Every field of RayClusterSpec, HeadGroupSpec,
WorkerGroupSpec, RayJobSpec and RayServiceSpec is declared with its type and `extra="forbid"`,
so a misspelt or unknown field fails; sub-objects this project does not use (autoscalerOptions,
gcsFaultToleranceOptions, deletionStrategy, ...) are accepted as mappings without deeper checks.
Pod templates embedded in these objects are core/v1 PodTemplateSpecs: deploy_check.py validates
them against the Kubernetes JSON schema. On top of the types, the model validators repeat the
admission rules of KubeRay's own validation (controllers/ray/utils/validation.go) that can apply
to this project's objects: name lengths, required min/max replicas, rayStartParams vs resources,
token auth needing Ray >= 2.52, clusterSelector vs suspend, upgrade strategy values, and so on.
"""

from __future__ import annotations

import re
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
# KubeRay: 63 minus the longest suffix it appends to service names ("-serve-svc").
MAX_RAYCLUSTER_NAME = 53
MAX_RAYJOB_NAME = MAX_RAYCLUSTER_NAME - 6
MAX_RAYSERVICE_NAME = MAX_RAYCLUSTER_NAME - 6
RAY_JOB_CLUSTER_SELECTOR_KEY = "ray.io/cluster"
MIN_RAY_FOR_TOKEN_AUTH = (2, 52, 0)


class Strict(BaseModel):
    # No coercion either: replicas: "2" or num-gpus: 8 (a number where KubeRay wants a string) fail
    # here as they fail against the CRD.
    model_config = ConfigDict(extra="forbid", strict=True)


class ObjectMeta(BaseModel):
    # Kubernetes metadata: the fields a manifest may carry; the API server fills the rest.
    model_config = ConfigDict(extra="forbid")
    name: str
    namespace: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


class PodTemplate(BaseModel):
    # Checked in full against the Kubernetes PodTemplateSpec schema by deploy_check.py; here only
    # what KubeRay's admission needs.
    model_config = ConfigDict(extra="allow")
    metadata: dict[str, Any] | None = None
    spec: dict[str, Any]

    @field_validator("spec")
    @classmethod
    def _has_container(cls, spec: dict) -> dict:
        if not spec.get("containers"):
            raise ValueError("the pod template needs at least one container (the Ray container comes first)")
        return spec


def _check_group(name: str, ray_start_params: dict[str, str], resources: dict[str, str] | None,
                 labels: dict[str, str] | None) -> None:
    ray_resources = [k for k in ("num-cpus", "num-gpus", "memory", "resources") if ray_start_params.get(k)]
    if ray_resources and resources:
        raise ValueError(f"{name} group: resources are set both in rayStartParams ({', '.join(ray_resources)}) "
                         "and in `resources`; use only one")
    if "labels" in ray_start_params:
        raise ValueError(f"{name} group: rayStartParams['labels'] is not supported; use the group's `labels` field")


class HeadGroupSpec(Strict):
    template: PodTemplate
    headService: dict[str, Any] | None = None
    enableIngress: bool | None = None
    ingressOptions: dict[str, Any] | None = None
    resources: dict[str, str] | None = None
    labels: dict[str, str] | None = None
    rayStartParams: dict[str, str]
    serviceType: Literal["ClusterIP", "NodePort", "LoadBalancer", "ExternalName"] | None = None

    @model_validator(mode="after")
    def _rules(self) -> "HeadGroupSpec":
        _check_group("head", self.rayStartParams, self.resources, self.labels)
        return self


class WorkerGroupSpec(Strict):
    suspend: bool | None = None
    groupName: str
    replicas: int | None = Field(default=None, ge=0)
    minReplicas: int | None = Field(default=None, ge=0)
    maxReplicas: int | None = Field(default=None, ge=0)
    idleTimeoutSeconds: int | None = None
    priority: int | None = None
    resources: dict[str, str] | None = None
    labels: dict[str, str] | None = None
    rayStartParams: dict[str, str]
    template: PodTemplate
    scaleStrategy: dict[str, Any] | None = None
    numOfHosts: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _rules(self) -> "WorkerGroupSpec":
        _check_group(self.groupName, self.rayStartParams, self.resources, self.labels)
        if self.minReplicas is not None and self.maxReplicas is not None and self.minReplicas > self.maxReplicas:
            raise ValueError(f"worker group {self.groupName}: minReplicas {self.minReplicas} > maxReplicas {self.maxReplicas}")
        if self.replicas is not None and self.minReplicas is not None and self.maxReplicas is not None \
                and not self.minReplicas <= self.replicas <= self.maxReplicas:
            raise ValueError(f"worker group {self.groupName}: replicas {self.replicas} outside "
                             f"[minReplicas {self.minReplicas}, maxReplicas {self.maxReplicas}]")
        return self


class AuthOptions(Strict):
    enableK8sTokenAuth: bool | None = None
    secretName: str | None = None
    mode: Literal["disabled", "token"] | None = None


class RayClusterUpgradeStrategy(Strict):
    type: Literal["Recreate", "None"] | None = None


class RayClusterSpec(Strict):
    upgradeStrategy: RayClusterUpgradeStrategy | None = None
    authOptions: AuthOptions | None = None
    suspend: bool | None = None
    managedBy: Literal["ray.io/kuberay-operator", "kueue.x-k8s.io/multikueue"] | None = None
    autoscalerOptions: dict[str, Any] | None = None
    headServiceAnnotations: dict[str, str] | None = None
    enableInTreeAutoscaling: bool | None = None
    gcsFaultToleranceOptions: dict[str, Any] | None = None
    historyServerOptions: dict[str, Any] | None = None
    networkPolicy: dict[str, Any] | None = None
    tlsOptions: dict[str, Any] | None = None
    headGroupSpec: HeadGroupSpec
    rayVersion: str | None = None
    workerGroupSpecs: list[WorkerGroupSpec] = Field(default_factory=list)

    @model_validator(mode="after")
    def _rules(self) -> "RayClusterSpec":
        names = [g.groupName for g in self.workerGroupSpecs]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"worker group names must be unique; repeated: {duplicates}")
        if not self.enableInTreeAutoscaling:
            for group in self.workerGroupSpecs:
                if group.minReplicas is None or group.maxReplicas is None:
                    raise ValueError(f"worker group {group.groupName} must set both minReplicas and maxReplicas "
                                     "when autoscaling is disabled")
        auth = self.authOptions
        if auth is not None and auth.mode == "token":
            if not self.rayVersion:
                raise ValueError("authOptions.mode is 'token' but rayVersion is not set (Ray >= 2.52.0 is required)")
            if _version(self.rayVersion) < MIN_RAY_FOR_TOKEN_AUTH:
                raise ValueError(f"authOptions.mode is 'token' but rayVersion {self.rayVersion} < 2.52.0")
        elif auth is not None and auth.enableK8sTokenAuth:
            raise ValueError("authOptions.enableK8sTokenAuth needs authOptions.mode 'token'")
        return self


def _version(text: str) -> tuple[int, ...]:
    match = re.match(r"^v?(\d+)\.(\d+)(?:\.(\d+))?", text)
    if not match:
        raise ValueError(f"rayVersion {text!r} is not a version such as 2.60.0")
    return tuple(int(x or 0) for x in match.groups())


def _name_rule(name: str, kind: str, limit: int) -> None:
    if len(name) > limit:
        raise ValueError(f"{kind} name {name!r} is longer than {limit} characters")
    if not DNS1035.match(name):
        raise ValueError(f"{kind} name {name!r} is not a DNS-1035 label (lower-case letters, digits, '-', starting with a letter)")


class RayCluster(Strict):
    apiVersion: Literal["ray.io/v1"]
    kind: Literal["RayCluster"]
    metadata: ObjectMeta
    spec: RayClusterSpec

    @model_validator(mode="after")
    def _rules(self) -> "RayCluster":
        _name_rule(self.metadata.name, "RayCluster", MAX_RAYCLUSTER_NAME)
        return self


class RayJobSpec(Strict):
    activeDeadlineSeconds: int | None = Field(default=None, gt=0)
    backoffLimit: int | None = Field(default=None, ge=0)
    rayClusterSpec: RayClusterSpec | None = None
    submitterPodTemplate: PodTemplate | None = None
    metadata: dict[str, str] | None = None
    clusterSelector: dict[str, str] | None = None
    submitterConfig: dict[str, Any] | None = None
    managedBy: Literal["ray.io/kuberay-operator", "kueue.x-k8s.io/multikueue"] | None = None
    deletionStrategy: dict[str, Any] | None = None
    entrypoint: str | None = None
    runtimeEnvYAML: str | None = None
    jobId: str | None = None
    submissionMode: Literal["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"] | None = None
    entrypointResources: str | None = None
    entrypointNumCpus: float | None = None
    entrypointNumGpus: float | None = None
    ttlSecondsAfterFinished: int | None = Field(default=None, ge=0)
    preRunningDeadlineSeconds: int | None = Field(default=None, gt=0)
    shutdownAfterJobFinishes: bool | None = None
    suspend: bool | None = None

    @model_validator(mode="after")
    def _rules(self) -> "RayJobSpec":
        selector_mode = bool(self.clusterSelector)
        if self.suspend and not self.shutdownAfterJobFinishes:
            raise ValueError("a RayJob with shutdownAfterJobFinishes false cannot be suspended")
        if self.suspend and selector_mode:
            raise ValueError("clusterSelector mode does not support suspend")
        if self.rayClusterSpec is None and not selector_mode:
            raise ValueError("one of rayClusterSpec or clusterSelector must be set")
        if self.rayClusterSpec is not None and selector_mode:
            raise ValueError("set rayClusterSpec or clusterSelector, not both")
        if selector_mode:
            if not (self.clusterSelector or {}).get(RAY_JOB_CLUSTER_SELECTOR_KEY):
                raise ValueError(f"clusterSelector must name the cluster under {RAY_JOB_CLUSTER_SELECTOR_KEY!r}")
            if self.submissionMode == "SidecarMode":
                raise ValueError("clusterSelector is not supported in SidecarMode")
            if self.backoffLimit:
                raise ValueError("backoffLimit is incompatible with clusterSelector mode")
        if self.submissionMode != "InteractiveMode" and not (self.entrypoint or "").strip():
            raise ValueError("entrypoint is required (except in InteractiveMode)")
        if self.runtimeEnvYAML:
            try:
                env = yaml.safe_load(self.runtimeEnvYAML)
            except yaml.YAMLError as err:
                raise ValueError(f"runtimeEnvYAML is not valid YAML: {err}") from None
            if not isinstance(env, dict):
                raise ValueError("runtimeEnvYAML must be a YAML mapping")
        return self


class RayJob(Strict):
    apiVersion: Literal["ray.io/v1"]
    kind: Literal["RayJob"]
    metadata: ObjectMeta
    spec: RayJobSpec

    @model_validator(mode="after")
    def _rules(self) -> "RayJob":
        _name_rule(self.metadata.name, "RayJob", MAX_RAYJOB_NAME)
        return self


class ClusterUpgradeOptions(Strict):
    maxSurgePercent: int | None = None
    stepSizePercent: int
    intervalSeconds: int
    gatewayClassName: str


class RayServiceUpgradeStrategy(Strict):
    type: Literal["NewCluster", "NewClusterWithIncrementalUpgrade", "None"] | None = None
    clusterUpgradeOptions: ClusterUpgradeOptions | None = None


class RayServiceSpec(Strict):
    rayClusterDeletionDelaySeconds: int | None = Field(default=None, ge=0)
    serviceUnhealthySecondThreshold: int | None = None
    deploymentUnhealthySecondThreshold: int | None = None
    serveService: dict[str, Any] | None = None
    upgradeStrategy: RayServiceUpgradeStrategy | None = None
    managedBy: Literal["ray.io/kuberay-operator", "kueue.x-k8s.io/multikueue"] | None = None
    serveConfigV2: str | None = None
    rayClusterConfig: RayClusterSpec
    excludeHeadPodFromServeSvc: bool | None = None
    suspend: bool | None = None

    @model_validator(mode="after")
    def _rules(self) -> "RayServiceSpec":
        cluster = self.rayClusterConfig
        if cluster.authOptions is not None and cluster.authOptions.enableK8sTokenAuth:
            raise ValueError("K8s token auth is not supported for RayService")
        if (cluster.headGroupSpec.headService or {}).get("metadata", {}).get("name"):
            raise ValueError("rayClusterConfig.headGroupSpec.headService.metadata.name must not be set")
        if cluster.upgradeStrategy is not None and cluster.upgradeStrategy.type is not None:
            raise ValueError("rayClusterConfig.upgradeStrategy cannot be set on a RayService's cluster")
        strategy = self.upgradeStrategy
        if strategy is not None and strategy.type == "NewClusterWithIncrementalUpgrade":
            if not cluster.enableInTreeAutoscaling:
                raise ValueError("NewClusterWithIncrementalUpgrade needs the Ray autoscaler (enableInTreeAutoscaling)")
            if strategy.clusterUpgradeOptions is None:
                raise ValueError("NewClusterWithIncrementalUpgrade needs clusterUpgradeOptions")
        return self


class RayService(Strict):
    apiVersion: Literal["ray.io/v1"]
    kind: Literal["RayService"]
    metadata: ObjectMeta
    spec: RayServiceSpec

    @model_validator(mode="after")
    def _rules(self) -> "RayService":
        _name_rule(self.metadata.name, "RayService", MAX_RAYSERVICE_NAME)
        return self


MODELS: dict[str, type[BaseModel]] = {"RayCluster": RayCluster, "RayJob": RayJob, "RayService": RayService}


def validate_kuberay(obj: dict) -> list[str]:
    """Problems with a ray.io object ('path: message' each); [] when it validates."""
    model = MODELS.get(obj.get("kind", ""))
    if model is None or not str(obj.get("apiVersion", "")).startswith("ray.io/"):
        return [f"no KubeRay model for {obj.get('apiVersion')}/{obj.get('kind')}"]
    try:
        model.model_validate(obj)
    except ValidationError as err:
        return [f"{'.'.join(str(p) for p in e['loc']) or '(object)'}: {e['msg']}" for e in err.errors()]
    return []


def pod_templates(obj: dict) -> list[tuple[str, dict]]:
    """(path, PodTemplateSpec) for every pod template inside a ray.io object."""
    spec = obj.get("spec") or {}
    found: list[tuple[str, dict]] = []

    def cluster(prefix: str, cspec: dict | None) -> None:
        if not cspec:
            return
        head = cspec.get("headGroupSpec") or {}
        if "template" in head:
            found.append((f"{prefix}.headGroupSpec.template", head["template"]))
        for group in cspec.get("workerGroupSpecs") or []:
            if "template" in group:
                found.append((f"{prefix}.workerGroupSpecs[{group.get('groupName')}].template", group["template"]))

    kind = obj.get("kind")
    if kind == "RayCluster":
        cluster("spec", spec)
    elif kind == "RayJob":
        cluster("spec.rayClusterSpec", spec.get("rayClusterSpec"))
        if spec.get("submitterPodTemplate"):
            found.append(("spec.submitterPodTemplate", spec["submitterPodTemplate"]))
    elif kind == "RayService":
        cluster("spec.rayClusterConfig", spec.get("rayClusterConfig"))
    return found

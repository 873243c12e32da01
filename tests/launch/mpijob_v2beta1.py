"""Checking a manifest against the Kubeflow MPI Operator's MPIJob v2beta1 API: its own fields by a JSON schema
written here from the operator's API types (pkg/apis/kubeflow/v2beta1/types.go as of v0.6: every field, its type and
enumeration; unknown fields refused, as the API server's structural schema prunes them), and each replica's pod
template by kubernetes-validate against the Kubernetes API's own OpenAPI schemas (strict: unknown fields
refused)."""

from __future__ import annotations

from typing import Any

import jsonschema
import kubernetes_validate

INT32 = {"type": "integer", "minimum": -(2**31), "maximum": 2**31 - 1}

REPLICA = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "replicas": INT32,
        "template": {"type": "object"},  # a PodTemplateSpec: see pod_template_errors
        "restartPolicy": {"enum": ["Always", "OnFailure", "Never", "ExitCode"]},
    },
}

SCHEDULING_POLICY = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "minAvailable": INT32,
        "queue": {"type": "string"},
        "minResources": {"type": "object", "additionalProperties": {"type": ["string", "number"]}},
        "priorityClass": {"type": "string"},
        "scheduleTimeoutSeconds": INT32,
    },
}

RUN_POLICY = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "cleanPodPolicy": {"enum": ["None", "All", "Running"]},
        "ttlSecondsAfterFinished": INT32,
        "activeDeadlineSeconds": {"type": "integer", "minimum": 1},
        "backoffLimit": INT32,
        "schedulingPolicy": SCHEDULING_POLICY,
        "suspend": {"type": "boolean"},
        "managedBy": {"enum": ["kubeflow.org/mpi-operator", "kueue.x-k8s.io/multikueue"]},
    },
}

MPIJOB = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "kubeflow.org/v2beta1"},
        "kind": {"const": "MPIJob"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object",
            "required": ["mpiReplicaSpecs"],
            "additionalProperties": False,
            "properties": {
                "slotsPerWorker": INT32,
                "runLauncherAsWorker": {"type": "boolean"},
                "runPolicy": RUN_POLICY,
                "mpiReplicaSpecs": {
                    "type": "object",
                    "required": ["Launcher"],
                    "additionalProperties": False,
                    "properties": {"Launcher": REPLICA, "Worker": REPLICA},
                },
                "sshAuthMountPath": {"type": "string"},
                "launcherCreationPolicy": {"enum": ["AtStartup", "WaitForWorkersReady"]},
                "mpiImplementation": {"enum": ["OpenMPI", "Intel", "MPICH"]},
            },
        },
    },
}


def mpijob_errors(job: dict[str, Any]) -> list[str]:
    """What makes `job` an invalid MPIJob v2beta1, each as 'path: message' (none: valid)."""
    errors = [f"{'.'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}"
              for e in jsonschema.Draft202012Validator(MPIJOB).iter_errors(job)]
    for role, replica in job.get("spec", {}).get("mpiReplicaSpecs", {}).items():
        errors += [f"spec.mpiReplicaSpecs.{role}.template: {e}" for e in pod_template_errors(replica.get("template"))]
    return errors


def pod_template_errors(template: Any) -> list[str]:
    """A pod template checked as the Pod it makes, against the newest Kubernetes API kubernetes-validate has."""
    if not isinstance(template, dict) or "spec" not in template:
        return ["a pod template with a spec is required"]
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "replica", **template.get("metadata", {})},
           "spec": template["spec"]}
    try:
        kubernetes_validate.validate(pod, kubernetes_validate.latest_version(), strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{'.'.join(map(str, e.path))}: {e.message}"]
    return []

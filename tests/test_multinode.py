"""Multi-node stage 2 on Kubeflow Trainer: the TrainJob template and its renderings checked
against the Trainer's published API models (PyPI kubeflow-trainer-api), and the node
entrypoint run as two "nodes" on loopback (torchrun, c10d rendezvous, gloo) with the data,
the stage-1 model, the checkpoint and the result moving through a local S3 server: the
weights of one process within 1e-5 (as tests/test_ddp.py: fixtures in conftest.py, helpers.py)."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import yaml
from helpers import REPO, assert_same_training, child_env, ddp_params as params, free_port, one_thread

from cladapter_core.errors import CLAdapterError, ParamsError
from cladapter_core.training import train
from components import multinode, runtime

pytest.importorskip("kubeflow_trainer_api")


def test_template_and_renderings_are_valid_trainjobs():
    template = yaml.safe_load(multinode.TEMPLATE.read_text())
    assert multinode.validate(template) == []
    doc = multinode.render({"params": {"seed": 0}, "stage": 2}, name=multinode.job_name("Run_42/x"),
                           namespace="team-a", image="registry.example/cladapter:abc123", nodes=16,
                           gpus_per_node=4)
    assert multinode.validate(doc) == []
    trainer = doc["spec"]["trainer"]
    assert doc["metadata"] == {**template["metadata"], "name": "cladapter-stage2-run-42-x", "namespace": "team-a"}
    assert (trainer["numNodes"], trainer["numProcPerNode"]) == (16, 4)
    assert trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == "4"
    assert trainer["command"] == ["python", "-m", "components.multinode", "node"]
    assert json.loads(trainer["args"][1]) == {"params": {"seed": 0}, "stage": 2}
    assert len(multinode.job_name("x" * 200)) <= 63
    with pytest.raises(ParamsError, match="2 or more nodes"):
        multinode.render({}, name="a", namespace="b", image="c", nodes=1, gpus_per_node=8)

    # what the validation catches: unknown keys at any depth, wrong types, missing fields, names
    bad = copy.deepcopy(doc)
    bad["spec"]["trainer"]["numNode"] = 3
    bad["spec"]["trainer"]["numProcPerNode"] = "4"
    pod = bad["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
    pod["template"]["spec"]["template"]["spec"]["containers"][0]["volumeMount"] = []
    del bad["spec"]["runtimeRef"]["name"]
    bad["metadata"]["name"] = "Stage_2"
    problems = "\n".join(multinode.validate(bad))
    assert "spec.trainer.numNode: not a field of TrainerV1alpha1Trainer" in problems
    assert "containers[0].volumeMount: not a field of TrainerV1alpha1ContainerPatch" in problems
    assert "not a DNS-1035 label" in problems
    assert "valid integer" in problems or "name" in problems


def test_trainjob_pods_are_let_in_by_the_mlflow_policy_and_keep_istio_out():
    """Rank 0 logs its epochs to MLflow: the nodes' pods carry the labels the server's
    NetworkPolicy admits from the runs' namespaces (as the pipeline's steps do), and opt
    out of Istio's sidecar, which profile namespaces of multi-user Kubeflow inject."""
    from pipelines import cladapter_pipeline as kp
    from infra_helpers import policy_allows
    doc = multinode.render({}, name="cladapter-stage2-x", namespace="kubeflow-user-example-com", image="i:1",
                           nodes=2, gpus_per_node=1)
    (job,) = doc["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    meta = job["template"]["spec"]["template"]["metadata"]
    assert kp.POD_LABELS.items() <= meta["labels"].items()
    assert meta["labels"][kp.MLFLOW_CLIENT_LABEL] == "true"
    assert meta["annotations"]["sidecar.istio.io/inject"] == meta["labels"]["sidecar.istio.io/inject"] == "false"
    policy = yaml.safe_load((REPO / "infra/k8s/base/networkpolicy.yaml").read_text())
    profile = {"kubernetes.io/metadata.name": "kubeflow-user-example-com",
               "app.kubernetes.io/part-of": "kubeflow-profile"}
    for ns in (profile, {"kubernetes.io/metadata.name": "kubeflow"}):
        assert policy_allows(policy, 5000, ns, meta["labels"], False)
        unlabelled = {k: v for k, v in meta["labels"].items() if k != kp.MLFLOW_CLIENT_LABEL}
        assert not policy_allows(policy, 5000, ns, unlabelled, False)  # what the pods were before


def role_grants(role: dict) -> dict:
    """(apiGroup, resource) -> [(verbs, resourceNames or None: every object)]."""
    out: dict = {}
    for rule in role["rules"]:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                names = set(rule["resourceNames"]) if rule.get("resourceNames") else None
                out.setdefault((group, resource), []).append((set(rule["verbs"]), names))
    return out


@pytest.mark.parametrize("overlay,namespace", [("standalone", "kubeflow"),
                                               ("multi-user", "kubeflow-user-example-com")])
def test_only_the_launcher_may_create_trainjobs_in_the_runs_namespace(overlay, namespace, tmp_path):
    """The install overlays include infra/k8s/training: in the runs' namespace (not a fixed
    one), a Role to create and read TrainJobs bound to the launcher's ServiceAccount only,
    whose token Secret the stage-2 step mounts; the runner (every step) gets none of it."""
    import kubernetes_validate
    from infra_helpers import find, render_overlay
    docs = render_overlay(overlay, tmp_path)
    mine = [d for d in docs if d["metadata"]["name"].startswith(("cladapter-trainjob", "cladapter-trainjobs"))]
    assert {(d["kind"], d["metadata"]["name"]) for d in mine} == {
        ("ServiceAccount", "cladapter-trainjob-launcher"), ("Role", "cladapter-trainjobs"),
        ("RoleBinding", "cladapter-trainjobs"), ("Secret", multinode.LAUNCHER_SECRET)}
    for d in mine:
        kubernetes_validate.validate(d, "1.29.0", strict=True)
        assert d["metadata"]["namespace"] == namespace
    assert role_grants(find(docs, "Role", "cladapter-trainjobs")) == {
        ("trainer.kubeflow.org", "trainjobs"): [({"get", "create"}, None)]}
    binding = find(docs, "RoleBinding", "cladapter-trainjobs")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "cladapter-trainjob-launcher",
                                    "namespace": namespace}]
    token = find(docs, "Secret", multinode.LAUNCHER_SECRET)
    assert token["type"] == "kubernetes.io/service-account-token" and not token.get("data")
    assert token["metadata"]["annotations"]["kubernetes.io/service-account.name"] == "cladapter-trainjob-launcher"
    assert find(docs, "ServiceAccount", "cladapter-trainjob-launcher")["automountServiceAccountToken"] is False
    runner = role_grants(find(docs, "Role", "cladapter-pipeline-runner"))
    assert not [key for key in runner if key[0] == "trainer.kubeflow.org"]
    assert not (REPO / "infra/k8s/training/trainjob-stage2.yaml").exists()  # package data now


def test_the_launcher_talks_to_the_api_with_its_own_token(tmp_path):
    """In a pod: the mounted launcher token and CA, never the pod's own identity; no token
    mounted: a clear error; a 403 names the Role to apply."""
    from kubernetes.client.exceptions import ApiException
    (tmp_path / "token").write_text("launcher-token")  # as the token controller writes it
    (tmp_path / "ca.crt").write_text("-----BEGIN CERTIFICATE-----\n")
    pod_env = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}
    api = multinode._custom_objects_api(tmp_path, environ=pod_env)
    config = api.api_client.configuration
    assert config.host == "https://10.96.0.1:443" and config.ssl_ca_cert == str(tmp_path / "ca.crt")
    assert config.get_api_key_with_prefix("authorization") == "bearer launcher-token"
    with pytest.raises(CLAdapterError, match=multinode.LAUNCHER_SECRET):
        multinode._custom_objects_api(tmp_path / "not-mounted", environ=pod_env)

    class Forbidden:
        def create_namespaced_custom_object(self, *args):
            raise ApiException(status=403, reason="Forbidden")
    doc = multinode.render({}, name="cladapter-stage2-x", namespace="team-a", image="i:1", nodes=2, gpus_per_node=1)
    with pytest.raises(CLAdapterError, match="forbidden.*cladapter-trainjobs.*cladapter-trainjob-launcher"):
        multinode.submit(Forbidden(), doc)


def test_torchrun_flags_follow_the_trainer_runtime_variables():
    env = {"PET_NNODES": "4", "PET_NPROC_PER_NODE": "8", "PET_NODE_RANK": "2",
           "PET_MASTER_ADDR": "job-node-0-0.job", "PET_MASTER_PORT": "29400"}
    argv = multinode.torchrun_argv(env, "run-1")
    assert argv[1:3] == ["-m", "torch.distributed.run"]
    assert {"--nnodes=4", "--nproc-per-node=8", "--node-rank=2", "--rdzv-backend=c10d",
            "--rdzv-endpoint=job-node-0-0.job:29400", "--rdzv-id=run-1", "--rdzv-conf=is_host=false"} <= set(argv)
    assert "--rdzv-conf=is_host=true" in multinode.torchrun_argv({**env, "PET_NODE_RANK": "0"}, "r")


class LocalTrainer:
    """A stand-in for the Kubernetes API and the Kubeflow Trainer controller, on this machine:
    `create` starts the TrainJob's nodes as local processes, each with the container's
    command, args and plain env from the TrainJob and the PET_* variables the Trainer's torch
    runtime sets (rendezvous on loopback); `get` reports the Complete/Failed condition."""

    def __init__(self, tmp, env):
        self.tmp, self.env, self.jobs = tmp, env, {}

    def create_namespaced_custom_object(self, group, version, namespace, plural, body):
        assert (group, version, plural) == ("trainer.kubeflow.org", "v1alpha1", "trainjobs")
        assert multinode.validate(body) == []
        name = body["metadata"]["name"]
        if name in self.jobs:
            from kubernetes.client.exceptions import ApiException
            raise ApiException(status=409, reason="AlreadyExists")
        trainer = body["spec"]["trainer"]
        env = {**self.env, **{e["name"]: e["value"] for e in trainer["env"] if "value" in e},
               "PET_NNODES": str(trainer["numNodes"]), "PET_NPROC_PER_NODE": str(trainer["numProcPerNode"]),
               "PET_MASTER_ADDR": "127.0.0.1", "PET_MASTER_PORT": str(free_port())}
        cmd = [sys.executable if c == "python" else c for c in trainer["command"]] + trainer["args"]
        self.jobs[name] = [subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                            env={**env, "PET_NODE_RANK": str(rank),
                                                 "CLADAPTER_SCRATCH": str(self.tmp / f"{name}-node{rank}")})
                           for rank in range(trainer["numNodes"])]

    def get_namespaced_custom_object(self, group, version, namespace, plural, name):
        procs = self.jobs[name]
        if any(p.poll() is None for p in procs):
            return {"status": {"conditions": [{"type": "Created", "status": "True"}]}}
        self.logs = [p.stdout.read() for p in procs]
        ok = all(p.returncode == 0 for p in procs)
        return {"status": {"conditions": [{"type": "Complete" if ok else "Failed", "status": "True",
                                           "message": "" if ok else "a node failed"}]}}


def test_two_nodes_on_loopback_match_one_process(ddp_dataset, stage1_reference, tmp_path,
                                                  clean_mlflow_env, bucket, s3_env):  # S3 set after the cleaning
    """The pipeline's multi-node stage-2 step (multinode.stage2_task -> launch) -> the
    TrainJob's two nodes (torchrun --nnodes=2, c10d rendezvous on 127.0.0.1, gloo), the
    stage-1 model, the checkpoint and the result through a local S3 server -> the model in
    the step's output: the weights of one process within 1e-5, rank 0's epochs in the step's
    MLflow run."""
    p = params()
    with one_thread():
        train(p, runtime.prepared_dir(ddp_dataset), tmp_path / "ref2", stage=2, init_from=stage1_reference,
              progress=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    clean_mlflow_env.setenv("MLFLOW_TRACKING_URI", uri)
    for name in ("CLADAPTER_TRACKING", "CLADAPTER_PIPELINE_ID"):
        clean_mlflow_env.delenv(name, raising=False)
    clean_mlflow_env.chdir(tmp_path)
    env = child_env(**{k: os.environ[k] for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID",
                                                  "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")},
                    PYTHONPATH=str(REPO), MLFLOW_TRACKING_URI=uri)
    env["OMP_NUM_THREADS"] = "1"  # the TrainJob's own value (4) is for GPU nodes
    api = LocalTrainer(tmp_path, env)
    common = dict(nodes=2, gpus_per_node=1, pipeline_id="mn-test", stage_prefix=f"s3://{bucket}/stages",
                  checkpoint_prefix=f"s3://{bucket}/ckpt", poll_s=0.5, api=api)
    # the dataset on a "shared volume" (file://), the stage-1 model uploaded by the step
    summary = multinode.stage2_task(p, ddp_dataset, stage1_reference, tmp_path / "model", image="cladapter:test",
                                    namespace="cladapter", dataset_uri=f"file://{ddp_dataset}", **common)
    assert sum("model pushed to" in log for log in api.logs) == 1, api.logs  # the node that held rank 0
    assert summary["stage"] == 2 and summary["epochs_run"] == 1
    assert_same_training(tmp_path / "ref2", tmp_path / "model")

    from mlflow import MlflowClient
    client = MlflowClient(tracking_uri=uri)
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])
            if r.data.tags.get("stage") == "train_stage2"]
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(runs[0].info.run_id, "train_loss")] == [1]  # rank 0 alone

    # a retried step finds its TrainJob and waits for it instead of starting another
    again = multinode.launch(p, dataset=f"file://{ddp_dataset}", init_from=stage1_reference, out_dir=tmp_path / "again",
                             image="cladapter:test", namespace="cladapter", **common)
    assert again == summary and len(api.jobs) == 1
    with pytest.raises(ParamsError, match="CLADAPTER_IMAGE"):
        multinode.stage2_task(p, ddp_dataset, stage1_reference, tmp_path / "x", **common)


def test_a_failed_trainjob_fails_the_step():
    class Failed:
        def get_namespaced_custom_object(self, *args):
            return {"status": {"conditions": [{"type": "Failed", "status": "True", "message": "node 1 OOM"}]}}
    with pytest.raises(CLAdapterError, match="node 1 OOM"):
        multinode.wait(Failed(), "ns", "job", timeout_s=5, poll_s=0.01)
    assert multinode.job_state({}) == (None, "")

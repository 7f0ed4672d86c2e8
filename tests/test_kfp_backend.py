"""Backend compatibility: the committed pipeline YAML runs on the oldest supported KFP
backend. That backend's driver parses each executor's Kubernetes config with the
kfp-kubernetes proto it was built with and refuses unknown fields; here the same parse is
done with the published proto of that version (fetched once from PyPI with `pip download
--no-deps`, cached under $CLADAPTER_TEST_CACHE, default ~/.cache/cladapter-tests), in a
process of its own, and with the newest installed one."""
import copy
import importlib.metadata

import pytest

from pipelines import backend_check
from pipelines import cladapter_pipeline as kp
from helpers import REPO

COMMITTED = REPO / "pipelines" / "cladapter_pipeline.yaml"


@pytest.fixture(scope="module")
def configs():
    found = backend_check.executor_configs(COMMITTED)
    assert len(found) >= 8, sorted(found)
    return found


def test_oldest_supported_backend_accepts_the_committed_pipeline(configs):
    assert kp.OLDEST_KFP_BACKEND == "2.14.0" and kp.KFP_KUBERNETES_PROTO == "2.14.0"
    assert backend_check.check(COMMITTED, kp.KFP_KUBERNETES_PROTO, configs=configs) == []
    # what it uses from that proto: secrets, GPU tolerations, /dev/shm, scratch volume, timeouts
    used = {key for c in configs.values() for key in c}
    assert {"secretAsEnv", "tolerations", "emptyDirMounts", "secretAsVolume",
            "activeDeadlineSeconds"} <= used, used


def test_installed_kfp_kubernetes_accepts_it_too(configs):
    installed = importlib.metadata.version("kfp-kubernetes")
    assert backend_check.check(COMMITTED, installed, configs=configs) == []


def test_the_check_refuses_a_field_the_old_proto_does_not_know(configs):
    """`optional` on a secret (what kfp-kubernetes writes by default) is refused by the
    2.14.0 proto: the check is what keeps the compiled YAML on the old backend."""
    broken = copy.deepcopy(configs)
    broken["exec-train-stage1"]["secretAsEnv"][0]["optional"] = False
    problems = backend_check.check(COMMITTED, kp.KFP_KUBERNETES_PROTO, configs=broken)
    assert len(problems) == 1 and "exec-train-stage1" in problems[0] and '"optional"' in problems[0]
    older = backend_check.check(COMMITTED, "1.4.0", configs=configs)  # below the minimum
    assert older and any("secretNameParameter" in p for p in older)


def test_docs_state_the_minimum_versions():
    for doc in (REPO / "infra" / "README.md", REPO / "pipelines" / "README.md"):
        text = doc.read_text()
        assert f"KFP {kp.OLDEST_KFP_BACKEND}" in text and f"kfp-kubernetes {kp.KFP_KUBERNETES_PROTO}" in text, doc


def test_every_feature_of_the_committed_pipeline_runs_on_the_claimed_backend():
    """The pipeline-spec features the YAML uses (exit handler status, OneOf, ParallelFor
    parallelism, retries, each platform-spec field) each have the first backend release
    that runs them; none is newer than OLDEST_KFP_BACKEND, and the exit handler's status
    is what sets it (2.5.0 refuses it: 'task final status not supported yet')."""
    used = backend_check.features_used(COMMITTED)
    assert set(used) <= set(backend_check.FEATURES), set(used) - set(backend_check.FEATURES)
    for feature in ("exit handler status (PipelineTaskFinalStatus input)", "dsl.OneOf (valueFromOneof)",
                    "ParallelFor parallelism", "retry policy, task inside a DAG (exit handler, condition)",
                    "k8s secretAsEnv.secretNameParameter", "k8s emptyDirMounts.sizeLimit",
                    "k8s secretAsVolume.optional"):
        assert feature in used, feature
    assert backend_check.backend_problems(COMMITTED, kp.OLDEST_KFP_BACKEND, used) == []
    assert backend_check.oldest_backend_needed(COMMITTED, used) == kp.OLDEST_KFP_BACKEND
    refused = backend_check.backend_problems(COMMITTED, "2.5.0", used)
    assert len(refused) == 2, refused
    assert "close-pipeline-run" in refused[0] and "pull/11953" in refused[0]
    assert "train-stage1" in refused[1] and "pull/11908" in refused[1]
    # every entry names its source upstream
    assert all("kubeflow/pipelines/" in src for _, src in backend_check.FEATURES.values())


def test_a_feature_missing_from_the_table_fails_the_check(tmp_path):
    text = COMMITTED.read_text().replace("activeDeadlineSeconds", "someNewField")
    (tmp_path / "p.yaml").write_text(text)
    problems = backend_check.backend_problems(tmp_path / "p.yaml", kp.OLDEST_KFP_BACKEND)
    assert len(problems) == 1 and "k8s someNewField" in problems[0] and "not in the feature table" in problems[0]


def test_the_feature_check_on_the_command_line(capsys):
    assert backend_check.main(["--features", str(COMMITTED)]) == 0
    out = capsys.readouterr().out
    assert f"needs KFP backend >= {kp.OLDEST_KFP_BACKEND}; claimed: {kp.OLDEST_KFP_BACKEND}" in out
    assert "retry policy, task inside ParallelFor: KFP >= no release (ignored) (tune-worker)" in out


def test_the_feature_table_is_in_the_readme():
    text = (REPO / "pipelines" / "README.md").read_text()
    for feature, (first, source) in backend_check.FEATURES.items():
        row = f"| {feature} | {first or 'no release yet'} |"
        assert row in text, row

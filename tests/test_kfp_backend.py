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
    assert kp.OLDEST_KFP_BACKEND == "2.5.0" and kp.KFP_KUBERNETES_PROTO == "1.5.0"
    assert backend_check.check(COMMITTED, kp.KFP_KUBERNETES_PROTO, configs=configs) == []
    # what it uses from that proto: secrets, GPU tolerations, /dev/shm, scratch volume, timeouts
    used = {key for c in configs.values() for key in c}
    assert {"secretAsEnv", "tolerations", "emptyDirMounts", "genericEphemeralVolume",
            "activeDeadlineSeconds"} <= used, used


def test_installed_kfp_kubernetes_accepts_it_too(configs):
    installed = importlib.metadata.version("kfp-kubernetes")
    assert backend_check.check(COMMITTED, installed, configs=configs) == []


def test_the_check_refuses_a_field_the_old_proto_does_not_know(configs):
    """`optional` on a secret (what kfp-kubernetes writes by default) is refused by the
    1.5.0 proto: the check is what keeps the compiled YAML on the old backend."""
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

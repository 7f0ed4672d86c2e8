"""Shared fixtures, and the tiers every test belongs to.

Services (S3-compatible server, MLflow server) run as real processes on loopback;
PostgreSQL is the machine's server on 127.0.0.1:5432. Helpers the test modules share are
in helpers.py, tiny.py and fixtures_services.py.

Tiers (markers registered in pyproject.toml; `make test-fast` runs `-m unit`):

- ``unit``: in-process and fast (seconds): no servers, no runs of the commands as processes.
- ``integration``: real services (the MLflow server, PostgreSQL, the moto S3 server, a
  browser, a PyPI download), the commands, DVC or KFP run as processes, or training runs
  that take tens of seconds.
- ``e2e``: the whole pipeline: `dvc repro`, the KFP local runner, the README's runnable
  block, a folder of files to a served champion, two nodes, the fault-injection runs.

Each test gets exactly one, here: an explicit ``@pytest.mark.<tier>`` on the test wins;
else a test using an E2E_FIXTURES fixture, or listed in E2E_TESTS, is e2e; else one
using a SERVICE_FIXTURES fixture (directly or through another fixture), or listed in
INTEGRATION_TESTS, is integration; everything else is unit. tests/test_tiers.py checks
that every collected test has exactly one tier and that every name listed here exists.

Under pytest-xdist (`-n 2 --dist loadgroup`) the tests of a module run on one worker, in
order: a module-scoped fixture is made once, and tests that build on the ones before them
(test_dvc.py) see them. SAME_WORKER also keeps modules that share a session-scoped result
that is expensive to make twice on one worker.
"""
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers import BIN, TESTS, ddp_params, free_port, one_thread, wait_port

# MLflow server + PostgreSQL + S3 fixtures (tests/fixtures_services.py)
pytest_plugins = ["fixtures_services"]

TIERS = ("unit", "integration", "e2e")
COLLECTED = pytest.StashKey[list]()  # what the collection hook saw, for test_tiers.py
TIERS_OUT = "CLADAPTER_TEST_TIERS_OUT"  # set: the collection hook writes COLLECTED there

# Fixtures that run the whole pipeline: every test using one is e2e.
E2E_FIXTURES = {
    "clone",      # test_dvc.py: `dvc repro` of the whole pipeline in a fresh clone
    "fresh_copy",  # test_docs.py: the README's runnable block in a fresh clone
    "reference",  # tests/faults: every stage run once as a process, then interrupted runs
}
# Fixtures that start or reach a real service, or run for tens of seconds.
SERVICE_FIXTURES = {
    "s3_server", "s3_iam",                  # moto S3 servers (s3_env, bucket use s3_server)
    "pg_database", "pg_url",                # PostgreSQL at 127.0.0.1:5432
    "mlflow_server", "restartable_mlflow",  # `mlflow server` processes
    "chromium",                             # a headless browser
    "bn_setup",                             # test_batchnorm.py: pretrains a ResNet (~15 s)
}
# Tests by "<path under tests/>::<function>" (all parameters of a parametrized test).
E2E_TESTS = {
    "test_multinode.py::test_two_nodes_on_loopback_match_one_process",
    "test_pipeline.py::test_run_local_end_to_end_with_parallel_tuning",
    "test_pipeline.py::test_run_local_without_tuning_a_killed_step_fails_the_parent_run",
    "test_scale_3d.py::test_a_thousand_clips_prepare_train_both_stages_and_evaluate",
    "test_your_data.py::test_from_a_folder_of_12_bit_tiffs_to_a_served_champion",
}
INTEGRATION_TESTS = {
    # a fresh interpreter importing the whole stack (torch, mlflow, kfp), or the installed command
    "test_cli.py::test_pipeline_help_through_the_installed_console_script",
    "test_cli.py::test_building_the_parser_does_not_import_kfp",
    "test_params.py::test_params_do_not_import_tuning",
    "test_settings.py::test_importing_the_components_changes_no_global_state",
    # the commands as processes
    "test_compare.py::test_compare_writes_table_over_seeds",
    "test_device.py::test_the_command_stops_before_any_work_and_names_the_gpu",
    "test_gpu_check.py::test_gpu_check_tiny_mode_writes_every_figure",
    "test_train.py::test_killed_process_resumes_to_same_weights",
    "test_train.py::test_cli_lists_every_params_problem_at_once",
    "test_tracking.py::test_stages_in_separate_processes_share_one_pipeline_parent",
    "faults/test_fault_guards.py::test_diverging_training_stops_with_a_clear_error_and_nothing_is_registered",
    "faults/test_fault_guards.py::test_pickled_code_in_a_checkpoint_or_weights_file_is_refused_not_run",
    "faults/test_fault_services.py::test_two_promote_commands_at_once_leave_one_champion_the_better_and_both_report",
    "test_scale.py::test_persistent_workers_train_and_resume_as_one_process",  # loader processes
    # torchrun
    "test_ddp.py::test_torchrun_two_processes_match_one_process",
    "test_ddp.py::test_training_step_with_two_devices_runs_torchrun_and_logs_once",
    # KFP: compiling in a process of its own, the oldest backend's proto (a PyPI download)
    "test_pipeline.py::test_git_commit_outside_a_checkout_is_the_images",
    "test_pipeline.py::test_a_params_file_change_reaches_the_compiled_yaml_and_the_steps",
    "test_pipeline.py::test_image_from_environment_and_gpus_per_training_step",
    "test_kfp_backend.py::test_oldest_supported_backend_accepts_the_committed_pipeline",
    "test_kfp_backend.py::test_installed_kfp_kubernetes_accepts_it_too",
    "test_kfp_backend.py::test_the_check_refuses_a_field_the_old_proto_does_not_know",
    "test_pipeline.py::test_adding_a_parameter_to_the_table_is_all_it_takes",  # compiles again
    "test_pipeline.py::test_a_rerun_tuning_worker_runs_only_what_its_earlier_attempt_left",  # Optuna, SQLite
    # DVC commands
    "test_pipeline.py::test_dataset_from_a_dvc_repository",
    "test_tracking.py::test_source_hash_uses_dvc_records_else_a_deterministic_content_hash",
    # services started inline: PostgreSQL, moto, the MLflow server of the manifest
    "test_pipeline.py::test_tuning_workers_share_one_postgresql_study",
    "test_infra.py::test_mlflow_server_starts_from_the_rendered_manifest",
    # the dev init SQL run with psql on PostgreSQL; MLflow's and Optuna's schemas made by their roles
    "test_least_privilege.py::test_init_sql_gives_each_service_a_role_that_owns_only_its_database",
    "test_least_privilege.py::test_optuna_cannot_reach_the_registry_and_mlflow_works_unprivileged",
    "test_least_privilege.py::test_init_sql_stops_without_a_password_and_leaves_no_role",
    "test_least_privilege.py::test_s3_enforces_the_policies_per_identity",  # a moto server checking IAM
    # the wheel built and installed in a fresh virtualenv; a step run as UID 10001
    "test_install.py::test_the_wheel_holds_every_file_the_code_reads",
    "test_install.py::test_the_installed_copy_is_the_one_imported",
    "test_install.py::test_the_installed_package_compiles_the_pipeline",
    "test_install.py::test_the_installed_package_renders_every_template",
    "test_install.py::test_a_step_as_uid_10001_stops_on_a_root_owned_scratch",
    "faults/test_fault_services.py::test_s3_errors_are_retried_with_backoff_then_reported",
    # the registry: a lock held 3x its staleness by another process, registrations that wait
    "test_registry.py::test_a_slow_holder_renews_its_lock_and_the_next_promoter_waits_or_fails_clearly",
    "test_registry.py::test_a_registration_in_progress_is_waited_for_not_deleted",
    # promotion through a registry: models logged and downloaded, a champion re-scored (~15 s each)
    "test_promotion.py::test_test_metrics_never_decide",
    "test_promotion.py::test_a_champion_from_other_data_is_reevaluated_before_it_can_be_replaced",
    "test_promotion.py::test_promote_records_the_test_and_refuses_an_overlapping_split",
    "test_integrity.py::test_the_record_covers_every_file_and_is_what_sha256sum_checks",
    "test_integrity.py::test_a_version_without_a_record_is_not_loaded",
    # the KServe SDK's API types (a PyPI download on first use)
    "test_serving.py::test_the_inference_service_renders_and_validates",
    "test_serving.py::test_the_validator_refuses_broken_inference_services",
    # decompression bombs: written in the test, refused in a measured child process
    "test_hostile_input.py::test_the_bombs_are_small_on_disk_and_declare_what_they_say",
    "test_hostile_input.py::test_load_array_and_predict_refuse_the_bombs_without_their_memory",
    "test_hostile_input.py::test_prepare_refuses_a_bomb_in_the_folder_without_its_memory",
    # in-process, but tens of seconds of training
    "test_batchnorm.py::test_first_stage2_epoch_keeps_stage1_under_the_default_rule",
    "test_batchnorm.py::test_full_fine_tuning_follows_the_same_rule",
    "test_compare.py::test_compare_in_mlflow_parent_and_a_child_per_method_and_seed",
    "test_sweep.py::test_k_study_table_plot_mlflow_and_resume",
    "test_tune.py::test_small_study_best_params_are_written_tracked_and_used_by_training",
    "test_tune.py::test_median_pruner_stops_trials_that_cannot_win",
    "test_tune.py::test_failed_trials_count_as_the_worst_value_and_the_worker_goes_on",
    "test_compare.py::test_each_method_picks_its_lr_on_validation_from_the_same_grid",
    # seconds of real training each (the slowest of the unit tier: make test-fast under 2 min)
    "test_cache.py::test_views_replay_the_trainers_augmentations",
    "test_cache.py::test_k_search_reuses_one_cache_and_stage2_does_not_use_it",
    "test_cache.py::test_resume_mid_epoch_with_the_cache",
    "test_train.py::test_resume_mid_epoch_gives_identical_weights",
    "test_train.py::test_callbacks_are_typed_and_hear_of_a_failure",
    "test_train.py::test_baselines_through_the_same_loop",
    "test_tune.py::test_the_best_trials_are_re_run_on_other_seeds_before_best_params_is_written",
    "test_secrets.py::test_a_compare_or_sweep_study_logs_no_credential",
    "test_secrets.py::test_a_stage_run_logs_no_credential_of_any_url_parameter",  # an MLflow store made
}
# xdist groups of more than one module (else each module is a group of its own).
SAME_WORKER = {
    "faults/test_fault_kills.py": "fault-reference",     # one reference run (session-scoped)
    "faults/test_fault_services.py": "fault-reference",
}


def pytest_configure(config):
    """Under xdist the workers share the cores: each worker's torch (and the processes it
    starts) gets its share of threads instead of all of them; oversubscribed OpenMP
    threads spin and wait on each other. An explicit OMP_NUM_THREADS is left alone."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 0)
    if workers > 1:
        threads = str(max(1, len(os.sched_getaffinity(0)) // workers))
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ.setdefault(var, threads)


def tier_key(item) -> str:
    """'<path under tests/>::<function>', the key of the tables above."""
    return f"{Path(item.path).relative_to(TESTS).as_posix()}::{item.originalname}"


def own_tiers(item) -> list[str]:
    return [m.name for m in item.iter_markers() if m.name in TIERS]


def tier_of(item) -> str:
    explicit = own_tiers(item)
    if explicit:
        return explicit[0]
    key, fixtures = tier_key(item), set(getattr(item, "fixturenames", ()))
    if fixtures & E2E_FIXTURES or key in E2E_TESTS:
        return "e2e"
    if fixtures & SERVICE_FIXTURES or key in INTEGRATION_TESTS:
        return "integration"
    return "unit"


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects: every collected test gets its tier
def pytest_collection_modifyitems(config, items):
    grouped = config.pluginmanager.hasplugin("xdist")
    for item in items:
        if not own_tiers(item):
            item.add_marker(tier_of(item))
        if grouped:
            module = Path(item.path).relative_to(TESTS).as_posix()
            item.add_marker(pytest.mark.xdist_group(SAME_WORKER.get(module, module)))
    config.stash[COLLECTED] = [{"id": item.nodeid, "key": tier_key(item), "tiers": own_tiers(item),
                                 "fixtures": sorted(set(getattr(item, "fixturenames", ())))}
                                for item in items]
    if os.environ.get(TIERS_OUT):  # a collection run for tiered_suite below
        Path(os.environ[TIERS_OUT]).write_text(json.dumps(config.stash[COLLECTED]))


@pytest.fixture(scope="session")
def tiered_suite(request, tmp_path_factory):
    """Every test of the suite as collected and tiered here ({"id", "key", "tiers",
    "fixtures"}), and the tables above. When this session collected only part of the
    suite, the whole suite is collected again in a process of its own."""
    tests = request.config.stash.get(COLLECTED, [])
    files = {p.relative_to(TESTS).as_posix() for p in TESTS.rglob("test_*.py")}
    if not files <= {t["key"].split("::")[0] for t in tests}:
        out = tmp_path_factory.mktemp("tiers") / "tests.json"
        proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:xdist",
                               "-p", "no:cacheprovider", str(TESTS)], cwd=TESTS.parent,
                              capture_output=True, text=True, timeout=300,
                              env={**os.environ, TIERS_OUT: str(out)})
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
        tests = json.loads(out.read_text())
    return SimpleNamespace(tests=tests, files=files, tiers=TIERS, e2e_fixtures=E2E_FIXTURES,
                           service_fixtures=SERVICE_FIXTURES, e2e_tests=E2E_TESTS,
                           integration_tests=INTEGRATION_TESTS, same_worker=SAME_WORKER)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A moto S3-compatible server on loopback; yields its endpoint URL."""
    port = free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "w")
    proc = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_port(port, proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """Point boto3 (AWS_ENDPOINT_URL) at the loopback S3 server with test credentials."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", s3_server)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    return s3_server


@pytest.fixture
def bucket(s3_env, request):
    import boto3
    name = "t-" + request.node.name.lower().replace("_", "-")[:40].strip("-")
    boto3.client("s3").create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def prepared(tmp_path_factory):
    """The demo digits, prepared with 12 training scans per class (fast epochs)."""
    from cladapter_core.data import make_demo_data, prepare
    from tiny import tiny_params
    root = tmp_path_factory.mktemp("demo")
    make_demo_data(root / "digits")
    params = tiny_params("data.shots_per_class=12", "data.val_fraction=0.05", "data.test_fraction=0.05")
    prepare(root / "digits", root / "prepared", params)
    return root / "prepared"


# -- data-parallel training (test_ddp.py, test_multinode.py) ------------------------------
@pytest.fixture(scope="module")
def ddp_dataset(tmp_path_factory):
    """A pipeline Dataset artifact of the demo digits: 12 training scans per class."""
    from components import runtime
    root = tmp_path_factory.mktemp("ddp") / "dataset"
    p = runtime.resolve_params({}, "data.shots_per_class=12; data.val_fraction=0.05; data.test_fraction=0.05")
    runtime.prepare_task("demo", "", "", p, root)
    assert runtime.prepared_dir(root).joinpath("manifest.csv").read_text().count(",train,") == 120
    return root


@pytest.fixture(scope="module")
def stage1_reference(ddp_dataset, tmp_path_factory):
    """Stage 1 of helpers.ddp_params() trained in this process, one thread."""
    from cladapter_core.training import train
    from components import runtime
    out = tmp_path_factory.mktemp("ref") / "stage1"
    with one_thread():
        train(ddp_params(), runtime.prepared_dir(ddp_dataset), out, stage=1, progress=False)
    return out

"""The staged trainer on the real demo data (digit scans) with a tiny backbone."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cladapter_core.training import Callback
from cladapter_core.training import Preempted, TrainingError, train
from tiny import TINY, tiny_params


def weights(model_dir):
    return load_file(str(Path(model_dir) / "model.safetensors"))


def test_staged_fine_tuning_freezes_then_unfreezes(prepared, tmp_path):
    params = tiny_params()
    s1 = train(params, prepared, tmp_path / "s1", stage=1, progress=False)
    assert s1["epochs_run"] == 2 and s1["param_report"]["adapter"] > 0
    # stage 1 leaves the backbone bit-identical to the freshly built one
    torch.manual_seed(params["seed"])
    from cladapter_core.model import build_model
    from cladapter_core.params import model_kwargs
    fresh = build_model(num_classes=10, class_names=[str(i) for i in range(10)], **model_kwargs(params))
    w1 = weights(tmp_path / "s1")
    for k, v in fresh.state_dict().items():
        if k.startswith("backbone."):
            assert torch.equal(w1[k], v), k
    assert any(not torch.equal(w1[k], v) for k, v in fresh.state_dict().items() if k.startswith("adapter."))
    s2 = train(params, prepared, tmp_path / "s2", stage=2, init_from=tmp_path / "s1", progress=False)
    w2 = weights(tmp_path / "s2")
    changed = [k for k in w1 if k.startswith("backbone.") and not torch.equal(w1[k], w2[k])]
    assert len(changed) > 10
    assert s2["lr"] == pytest.approx(params["train"]["lr"] * params["stage2"]["lr_factor"])
    hist = json.loads((tmp_path / "s2" / "history.json").read_text())
    assert [(r["stage"], r["epoch"]) for r in hist] == [(1, 1), (1, 2), (2, 1)]
    assert {"train_loss", "val_loss", "val_macro_f1", "val_accuracy", "lr"} <= set(hist[-1])
    assert not (tmp_path / "s1.ckpt").exists()  # removed once the model is saved


def test_learning_happens_on_real_digits(prepared, tmp_path):
    params = tiny_params("stage1.epochs=6", "train.lr=0.003")
    s1 = train(params, prepared, tmp_path / "s1", stage=1, progress=False)
    hist = json.loads((tmp_path / "s1" / "history.json").read_text())
    assert hist[-1]["train_loss"] < hist[0]["train_loss"]
    assert s1["best_value"] > 0.3  # chance is 0.1 on ten balanced classes


@pytest.mark.parametrize("mode,stages", [("linear", [1]), ("full", [1]), ("lp-ft", [1, 2])])
def test_baselines_through_the_same_loop(prepared, tmp_path, mode, stages):
    params = tiny_params()
    for stage in stages:
        s = train(params, prepared, tmp_path / f"s{stage}", stage=stage, mode=mode,
                  init_from=tmp_path / "s1" if stage == 2 else None, progress=False)
    cfg = json.loads((tmp_path / f"s{stages[-1]}" / "config.json").read_text())
    assert cfg["mode"] == mode and s["param_report"]["adapter"] == 0
    if mode == "linear":
        assert s["param_report"]["trainable"] == s["param_report"]["head"]
    if mode == "full":
        assert s["epochs_run"] == 3  # stage1 + stage2 epochs in one stage
        # the backbone at its lr (as every stage 2), the new head at the head's (as every stage 1)
        lr = params["train"]["lr"]
        assert s["lr"] == pytest.approx(lr * params["stage2"]["lr_factor"]) and s["head_lr"] == lr


def test_full_fine_tuning_trains_its_head_at_the_head_lr():
    """`full` puts the backbone and the rest in two parameter groups: a random head at
    lr / 10 (the backbone's) would tilt every comparison against it."""
    from cladapter_core.model import build_model
    from cladapter_core.params import model_kwargs
    from cladapter_core.training import make_optimizer, stage_plan
    params = tiny_params("train.lr=0.01", "stage2.lr_factor=0.1")
    plan = stage_plan(params, 1, "full")
    assert (plan["lr"], plan["head_lr"]) == (pytest.approx(0.001), 0.01)
    model = build_model(num_classes=3, **{**model_kwargs(params), "mode": "full"}).set_stage(2)
    opt = make_optimizer(params, model, plan["lr"], plan["head_lr"])
    backbone, rest = opt.param_groups
    assert backbone["lr"] == pytest.approx(0.001) and rest["lr"] == 0.01
    ids = {id(p) for p in model.backbone.parameters()}
    assert {id(p) for p in backbone["params"]} == ids and not {id(p) for p in rest["params"]} & ids
    assert {id(p) for p in rest["params"]} >= {id(p) for p in model.head.parameters()}
    for stage, mode in ((1, "cla"), (2, "cla"), (2, "lp-ft"), (1, "linear")):
        assert "head_lr" not in stage_plan(params, stage, mode)  # one lr, as before


def test_resume_mid_epoch_gives_identical_weights(prepared, tmp_path):
    params = tiny_params("model.dropout=0.1")
    train(params, prepared, tmp_path / "ref", stage=1, progress=False)
    # 120 training images / 16 = 8 batches per epoch: stop inside the second epoch
    with pytest.raises(Preempted):
        train(params, prepared, tmp_path / "run", stage=1, progress=False, max_steps=11)
    assert (tmp_path / "run.ckpt" / "last.pt").is_file() and not (tmp_path / "run").exists()
    train(params, prepared, tmp_path / "run", stage=1, progress=False)
    ref, got = weights(tmp_path / "ref"), weights(tmp_path / "run")
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    h_ref = json.loads((tmp_path / "ref" / "history.json").read_text())
    h_got = json.loads((tmp_path / "run" / "history.json").read_text())
    assert [r["val_macro_f1"] for r in h_ref] == [r["val_macro_f1"] for r in h_got]
    # the interrupted epoch's train_loss is of all its batches, those before the stop included
    assert [r["train_loss"] for r in h_got] == pytest.approx([r["train_loss"] for r in h_ref], rel=1e-6)


def test_checkpoint_of_other_params_is_not_resumed(prepared, tmp_path):
    with pytest.raises(Preempted):
        train(tiny_params(), prepared, tmp_path / "run", stage=1, progress=False, max_steps=3)
    s = train(tiny_params("train.lr=0.01"), prepared, tmp_path / "run", stage=1, progress=False)
    assert s["epochs_run"] == 2


def _cli(*args, **kw):
    env = {**os.environ, "CLADAPTER_TRACKING": "0", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "cladapter_core.cli", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killed_process_resumes_to_same_weights(prepared, tmp_path, sig):
    flags = [f"--set={o}" for o in TINY + ["stage1.epochs=4"]]
    (tmp_path / "empty.yaml").write_text("")
    args = ["train", "--params", str(tmp_path / "empty.yaml"), "--stage", "1", "--prepared", str(prepared)]
    ref = _cli(*args, "--out", str(tmp_path / "ref"), *flags)
    assert ref.wait(300) == 0, ref.stdout.read()
    proc = _cli(*args, "--out", str(tmp_path / "run"), *flags)
    ckpt = tmp_path / "run.ckpt" / "last.pt"
    deadline = time.time() + 240
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "training finished before it could be interrupted"
    proc.send_signal(sig)
    code = proc.wait(120)
    out = proc.stdout.read()
    if sig == signal.SIGTERM:
        assert code == 143 and "run again to resume" in out, out
    else:
        assert code == -signal.SIGKILL
    assert not (tmp_path / "run").exists()
    again = _cli(*args, "--out", str(tmp_path / "run"), *flags)
    out = again.stdout.read()
    assert again.wait(300) == 0, out
    assert "resuming" in out
    ref_w, got = weights(tmp_path / "ref"), weights(tmp_path / "run")
    assert all(torch.equal(ref_w[k], got[k]) for k in ref_w)


def test_non_finite_loss_stops_with_clear_error(prepared, tmp_path):
    params = tiny_params("train.lr=1.0e+30", "train.grad_clip=0", "train.warmup_epochs=0")
    with pytest.raises(TrainingError, match="non-finite loss"):
        train(params, prepared, tmp_path / "m", stage=1, progress=False)
    assert not (tmp_path / "m").exists()


def test_stage2_needs_stage1_and_matching_classes(prepared, tmp_path):
    with pytest.raises(TrainingError, match="needs the stage-1 model"):
        train(tiny_params(), prepared, tmp_path / "m", stage=2)
    with pytest.raises(TrainingError, match="single stage"):
        train(tiny_params(), prepared, tmp_path / "m", stage=2, mode="linear")


def test_cli_lists_every_params_problem_at_once(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("model:\n  num_centers: 0\n  backbone: vit_base_patch16_244\n"
                   "stage1:\n  epochs: -1\ntrain:\n  lr_typo: 3\n")
    proc = _cli("train", "--params", str(bad), "--out", str(tmp_path / "m"))
    out = proc.stdout.read()
    assert proc.wait(60) == 2
    for field in ("model.num_centers", "model.backbone", "vit_base_patch16_224", "stage1.epochs",
                  "train.lr_typo: unknown parameter", str(bad)):
        assert field in out, (field, out)
    assert "Traceback" not in out and not (tmp_path / "m").exists()


def test_progress_in_logs_is_a_plain_line_now_and_then_not_a_bar(caplog, monkeypatch):
    """Under DVC or in a KFP pod stderr is no terminal: a bar's every redraw would be a line
    of the log; instead a plain log line at most every EVERY_S seconds."""
    from cladapter_core import console
    caplog.set_level("INFO", logger="cladapter_core")
    monkeypatch.setattr(console.LogLines, "EVERY_S", 0.0)
    bar = console.progress(4, "stage 1 epoch 1/2")  # pytest's captured stderr is no terminal
    assert isinstance(bar, console.LogLines)
    for _ in range(4):
        bar.update(1)
        bar.set_postfix(loss="0.5000")
    bar.close()
    lines = [r.getMessage() for r in caplog.records]
    assert [line.split(",")[0] for line in lines] == [f"stage 1 epoch 1/2: {i}/4 batches" for i in (1, 2, 3)]
    assert lines[1].endswith(", loss 0.5000") and "\r" not in "".join(lines)
    caplog.clear()
    monkeypatch.setattr(console.LogLines, "EVERY_S", 3600.0)
    console.progress(4, "stage 1 epoch 2/2").update(3)
    assert caplog.records == []
    assert type(console.progress(4, "x", enabled=False)) is console.Silent
    assert list(console.tracked(range(3), "x")) == [0, 1, 2]


def test_the_command_configures_log_lines_for_logs(tmp_path, capsys):
    """`cladapter` sets up the library's logging: in logs (no terminal) each line carries
    its time and level; the library's own modules only call `logging`."""
    import re

    from cladapter_core import cli
    assert cli.main(["demo-data", "--out", str(tmp_path / "d"), "--per-class", "2"]) == 0
    capsys.readouterr()
    import logging
    logging.getLogger("cladapter_core.training.trainer").info("stage 1 (cla): hello")
    out = capsys.readouterr().out
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d INFO stage 1 \(cla\): hello\n", out), out


class _Hooks(Callback):
    """Records the hooks the trainer calls; raises at `fail_at` epoch."""

    def __init__(self, fail_at=None):
        self.calls, self.fail_at = [], fail_at

    def on_train_start(self, info):
        self.calls.append(("start", info["stage"]))

    def on_epoch_end(self, record):
        self.calls.append(("epoch", record["epoch"]))
        if record["epoch"] == self.fail_at:
            raise RuntimeError("callback failed")

    def on_train_end(self, summary):
        self.calls.append(("end", summary["epochs_run"]))

    def on_exception(self, error):
        self.calls.append(("exception", str(error)))


def test_callbacks_are_typed_and_hear_of_a_failure(prepared, tmp_path):
    ok, failing = _Hooks(), _Hooks(fail_at=1)
    train(tiny_params(), prepared, tmp_path / "ok", callbacks=[ok], progress=False)
    assert ok.calls == [("start", 1), ("epoch", 1), ("epoch", 2), ("end", 2)]
    with pytest.raises(RuntimeError, match="callback failed"):
        train(tiny_params(), prepared, tmp_path / "failed", callbacks=[failing], progress=False)
    assert failing.calls == [("start", 1), ("epoch", 1), ("exception", "callback failed")]
    assert not (tmp_path / "failed").exists()  # nothing half-written
    with pytest.raises(TrainingError, match="not a cladapter_core.training.Callback"):
        train(tiny_params(), prepared, tmp_path / "duck", callbacks=[object()], progress=False)


def test_epoch_logger_sends_what_it_holds_when_training_fails(embedded_mlflow, prepared, tmp_path):
    """Epoch 1's metrics are refused (the run is deleted at that moment), epoch 2 crashes
    training: the logger's `on_exception` sends epoch 1's values before the error goes on."""
    from mlflow import MlflowClient

    from cladapter_core import tracking
    client = MlflowClient()
    params = tiny_params("stage1.epochs=3")

    class DeleteThenCrash(Callback):
        def on_epoch_end(self, record):
            if record["epoch"] == 1:
                client.delete_run(run.info.run_id)  # the store refuses writes to a deleted run
            else:
                client.restore_run(run.info.run_id)
                raise RuntimeError("crashed in epoch 2")

    with pytest.raises(RuntimeError, match="crashed in epoch 2"):
        with tracking.stage_run(params, "train_stage1", prepared=prepared) as run:
            with pytest.warns(UserWarning, match="MLflow logging"):
                train(params, prepared, tmp_path / "m", callbacks=[DeleteThenCrash(), tracking.EpochLogger()],
                      progress=False)
    losses = client.get_metric_history(run.info.run_id, "train_loss")
    assert [m.step for m in losses] == [1]
    assert client.get_run(run.info.run_id).info.status == "FAILED"

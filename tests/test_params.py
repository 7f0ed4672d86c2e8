"""Parameters: the declared models, the layers, and what a user reads when a value is wrong."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cladapter_core.errors import ParamsError
from cladapter_core.param_models import Params, Section
from cladapter_core.params import defaults, load_params, validate_params

REPO = Path(__file__).resolve().parents[1]

# `load_params` of the embedded defaults: the stages hash this dict into cache keys and
# checkpoint fingerprints, so its keys, order, values and types must not move unnoticed
# (15 is an int, 4.0 a float). Changed on purpose by "Honest experiments" (warm-up cap, cache
# off by default, auto_promote, compare's learning rates), "Your own data" (data.intensity;
# one experiment per dataset), "Trust the registry" (data.allow_outside_root), "A fair
# verdict" (register.confidence, register.test; tune.rerun_top, rerun_seeds, cache_views null:
# trials in the final run's regime; compare.lr_grid, lr_span) and "Declared
# once" (the defaults are the paper's recipe; the official augmentation's probabilities;
# select_ties; model.checkpoint renamed model.weights: "checkpoint" is the trainer's resume file).
SNAPSHOT = {
    "seed": 0,
    "data": {"source": "data/demo",
             "val_fraction": 0.15,
             "test_fraction": 0.15,
             "shots_per_class": None,
             "folds": 0,
             "fold": 0,
             "skip_invalid": False,
             "allow_outside_root": False,
             "resize": None,
             "intensity": "auto"},
    "model": {"backbone": "vit_base_patch16_clip_224.laion2b",
              "backbone_kwargs": {},
              "input_size": None,
              "pretrained": True,
              "weights": None,
              "num_centers": 20,
              "rank": 256,
              "depth": 1,
              "mlp_ratio": 4.0,
              "temperature": 1.0,
              "init": "paper",
              "dropout": 0.0},
    "train": {"mode": "cla",
              "batch_size": 8,
              "num_workers": "auto",
              "optimizer": "adam",
              "lr": 0.0001,
              "weight_decay": 0.001,
              "warmup_epochs": 2,
              "warmup_max_fraction": 0.25,
              "grad_accum": 1,
              "grad_clip": 0.0,
              "amp": True,
              "batchnorm": "auto",
              "batchnorm_min_batch": 32,
              "select_metric": "macro_f1",
              "select_ties": "earlier",
              "early_stopping": 0,
              "channels_last": False,
              "compile": False,
              "cache": {"views": None, "dtype": "float16", "storage": "memory", "dir": ".cladapter_cache"},
              "augment": {"hflip": True,
                          "vflip": True,
                          "brightness": 0.1,
                          "contrast": 0.1,
                          "color_p": 0.5,
                          "shift": 0.05,
                          "scale": 0.3,
                          "rotate": 180,
                          "affine_p": 0.7}},
    "stage1": {"epochs": 30},
    "stage2": {"epochs": 10, "lr_factor": 0.1},
    "evaluate": {"split": "test", "tsne": False},
    "tracking": {"experiment": None},
    "register": {"model_name": "cladapter-demo",
                 "metric": "macro_f1",
                 "margin": 0.0,
                 "confidence": 0.95,
                 "test": "bootstrap",
                 "auto_promote": False},
    "compare": {"head_lr": None, "backbone_lr": None, "lr_grid": 1, "lr_span": 10},
    "tune": {"study_name": "cladapter",
             "storage": "sqlite:///outputs/tune/optuna.db",
             "n_trials": 20,
             "timeout": None,
             "workers": 1,
             "seed": None,
             "startup_trials": 5,
             "pruner": "median",
             "pruner_startup_trials": 3,
             "pruner_warmup_steps": 2,
             "pruner_percentile": 25.0,
             "cache_views": None,
             "rerun_top": 3,
             "rerun_seeds": 3,
             "space": [{"param": "model.num_centers", "choices": [5, 10, 20, 30, 50]},
                       {"param": "stage1.epochs", "low": 10, "high": 50},
                       {"param": "stage2.epochs", "low": 0, "high": 20},
                       {"param": "train.lr", "low": 1e-05, "high": 0.001, "log": True},
                       {"param": "stage2.lr_factor", "choices": [0.03, 0.1, 0.3]}],
             "best_params": "outputs/tune/best_params.yaml",
             "use_best": False},
}

# What the demo's params.yaml shrinks (its "demo:" comments), and nothing else.
DEMO_SHRINKS = {
    "model.backbone": "test_vit", "model.backbone_kwargs": {"img_size": 32}, "model.pretrained": False,
    "model.rank": 32, "train.batch_size": 32, "train.lr": 0.002, "train.warmup_epochs": 1,
    "train.grad_clip": 1.0, "train.cache.views": 8,
    "train.augment": {"hflip": False, "vflip": False, "brightness": 0.1, "contrast": 0.1, "color_p": 1.0,
                      "shift": 0.0625, "scale": 0.1, "rotate": 15, "affine_p": 1.0},
    "stage1.epochs": 8, "stage2.epochs": 3, "register.auto_promote": True,
    "tune.space": [{"param": "model.num_centers", "choices": [5, 10, 20, 30, 50]},
                   {"param": "stage1.epochs", "low": 4, "high": 12},
                   {"param": "stage2.epochs", "low": 0, "high": 4},
                   {"param": "train.lr", "low": 0.0005, "high": 0.005, "log": True},
                   {"param": "stage2.lr_factor", "choices": [0.03, 0.1, 0.3]}],
}


def exactly(value) -> str:
    """JSON without sorting: equal strings mean the same keys in the same order and the
    same values of the same JSON types (4 and 4.0 differ, as do 1 and true)."""
    def plain(v):
        assert type(v) in (dict, list, str, int, float, bool, type(None)), (v, type(v))
        for child in (v.values() if isinstance(v, dict) else v if isinstance(v, list) else ()):
            plain(child)
    plain(value)
    return json.dumps(value)


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return path


def test_the_resolved_dict_is_the_one_of_before(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # no params.yaml here: load_params(None) and the default path
    demo = json.loads(exactly(SNAPSHOT))  # the demo's params.yaml: the paper's recipe, shrunk
    for dotted, value in DEMO_SHRINKS.items():
        *path, key = dotted.split(".")
        node = demo
        for part in path:
            node = node[part]
        assert node[key] != value, f"{dotted}: the demo does not shrink it"
        node[key] = value
    assert exactly(load_params(str(REPO / "params.yaml"))) == exactly(demo)
    assert exactly(load_params(None)) == exactly(SNAPSHOT)
    assert exactly(load_params()) == exactly(SNAPSHOT)
    assert exactly(defaults()) == exactly(SNAPSHOT)
    assert validate_params(defaults()) == []
    # a copy each time: a stage editing its dict does not change the defaults
    defaults()["model"]["backbone_kwargs"]["img_size"] = 64
    assert defaults()["model"]["backbone_kwargs"] == {}


def test_every_field_is_declared_with_help():
    def sections(model):
        yield model
        for f in model.model_fields.values():
            if isinstance(f.annotation, type) and issubclass(f.annotation, Section):
                yield from sections(f.annotation)
    seen = list(sections(Params))
    assert len(seen) == 13  # params, 10 sections, train.cache, train.augment
    for model in seen:
        assert model.__doc__ and model.model_config["extra"] == "forbid", model
        for name, f in model.model_fields.items():
            assert f.description, f"{model.__name__}.{name} has no help"


def test_numbers_as_people_write_them(tmp_path):
    # YAML 1.1 reads 1e-4 (no dot before the exponent) as the text "1e-4".
    assert yaml.safe_load("lr: 1e-4") == {"lr": "1e-4"}
    path = write(tmp_path, "train:\n  lr: 1e-4\n  weight_decay: 5E-5\nstage2:\n  lr_factor: '3e-1'\n"
                           "tune:\n  space:\n    - {param: train.lr, low: 1e-5, high: 1e-2, log: true}\n")
    p = load_params(path)
    assert (p["train"]["lr"], p["train"]["weight_decay"], p["stage2"]["lr_factor"]) == (1e-4, 5e-5, 0.3)
    assert all(type(v) is float for v in (p["train"]["lr"], p["train"]["weight_decay"]))
    assert p["tune"]["space"] == [{"param": "train.lr", "low": 1e-5, "high": 1e-2, "log": True}]
    # in -S flags too; a number written as an integer stays one
    p = load_params(None, ["train.lr=1e-4", "model.temperature=2", "train.augment.rotate=1e1"])
    assert p["train"]["lr"] == 1e-4 and type(p["train"]["lr"]) is float
    assert p["model"]["temperature"] == 2 and type(p["model"]["temperature"]) is int
    assert p["train"]["augment"]["rotate"] == 10.0
    # where an integer is expected, text is not one; nor is 2.0
    with pytest.raises(ParamsError) as err:
        load_params(None, ["stage1.epochs=1e1", "model.rank=2.0", "train.lr=fast"])
    text = str(err.value)
    assert text.startswith("defaults: 3 problem(s):")
    for line in ("stage1.epochs: must be an integer >= 0, got '1e1'",
                 "model.rank: must be an integer >= 1, got 2.0",
                 "train.lr: must be a number > 0, got 'fast'"):
        assert line in text, text


def test_booleans_are_strict(tmp_path):
    assert load_params(None, ["train.amp=no"])["train"]["amp"] is False  # YAML made it a bool
    path = write(tmp_path, "train:\n  amp: 'yes'\n  compile: 1\n")
    with pytest.raises(ParamsError) as err:
        load_params(path)
    assert str(err.value) == (f"{path}: 2 problem(s):\n"
                              "  train.amp: must be true or false, got 'yes'\n"
                              "  train.compile: must be true or false, got 1")


def test_every_problem_at_once_with_its_dotted_name_and_file(tmp_path):
    path = write(tmp_path, """\
seed: -1
data:
  folds: 3
  fold: 3
  resize: 4
model:
  num_centers: 0
  input_size: [0, 3]
  init: random
train:
  mode: adapters
  cache: {views: -1, storage: s3}
  augment: {rotation: 5}
evaluate: every
tracking: {experiment: '  '}
tune:
  pruner_percentile: 100
  space:
    - {param: model.nope, low: 1, high: 2}
    - {param: model.rank, choices: [8, 8]}
""")
    with pytest.raises(ParamsError) as err:
        load_params(path)
    lines = str(err.value).splitlines()
    assert lines[0] == f"{path}: 15 problem(s):"
    assert sorted(line.strip() for line in lines[1:]) == sorted([
        "train.augment.rotation: unknown parameter",
        "evaluate: must be a mapping, got 'every'",
        "seed: must be an integer >= 0, got -1",
        "data.fold: must be < data.folds (3), got 3",
        "data.resize: must be null or an integer >= 8, got 4",
        "model.num_centers: must be an integer >= 1, got 0",
        "model.input_size: must be null, H, [H, W] or [T, H, W], got [0, 3]",
        "model.init: must be one of paper, identity, got 'random'",
        "train.mode: must be one of cla, linear, linear-mean, full, lp-ft, got 'adapters'",
        "train.cache.views: must be null or an integer >= 0, got -1",
        "train.cache.storage: must be one of memory, disk, got 's3'",
        "tracking.experiment: must be null or a non-empty name, got '  '",
        "tune.pruner_percentile: must be a number > 0 and < 100, got 100",
        "tune.space[0] (model.nope): model.nope is not a parameter",
        "tune.space[1] (model.rank).choices: has duplicates: [8, 8]",
    ])
    # validate_params: the same lines for a dict, [] when it is valid
    assert validate_params({"model": {"rank": 0}}) == ["model.rank: must be an integer >= 1, got 0"]


def test_backbone_kwargs_is_a_free_mapping_replaced_whole_by_a_layer(tmp_path):
    path = write(tmp_path, "model:\n  backbone_kwargs: {img_size: 16, drop_rate: 0.1, extra: {a: [1, 2]}}\n")
    p = load_params(path)
    assert p["model"]["backbone_kwargs"] == {"img_size": 16, "drop_rate": 0.1, "extra": {"a": [1, 2]}}
    p = load_params(path, ["model.backbone_kwargs={patch_size: 8}"])
    assert p["model"]["backbone_kwargs"] == {"patch_size": 8}
    assert load_params(None, ["model.backbone_kwargs=null"])["model"]["backbone_kwargs"] is None
    with pytest.raises(ParamsError, match=r"model.backbone_kwargs: must be a mapping, got \[1\]"):
        load_params(None, ["model.backbone_kwargs=[1]"])


def test_params_do_not_import_tuning():
    code = ("import sys, cladapter_core.params as p; p.load_params(None); "
            "print(sorted(m for m in sys.modules if m.startswith(('cladapter_core.tune', 'optuna'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_each_parameter_is_declared_once():
    """param_models is the only declaration: the adapter's options are the `model:` fields
    themselves, and no function or table of the core states a params default again."""
    import ast
    import inspect

    from cladapter_core.model.adapter import AdapterBlock, ClusterAttention, CLAdapter
    from cladapter_core.model.config import AdapterConfig
    from cladapter_core.model import build_model, load_model
    from cladapter_core.param_models import ADAPTER_FIELDS, Model

    for name in ADAPTER_FIELDS:
        ours, declared = AdapterConfig.model_fields[name], Model.model_fields[name]
        assert (ours.default, ours.description, ours.metadata) == \
            (declared.default, declared.description, declared.metadata), name
    fields = {name for section in Params.model_fields.values()
              if isinstance(section.annotation, type) and issubclass(section.annotation, Section)
              for name in section.annotation.model_fields}
    for fn in (build_model, load_model, CLAdapter.__init__, ClusterAttention.__init__, AdapterBlock.__init__):
        redeclared = [name for name, p in inspect.signature(fn).parameters.items()
                      if name in fields and p.default is not inspect.Parameter.empty and name != "mode"]
        assert redeclared == [], f"{fn.__qualname__} declares defaults again: {redeclared}"
    # mode's default is train.mode's, read from the declaration
    assert inspect.signature(build_model).parameters["mode"].default == defaults()["train"]["mode"]
    tables = [f"{path.relative_to(REPO)}: {node.targets[0].id}"
              for path in (REPO / "cladapter_core").rglob("*.py")
              for node in ast.parse(path.read_text()).body
              if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)
              and node.targets[0].id.endswith("_DEFAULTS")]
    assert tables == []  # e.g. prepare's DATA_DEFAULTS, the transforms' AUGMENT_DEFAULTS

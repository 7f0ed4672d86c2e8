"""The `cladapter` command. Each subcommand reads params.yaml, lets flags override it
(`-S section.key=value`, or the named flags), and calls one stage function."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .errors import CLAdapterError
from .config import MODES
from .settings import export, settings, tracking_on

EPILOG = """Parameters: the subcommands that train, evaluate or register read --params (default
params.yaml, else the embedded defaults; --preset paper under it) and apply -S overrides, e.g.
-S model.num_centers=10 -S stage1.epochs=3; `cladapter COMMAND --help` lists each one's flags.
MLflow: runs go to $MLFLOW_TRACKING_URI (default sqlite:///mlflow.db); train, evaluate, tune,
sweep, compare and demo take --no-track. Start with your own data: cladapter init --source DIR."""


def _common(p: argparse.ArgumentParser, track: bool = False) -> None:
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    p.add_argument("--preset", help="a shipped parameter set under the params file, e.g. `paper` "
                                    "(the paper's recipe: cladapter_core/presets/paper.yaml)")
    p.add_argument("-S", "--set", dest="overrides", action="append", default=[],
                   metavar="KEY=VALUE", help="override a parameter, e.g. -S stage1.epochs=3")
    if track:
        p.add_argument("--no-track", action="store_true", help="do not log to MLflow")


def _device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", help="auto (default), cpu, cuda or cuda:N; also $CLADAPTER_DEVICE. auto "
                                    "stops when a GPU is present that torch cannot use (e.g. a driver "
                                    "too old): fix it, or run on the CPU with --device cpu")


MODEL_HELP = ("model folder, or a registered version: models:/<name>@<alias> (e.g. @champion) or "
              "models:/<name>/<version>, downloaded from $MLFLOW_TRACKING_URI's store")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="cladapter",
        description="CLAdapter: adapt foundation vision models to small scientific datasets "
                    "with a Cluster Attention Adapter and Staged Fine-Tuning.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    from . import __version__
    ap.add_argument("--version", action="version", version=f"cladapter {__version__}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in (_add_init, _add_demo_data, _add_prepare, _add_train, _add_evaluate, _add_predict, _add_compare,
                _add_sweep, _add_register, _add_promote, _add_lineage, _add_serve, _add_tune,
                _add_summary, _add_demo):
        add(sub)
    _add_plugins(sub)
    return ap


def _add_init(sub) -> None:
    p = sub.add_parser("init", help="look at your dataset and write a commented params.yaml for it",
                       description="Inspect a dataset (classes, counts, image sizes, channels, bit depth, "
                                   "value range) and write a params.yaml from the paper's recipe: a "
                                   "pretrained backbone at its native input size, flips, names from the "
                                   "dataset, data.resize for large images, intensity handling for 12/14-bit "
                                   "and float data, warnings for tiny classes. `dvc repro` runs on it as is.")
    p.add_argument("--source", required=True, help="ImageFolder tree (one folder per class) or CSV manifest")
    p.add_argument("--out", default="params.yaml", help="params file to write (default: params.yaml)")
    p.add_argument("--backbone", help="timm name (default: the paper's vit_base_patch16_clip_224.laion2b)")
    p.add_argument("--checkpoint", help="backbone weights file or s3:// URI (offline; else timm downloads)")
    p.add_argument("--no-pretrained", action="store_true", help="random backbone weights (a dry run)")
    p.add_argument("--stage-epochs", type=int, nargs=2, metavar=("STAGE1", "STAGE2"),
                   help="epochs of stage 1 and stage 2 (default: the preset's 30 and 10)")
    p.add_argument("--force", action="store_true", help="replace an existing --out")


def _add_demo_data(sub) -> None:
    p = sub.add_parser("demo-data", help="write the demo dataset (scikit-learn's handwritten digits as PNGs)",
                       description="Write scikit-learn's bundled handwritten digits (1797 real 8x8 scans, "
                                   "10 classes) as PNG files in an ImageFolder tree.")
    p.add_argument("--out", default="data/demo", help="output folder (default: data/demo)")
    p.add_argument("--per-class", type=int, help="only the first N scans of each digit (a small stand-in dataset)")


def _add_prepare(sub) -> None:
    p = sub.add_parser("prepare", help="validate a dataset, split it and write a manifest",
                       description="Decode and check every file, split train/val/test (stratified, "
                                   "seeded), detect leaks, write manifest.csv, classes.json, summary.json.")
    _common(p)
    p.add_argument("--source", help="ImageFolder tree, CSV manifest or 3D folder (default: data.source)")
    p.add_argument("--out", default="outputs/prepared", help="output folder (default: outputs/prepared)")
    p.add_argument("--skip-invalid", action="store_true", help="leave unreadable files out and report them")


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train one stage (Staged Fine-Tuning) or a baseline",
                       description="Stage 1 trains adapter + head on the frozen backbone; stage 2 "
                                   "starts from stage 1 (--init-from) with everything unfrozen at "
                                   "lr * stage2.lr_factor. Baselines: --mode linear | linear-mean | "
                                   "full | lp-ft. "
                                   "A checkpoint is written each epoch beside --out; an interrupted "
                                   "run (SIGTERM, crash) resumes from it when run again.")
    _common(p, track=True)
    p.add_argument("--stage", type=int, choices=(1, 2), default=1)
    p.add_argument("--mode", choices=MODES, help="default: train.mode")
    p.add_argument("--prepared", default="outputs/prepared", help="prepared dataset folder")
    p.add_argument("--out", help="model folder (default: outputs/stage<N>)")
    p.add_argument("--init-from", help="stage-1 model folder (stage 2; default: outputs/stage1)")
    p.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint")
    _device_arg(p)


def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="metrics, confusion matrix, curves, predictions, report.html",
                       description="Evaluate a model folder on a split of a prepared dataset.")
    _common(p, track=True)
    p.add_argument("--model", default="outputs/stage2", help=MODEL_HELP + " (default: outputs/stage2)")
    p.add_argument("--prepared", default="outputs/prepared")
    p.add_argument("--out", default="outputs/eval", help="output folder (default: outputs/eval)")
    p.add_argument("--split", choices=("train", "val", "test"), help="default: evaluate.split")
    p.add_argument("--tsne", action="store_true", help="also draw t-SNE of features with/without the adapter")
    _device_arg(p)


def _add_predict(sub) -> None:
    p = sub.add_parser("predict", help="class and probabilities for image/volume files or folders")
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("inputs", nargs="+", help="files or folders")
    p.add_argument("--out", default="predictions.csv", help="CSV to write (default: predictions.csv)")
    p.add_argument("--batch-size", type=int, default=32)
    _device_arg(p)


def _add_compare(sub) -> None:
    p = sub.add_parser("compare", help="baselines vs CLAdapter over seeds, on an equal budget",
                       description="Train every method on one dataset and backbone over several "
                                   "seeds with the same data, augmentation, epochs in all and seeds; "
                                   "the head's lr (compare.head_lr) for frozen backbones, the "
                                   "backbone's (compare.backbone_lr) for full fine-tuning and every "
                                   "stage 2. Print and write a table of macro-F1, the paper's F1 and "
                                   "accuracy (mean and spread), trainable parameters and wall time "
                                   "(cache builds included). Tuned values (tune.use_best) reach only "
                                   "the methods of the mode they were tuned for. MLflow: one parent "
                                   "run with the table and plot, a child run per method and seed.")
    _common(p, track=True)
    p.add_argument("--prepared", default="outputs/prepared")
    p.add_argument("--out", default="outputs/compare")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=None,
                   help="subset of: linear linear-mean full lp-ft cla-stage1 cla-sft")
    p.add_argument("--split", default="test", choices=("val", "test"), help="split scored (default: test)")
    _device_arg(p)


def _add_sweep(sub) -> None:
    p = sub.add_parser("sweep", help="sensitivity study: one parameter at several values over seeds",
                       description="Train one method (default cla-sft) for every value of one "
                                   "parameter and every seed, everything else fixed; write a table "
                                   "(mean ± std per value), a plot with error bars, CSV/JSON, and one "
                                   "MLflow parent run with a child per (value, seed). Rerunning skips "
                                   "finished cells. Example: cladapter sweep model.num_centers=5,10,20,30,50")
    _common(p, track=True)
    p.add_argument("grid", help="section.key=v1,v2,... (values read as YAML)")
    p.add_argument("--prepared", default="outputs/prepared")
    p.add_argument("--out", default="outputs/sweep")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--method", default="cla-sft", help="one of: linear linear-mean full lp-ft cla-stage1 cla-sft")
    p.add_argument("--split", default="val", choices=("val", "test"),
                   help="split scored (default: val; a study that picks a value must not look at test)")
    _device_arg(p)


def _add_register(sub) -> None:
    p = sub.add_parser("register", help="register a model in the MLflow registry as `challenger`",
                       description="Log the model (pyfunc) and its evaluation to MLflow and create "
                                   "a new version of register.model_name with alias `challenger`, "
                                   "tagged with its run, data hash and test metrics. Registering the "
                                   "same model again returns the existing version.")
    _common(p)
    p.add_argument("--model", default="outputs/stage2", help="model folder")
    p.add_argument("--eval", default="outputs/eval", help="evaluation folder (metrics.json)")
    p.add_argument("--out", help="also write the registration as JSON here")
    p.add_argument("--promote", action="store_true",
                   help="then run `promote` (also done when register.auto_promote is true)")
    p.add_argument("--prepared", help="the prepared data of --eval (re-evaluates a champion measured on other data)")


def _add_promote(sub) -> None:
    p = sub.add_parser("promote", help="move `champion` to the challenger if it is better",
                       description="Compare the challenger with the champion on register.metric; "
                                   "promote only when better by at least register.margin. The first "
                                   "model becomes champion. The decision is written on the version.")
    _common(p)
    p.add_argument("--dry-run", action="store_true", help="show the decision, change nothing")
    p.add_argument("--prepared", help="the challenger's prepared data: a champion measured on other data "
                                      "is re-evaluated on it before deciding")
    p.add_argument("--version", help="candidate version (default: the challenger)")
    p.add_argument("--out", help="also write the decision as JSON here")


def _add_lineage(sub) -> None:
    p = sub.add_parser("lineage", help="registered version -> run -> git commit, data hash, params")
    p.add_argument("model_uri", help="models:/<name>@<alias> or models:/<name>/<version>")
    p.add_argument("--json", action="store_true", help="print JSON")


def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="serve the champion over HTTP (`mlflow models serve`)",
                       description="Resolve models:/<register.model_name>@champion (or --model-uri) "
                                   "to its version, print which version serves, and run `mlflow "
                                   "models serve` on that version: POST /invocations with a column "
                                   "`image` of base64 PNG/JPEG/TIFF/BMP files (or a float32 tensor "
                                   "as `inputs`); each row gets `label` and `prob_<class>`. "
                                   "docs/serving.md has the request format.")
    _common(p)
    p.add_argument("--model-uri", help="models:/<name>@<alias> or models:/<name>/<version> "
                                       "(default: models:/<register.model_name>@champion), or a "
                                       "model folder (served without the registry)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: 127.0.0.1; 0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=5001, help="default: 5001")
    p.add_argument("--workers", type=int, default=1, help="server processes (default: 1)")
    p.add_argument("--env-manager", choices=("local", "uv", "virtualenv", "conda"), default="local",
                   help="local (default): serve in this environment; uv, virtualenv, conda: MLflow "
                        "first builds an environment from the model's requirements")
    p.add_argument("--dry-run", action="store_true", help="print the version and the command only")


def _add_tune(sub) -> None:
    p = sub.add_parser("tune", help="Optuna search over K, stage lengths and learning rates",
                       description="Search tune.space (params.yaml) for the best validation macro-F1 "
                                   "after Staged Fine-Tuning: TPE sampler, pruning of hopeless "
                                   "trials, one study shared by --workers processes (or by workers "
                                   "on many machines through a PostgreSQL storage) and resumed by "
                                   "name. Writes <out>/best_params.yaml, which training applies "
                                   "when tune.use_best is true (docs/tuning.md).")
    _common(p, track=True)
    p.add_argument("--prepared", default="outputs/prepared", help="prepared dataset folder")
    p.add_argument("--out", default="outputs/tune", help="results folder (default: outputs/tune)")
    p.add_argument("--n-trials", type=int, help="trials to run in all (default: tune.n_trials)")
    p.add_argument("--timeout", type=float, help="seconds per worker (default: tune.timeout)")
    p.add_argument("--workers", type=int, help="processes sharing the study (default: tune.workers)")
    p.add_argument("--study-name", help="study to create or resume (default: tune.study_name)")
    p.add_argument("--storage", help="Optuna storage URL (default: tune.storage)")
    p.add_argument("--only-if-used", action="store_true",
                   help="search only when tune.use_best is true; else write an empty best-params "
                        "file (dvc.yaml: training depends on the file, not on a search)")
    _device_arg(p)


def _add_summary(sub) -> None:
    p = sub.add_parser("summary", help="print the final metrics, registered version and how to browse runs",
                       description="Read what `dvc repro` produced (outputs/eval/metrics.json, "
                                   "outputs/registry.json) and print it.")
    p.add_argument("--out", default="outputs", help="output root (default: outputs)")


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="the whole flow in one process on the demo data",
                       description="demo-data, prepare, stage 1, stage 2, evaluate; prints the metrics.")
    _common(p, track=True)
    p.add_argument("--out", default="outputs", help="output root (default: outputs)")
    _device_arg(p)


# ---------------------------------------------------------------- command plugins

# Subcommands that live outside the core (`cladapter pipeline`, in pipelines/cli.py) are
# declared as entry points of this group in pyproject.toml:
#     [project.entry-points."cladapter.commands"]
#     pipeline = "pipelines.cli:register"
# The entry point's name is the command; its object is `register(subparsers) -> handler`,
# which adds the parser of that name and returns the function that runs it.
PLUGIN_GROUP = "cladapter.commands"
_HANDLER = "_cladapter_handler"  # the Namespace attribute holding a plugin command's handler


def _plugin_entry_points() -> list:
    from importlib.metadata import entry_points
    seen, eps = set(), []
    for ep in sorted(entry_points(group=PLUGIN_GROUP), key=lambda e: e.name):
        if ep.name not in seen:  # a distribution found twice on sys.path lists it twice
            seen.add(ep.name)
            eps.append(ep)
    return eps


def _add_plugins(sub) -> None:
    """Add every plugin command; one that fails is left out with a warning, the rest work."""
    for ep in _plugin_entry_points():
        before = set(sub.choices)
        try:
            handler = ep.load()(sub)
            if ep.name not in sub.choices or ep.name in before:
                raise RuntimeError(f"register() did not add a '{ep.name}' command")
            if not callable(handler):
                raise RuntimeError(f"register() returned {handler!r}, not the command's handler")
        except Exception as exc:  # noqa: BLE001 - a broken plugin must not break the CLI
            _drop_commands(sub, set(sub.choices) - before)
            print(f"cladapter: warning: command plugin '{ep.name}' ({ep.value}, entry point group "
                  f"{PLUGIN_GROUP}) failed to load and is left out: {type(exc).__name__}: {exc}",
                  file=sys.stderr)
            continue
        sub.choices[ep.name].set_defaults(**{_HANDLER: handler})


def _drop_commands(sub, names) -> None:
    """Take half-added subcommands of a failed plugin back out of the parser and its help."""
    for name in names:
        sub.choices.pop(name, None)
    sub._choices_actions[:] = [a for a in sub._choices_actions if a.dest not in names]


def _load(args, use_best=None):
    from .params import load_params
    return load_params(args.params, args.overrides, use_best=use_best, preset=getattr(args, "preset", None))


def _print_metrics(metrics: dict, title: str) -> None:
    print(title)
    for k in ("accuracy", "macro_f1", "f1_macro_pr", "macro_precision", "macro_recall", "weighted_f1", "roc_auc"):
        if k in metrics:
            print(f"  {k:<16} {metrics[k]:.4f}")


def cmd_init(args):
    from .init_params import init
    found = init(args.source, args.out, backbone=args.backbone, pretrained=not args.no_pretrained,
                 checkpoint=args.checkpoint, stage_epochs=args.stage_epochs, force=args.force)
    print(f"{args.out}: {len(found['classes'])} classes, {sum(found['counts'].values())} files "
          f"(sampled {found['sampled']}), sizes {found['size_min']} to {found['size_max']}, "
          f"intensity range {found['intensity'].get('range') or 'of the file type'}")
    for w in found["warnings"]:
        print(f"  warning: {w}")
    print(f"next: dvc repro   (or: cladapter prepare --params {args.out})")


def cmd_demo_data(args):
    from .data import make_demo_data
    out = make_demo_data(args.out, per_class=args.per_class)
    print(f"demo dataset in {out}")


def cmd_prepare(args):
    from .data import prepare
    params = _load(args)
    if args.skip_invalid:
        params["data"]["skip_invalid"] = True
    summary = prepare(args.source or params["data"]["source"], args.out, params)
    counts = summary.get("split_counts") or summary.get("counts", {})
    print(f"prepared {args.out}: {json.dumps(counts, sort_keys=True)}")
    for key in ("skipped", "leaks"):
        if summary.get(key):
            print(f"  {key}: {len(summary[key])} (see {args.out}/summary.json)")


def _use_device(args) -> str | None:
    """--device, checked before any work (a GPU torch cannot use stops here, saying so) and
    handed on through $CLADAPTER_DEVICE to what this command spawns (tuning workers)."""
    from .distributed import pick_device, requested_device
    if getattr(args, "device", None):
        export(device=requested_device(args.device))
    pick_device(getattr(args, "device", None))
    return getattr(args, "device", None)


def _model_folder(model: str):
    """The model folder of --model: a folder as given; a models:/ URI downloaded from the
    store, which must exist (`tracking.check_tracking(existing=True)`)."""
    from . import registry, tracking
    if not registry.is_model_uri(model):
        return model
    import mlflow
    mlflow.set_tracking_uri(tracking.check_tracking(existing=True))
    folder, mv = registry.resolve_model(model)
    print(f"{model} is {mv['name']} version {mv['version']} (run {mv['run_id']}): {folder}")
    return folder


def _tracked(args, params, stage_name, name=None):
    """MLflow run context for a stage, or a no-op when tracking is off. Its `data_hash`
    tag is that of the stage's prepared folder (`--prepared`), as in the KFP steps; `name`:
    the run's name (default `tracking.run_name`)."""
    from contextlib import nullcontext
    if not tracking_on(not getattr(args, "no_track", False)):
        return nullcontext(None), []
    from . import tracking
    tracking.check_tracking()
    return (tracking.stage_run(params, stage_name, prepared=getattr(args, "prepared", None), name=name),
            [tracking.EpochLogger()])


def cmd_train(args):
    from .train import train
    params = _load(args)
    mode = args.mode or params["train"]["mode"]
    out = args.out or f"outputs/stage{args.stage}"
    init_from = args.init_from or ("outputs/stage1" if args.stage == 2 else None)
    device = _use_device(args)
    from .tracking import run_name
    stage = f"train_stage{args.stage}"
    ctx, callbacks = _tracked(args, params, stage, run_name(params, stage, mode=mode, prepared=args.prepared))
    with ctx as run:
        summary = train(params, args.prepared, out, stage=args.stage, mode=mode, init_from=init_from,
                        resume=not args.no_resume, callbacks=callbacks, device=device)
        if run is not None:
            from . import tracking
            tracking.log_artifacts_dir(out, "model_dir")
    print(f"stage {args.stage} ({mode}) -> {out}: best epoch {summary['best_epoch']}, "
          f"val {summary['select_metric']} {summary['best_value']}")


def cmd_evaluate(args):
    from .evaluate import evaluate
    params = _load(args)
    if args.split:
        params["evaluate"]["split"] = args.split
    if args.tsne:
        params["evaluate"]["tsne"] = True
    device = _use_device(args)
    model = _model_folder(args.model)
    from . import tracking
    ctx, _ = _tracked(args, params, "evaluate", tracking.run_name(params, "evaluate", model_dir=model,
                                                                  prepared=args.prepared))
    with ctx as run:
        if run is not None and model != args.model:  # a registered version: say which
            import mlflow
            with tracking.errors("tagging the evaluate run with its model"):
                mlflow.set_tag("cladapter.model_uri", args.model)
        metrics = evaluate(model, args.prepared, args.out, params, device=device)
        if run is not None:
            tracking.log_evaluation(args.out, metrics, split=params["evaluate"]["split"],
                                    prepared=args.prepared, params=params)
    _print_metrics(metrics, f"{params['evaluate']['split']} metrics ({args.out}/metrics.json):")


def cmd_predict(args):
    from .evaluate import predict
    device = _use_device(args)
    rows = predict(_model_folder(args.model), args.inputs, args.out, batch_size=args.batch_size,
                   device=device)
    print(f"{len(rows)} predictions -> {args.out}")


def cmd_compare(args):
    from .compare import compare
    from .params import flatten, read_best_params
    params = _load(args, use_best=False)  # tuned values go only to the method they were tuned for
    _use_device(args)
    tuned = None
    if params["tune"]["use_best"] and Path(params["tune"]["best_params"]).is_file():
        tuned = flatten(read_best_params(params["tune"]["best_params"]))
        print(f"compare: tuned values from {params['tune']['best_params']} apply to train.mode "
              f"{params['train']['mode']!r} only: {', '.join(sorted(tuned)) or 'none'}")
    compare(params, args.prepared, args.out, seeds=args.seeds, methods=args.methods, split=args.split,
            tuned=tuned, tuned_for=params["train"]["mode"], track=_tracking_on(args))


def _tracking_on(args) -> bool:
    """Log to MLflow unless --no-track or CLADAPTER_TRACKING=0; fail fast if the server is down."""
    track = tracking_on(not args.no_track)
    if track:
        from . import tracking
        tracking.check_tracking()
    return track


def cmd_sweep(args):
    from .sweep import parse_grid, sweep
    params = _load(args)
    name, values = parse_grid(args.grid)
    _use_device(args)
    sweep(params, args.prepared, args.out, name, values, seeds=args.seeds, method=args.method,
          split=args.split, track=_tracking_on(args))


def cmd_demo(args):
    from .data import make_demo_data, prepare
    from .evaluate import evaluate
    from .train import train
    params = _load(args)
    _use_device(args)
    root = Path(args.out)
    make_demo_data(params["data"]["source"])
    prepare(params["data"]["source"], root / "prepared", params)
    for stage in (1, 2):
        train(params, root / "prepared", root / f"stage{stage}", stage=stage, mode="cla",
              init_from=root / "stage1" if stage == 2 else None)
    metrics = evaluate(root / "stage2", root / "prepared", root / "eval", params)
    _print_metrics(metrics, f"test metrics ({root / 'eval' / 'metrics.json'}):")
    print(f"report: {root / 'eval' / 'report.html'}")


def _write_json(path, obj) -> None:
    from .outputs import atomic_write
    if path:
        atomic_write(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def cmd_register(args):
    from . import identity, registry, tracking
    params = _load(args)
    tracking.check_tracking()
    data_hash = identity.data_hash(args.prepared) if args.prepared else None
    reg = registry.register(args.model, args.eval, params, data_hash=data_hash)
    state = "registered" if reg["created"] else "already registered"
    print(f"{state}: {reg['name']} version {reg['version']} (aliases: {', '.join(reg['aliases'])}; "
          f"run {reg['run_id']})")
    result = {"registration": reg}
    if args.promote or params["register"]["auto_promote"]:
        result["promotion"] = prom = _promote(params, False, None, args.prepared)
        if str(prom["champion_after"]) == str(reg["version"]) and "champion" not in reg["aliases"]:
            reg["aliases"] = sorted([*reg["aliases"], "champion"])
    _write_json(args.out, result)


def _promote(params, dry_run, version, prepared=None):
    from . import registry
    res = registry.promote(params, dry_run=dry_run, version=version, prepared_dir=prepared)
    what = "would be" if dry_run else "is now"
    print(f"promotion of {res['model_name']} v{res['candidate']} ({res['metric']} "
          f"{res['candidate_value']}): {res['decision']} - {res['reason']}")
    print(f"champion {what}: v{res['champion_after']}")
    return res


def cmd_promote(args):
    from . import tracking
    params = _load(args)
    tracking.check_tracking(existing=True)  # reads the registry: never create an empty store
    _write_json(args.out, _promote(params, args.dry_run, args.version, args.prepared))


def cmd_lineage(args):
    import mlflow

    from . import registry, tracking
    mlflow.set_tracking_uri(tracking.check_tracking(existing=True))
    info = registry.lineage(args.model_uri)
    print(json.dumps(info, indent=2, sort_keys=True, default=str) if args.json
          else registry.format_lineage(info))


def cmd_serve(args):
    import shlex

    import mlflow

    from . import registry, serving, tracking
    params = _load(args)
    # `mlflow models serve` starts `uvicorn` from PATH: this environment's, also unactivated.
    export(path=os.pathsep.join([str(Path(sys.executable).parent), settings().path]))
    wanted = args.model_uri or f"models:/{params['register']['model_name']}@champion"
    if registry.is_model_uri(wanted):
        uri = tracking.check_tracking(existing=True)  # reads the registry: never create a store
        mlflow.set_tracking_uri(uri)
        export(mlflow_tracking_uri=uri)  # the server resolves the model from the same store
        mv = registry.lineage(wanted)["model"]
        served = mv["model_uri"]
        metrics = ", ".join(f"{k}={v:.4f}" for k, v in sorted(mv["metrics"].items()))
        print(f"{wanted} is {mv['name']} version {mv['version']} (run {mv['run_id']}"
              f"{'; ' + metrics if metrics else ''})")
    else:
        served = str(_pyfunc_of_folder(wanted))
        print(f"{wanted} is a model folder, served as the MLflow model {served} (not registered)")
    cmd = serving.serve_command(served, args.host, args.port, args.workers, args.env_manager)
    print(f"serving {served} on http://{args.host}:{args.port}/invocations")
    print("$ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    if not args.dry_run:
        os.execv(cmd[0], cmd)  # the server replaces this process: signals reach it directly


def _pyfunc_of_folder(folder) -> Path:
    """The self-contained MLflow model of a model folder (as `register` logs it), saved once
    under the model cache, keyed by the folder's content."""
    from . import identity, registry, tracking
    from .errors import CLAdapterError as Err
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise Err(f"--model-uri {folder}: neither models:/<name>@<alias>, models:/<name>/<version> "
                  "nor a model folder (config.json + model.safetensors)")
    path = registry.model_cache_dir() / f"folder-{identity.content_hash(folder)[:16]}"
    if not (path / "MLmodel").is_file():
        import shutil
        shutil.rmtree(path, ignore_errors=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        tracking.save_pyfunc(folder, path)
    return path


def cmd_tune(args):
    from .params import load_params
    from .tune import BEST_FILE, tune, write_best_params
    # The search starts from params.yaml alone: its own earlier result is not applied.
    params = load_params(args.params, args.overrides, use_best=False)
    t = params["tune"]
    for key, value in (("n_trials", args.n_trials), ("timeout", args.timeout), ("workers", args.workers),
                       ("study_name", args.study_name), ("storage", args.storage)):
        if value is not None:
            t[key] = value
    from .params import validate_params
    problems = [line for line in validate_params(params) if line.startswith("tune.")]
    if problems:
        raise CLAdapterError("bad tuning options:\n  " + "\n  ".join(problems))
    _use_device(args)
    if args.only_if_used and not t["use_best"]:
        path = write_best_params(Path(args.out) / BEST_FILE, {},
                                 "Tuning is off (tune.use_best: false): no tuned values.")
        print(f"tune.use_best is false: no search; wrote an empty {path}")
        return
    track = _tracking_on(args)
    import optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # one line per trial is printed instead
    tune(params, args.prepared, args.out, track=track)


def cmd_summary(args):
    from .errors import CLAdapterError as Err
    root = Path(args.out)
    metrics_path, reg_path = root / "eval" / "metrics.json", root / "registry.json"
    if not metrics_path.is_file():
        raise Err(f"{metrics_path}: not found; run `dvc repro` (or `make demo`) first")
    _print_metrics(json.loads(metrics_path.read_text()), f"test metrics ({metrics_path}):")
    if reg_path.is_file():
        reg = json.loads(reg_path.read_text())
        r, pr = reg.get("registration", {}), reg.get("promotion")
        print(f"registered model: {r.get('name')} version {r.get('version')} "
              f"(aliases: {', '.join(r.get('aliases') or []) or 'none'})")
        if pr:
            print(f"promotion: {pr['decision']} - {pr['reason']}; champion is v{pr['champion_after']}")
    report = root / "eval" / "report.html"
    if report.is_file():
        print(f"report: {report}")
    uri = settings().tracking_uri
    print(f"browse the runs: .venv/bin/mlflow ui --backend-store-uri {uri}  (then open http://127.0.0.1:5000)")


COMMANDS = {"init": cmd_init, "summary": cmd_summary, "register": cmd_register, "promote": cmd_promote, "lineage": cmd_lineage,
            "demo-data": cmd_demo_data, "prepare": cmd_prepare, "train": cmd_train,
            "evaluate": cmd_evaluate, "predict": cmd_predict, "compare": cmd_compare,
            "demo": cmd_demo, "tune": cmd_tune, "serve": cmd_serve, "sweep": cmd_sweep}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from .console import configure
    from .train import Preempted
    configure()  # the library's log lines: plain on a terminal, with time and level in logs
    try:
        (COMMANDS.get(args.command) or getattr(args, _HANDLER))(args)
    except Preempted as e:
        # 143 = killed by SIGTERM: schedulers (KFP retries, DVC) see an interrupted step.
        print(f"cladapter {args.command}: {e}", file=sys.stderr)
        return 143
    except CLAdapterError as e:
        print(f"cladapter {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cladapter {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

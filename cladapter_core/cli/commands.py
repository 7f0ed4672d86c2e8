"""The handlers of the data, training, evaluation and search subcommands: each maps its
flags to one library call and prints what a person needs to see."""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import CLAdapterError
from ..settings import export, tracking_on


def _load(args, use_best=None):
    from ..params import load_params
    return load_params(args.params, args.overrides, use_best=use_best, preset=getattr(args, "preset", None))


def _print_metrics(metrics: dict, title: str) -> None:
    print(title)
    for k in ("accuracy", "macro_f1", "f1_macro_pr", "macro_precision", "macro_recall", "weighted_f1", "roc_auc"):
        if k in metrics:
            print(f"  {k:<16} {metrics[k]:.4f}")


def cmd_init(args):
    from ..init_params import init
    found = init(args.source, args.out, backbone=args.backbone, pretrained=not args.no_pretrained,
                 weights=args.weights, stage_epochs=args.stage_epochs, force=args.force)
    print(f"{args.out}: {len(found['classes'])} classes, {sum(found['counts'].values())} files "
          f"(sampled {found['sampled']}), sizes {found['size_min']} to {found['size_max']}, "
          f"intensity range {found['intensity'].get('range') or 'of the file type'}")
    for w in found["warnings"]:
        print(f"  warning: {w}")
    print(f"next: dvc repro   (or: cladapter prepare --params {args.out})")


def cmd_demo_data(args):
    from ..data import make_demo_data
    out = make_demo_data(args.out, per_class=args.per_class)
    print(f"demo dataset in {out}")


def cmd_mirror_weights(args):
    from ..errors import ParamsError
    from ..model.backbones import mirror_weights
    if args.from_file and len(args.backbone) > 1:
        raise ParamsError("mirror-weights: --from-file holds the weights of one backbone; name one")
    for name in args.backbone:
        print(f"{name}: {mirror_weights(name, args.to, source=args.from_file)}")


def cmd_prepare(args):
    from ..data import prepare
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
    from ..distributed import pick_device, requested_device
    if getattr(args, "device", None):
        export(device=requested_device(args.device))
    pick_device(getattr(args, "device", None))
    return getattr(args, "device", None)


def _model_folder(model: str):
    """The model folder of --model: a folder as given; a models:/ URI downloaded from the
    store, which must exist (`tracking.check_tracking(existing=True)`)."""
    from .. import registry, tracking
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
    from .. import tracking
    tracking.check_tracking()
    return (tracking.stage_run(params, stage_name, prepared=getattr(args, "prepared", None), name=name),
            [tracking.EpochLogger()])


def cmd_train(args):
    from ..training import train
    params = _load(args)
    mode = args.mode or params["train"]["mode"]
    out = args.out or f"outputs/stage{args.stage}"
    init_from = args.init_from or ("outputs/stage1" if args.stage == 2 else None)
    device = _use_device(args)
    from ..tracking import run_name
    stage = f"train_stage{args.stage}"
    ctx, callbacks = _tracked(args, params, stage, run_name(params, stage, mode=mode, prepared=args.prepared))
    with ctx as run:
        summary = train(params, args.prepared, out, stage=args.stage, mode=mode, init_from=init_from,
                        resume=not args.no_resume, callbacks=callbacks, device=device)
        if run is not None:
            from .. import tracking
            tracking.log_artifacts_dir(out, "model_dir")
    print(f"stage {args.stage} ({mode}) -> {out}: best epoch {summary['best_epoch']}, "
          f"val {summary['select_metric']} {summary['best_value']}")


def cmd_evaluate(args):
    from ..evaluation.evaluate import evaluate
    params = _load(args)
    if args.split:
        params["evaluate"]["split"] = args.split
    if args.tsne:
        params["evaluate"]["tsne"] = True
    device = _use_device(args)
    model = _model_folder(args.model)
    from .. import tracking
    ctx, _ = _tracked(args, params, "evaluate", tracking.run_name(params, "evaluate", model_dir=model,
                                                                  prepared=args.prepared))
    with ctx as run:
        if run is not None and model != args.model:  # a registered version: say which
            import mlflow
            with tracking.errors("tagging the evaluate run with its model"):
                mlflow.set_tag("cladapter.model_uri", tracking.redact(args.model))
        metrics = evaluate(model, args.prepared, args.out, params, device=device)
        if run is not None:
            tracking.log_evaluation(args.out, metrics, split=params["evaluate"]["split"],
                                    prepared=args.prepared, params=params)
    _print_metrics(metrics, f"{params['evaluate']['split']} metrics ({args.out}/metrics.json):")


def cmd_predict(args):
    from ..evaluation.evaluate import predict
    device = _use_device(args)
    rows = predict(_model_folder(args.model), args.inputs, args.out, batch_size=args.batch_size,
                   device=device)
    print(f"{len(rows)} predictions -> {args.out}")


def cmd_compare(args):
    from ..experiments.compare import compare
    from ..params import flatten, read_best_params
    params = _load(args, use_best=False)  # tuned values: to every method alike, below
    _use_device(args)
    tuned = None
    if params["tune"]["use_best"] and Path(params["tune"]["best_params"]).is_file():
        tuned = flatten(read_best_params(params["tune"]["best_params"]))
        print(f"compare: tuned values from {params['tune']['best_params']} apply to every method "
              f"that has the parameter (epochs: to every row): {', '.join(sorted(tuned)) or 'none'}")
    compare(params, args.prepared, args.out, seeds=args.seeds, methods=args.methods, split=args.split,
            tuned=tuned, track=_tracking_on(args),
            staged_selection=args.staged_selection, bootstrap=args.bootstrap, confidence=args.confidence)


def _tracking_on(args) -> bool:
    """Log to MLflow unless --no-track or CLADAPTER_TRACKING=0; fail fast if the server is down."""
    track = tracking_on(not args.no_track)
    if track:
        from .. import tracking
        tracking.check_tracking()
    return track


def cmd_sweep(args):
    from ..experiments.sweep import parse_grid, sweep
    params = _load(args)
    name, values = parse_grid(args.grid)
    _use_device(args)
    sweep(params, args.prepared, args.out, name, values, seeds=args.seeds, method=args.method,
          split=args.split, track=_tracking_on(args), staged_selection=args.staged_selection,
          confidence=args.confidence)


def cmd_demo(args):
    from ..data import make_demo_data, prepare
    from ..evaluation.evaluate import evaluate
    from ..training import train
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


def cmd_tune(args):
    from ..params import load_params
    from ..tune import BEST_FILE, tune, write_best_params
    # The search starts from params.yaml alone: its own earlier result is not applied.
    params = load_params(args.params, args.overrides, use_best=False)
    t = params["tune"]
    for key, value in (("n_trials", args.n_trials), ("timeout", args.timeout), ("workers", args.workers),
                       ("study_name", args.study_name), ("storage", args.storage)):
        if value is not None:
            t[key] = value
    from ..params import validate_params
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



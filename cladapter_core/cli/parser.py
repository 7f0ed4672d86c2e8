"""The `cladapter` argument parser: every subcommand, its flags and its help."""
from __future__ import annotations

import argparse

from ..param_models import MODES
from .plugins import add_plugins

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
    from .. import __version__
    ap.add_argument("--version", action="version", version=f"cladapter {__version__}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in (_add_init, _add_demo_data, _add_prepare, _add_train, _add_evaluate, _add_predict, _add_compare,
                _add_sweep, _add_register, _add_promote, _add_lineage, _add_verify_model, _add_serve, _add_tune,
                _add_summary, _add_demo, _add_mirror_weights):
        add(sub)
    add_plugins(sub)
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
    p.add_argument("--weights", help="backbone weights file or s3:// URI (offline; else timm downloads)")
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


def _add_mirror_weights(sub) -> None:
    p = sub.add_parser("mirror-weights",
                       help="put pretrained backbone weights in the install's mirror (offline clusters)",
                       description="Write <backbone>.safetensors to a weights mirror (an s3:// prefix or a "
                                   "folder). Steps with $CLADAPTER_WEIGHTS_MIRROR set read pretrained weights "
                                   "there instead of downloading them. Without --from-file the weights are "
                                   "downloaded as timm or torchvision would (needs internet).")
    p.add_argument("backbone", nargs="+", help="timm name with its pretrained tag "
                                               "(vit_base_patch16_clip_224.laion2b) or a torchvision video model")
    p.add_argument("--to", required=True, help="the mirror: s3://bucket/prefix or a folder")
    p.add_argument("--from-file", help="a checkpoint you have (path, file:// or s3://) instead of downloading; "
                                       "one backbone only")


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
                                   "accuracy (mean ± std [95 % CI] over seeds), trainable parameters and "
                                   "wall time (the run order rotates per seed), every method against the "
                                   "best baseline paired on seeds (paired t, Holm) and a verdict per pair "
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
    _evidence_args(p)
    p.add_argument("--bootstrap", type=int, default=0, metavar="N",
                   help="also resample the scored images N times per comparison (e.g. 2000; default 0: off)")
    _device_arg(p)


def _evidence_args(p) -> None:
    p.add_argument("--confidence", type=float, default=0.95, help="of the intervals and tests (default 0.95)")
    p.add_argument("--no-staged-selection", dest="staged_selection", action="store_false",
                   help="score a staged method's stage-2 model even when stage 1 was better on validation")


def _add_sweep(sub) -> None:
    p = sub.add_parser("sweep", help="sensitivity study: one parameter at several values over seeds",
                       description="Train one method (default cla-sft) for every value of one "
                                   "parameter and every seed, everything else fixed; write a table "
                                   "(mean ± std [95 % CI] per value, each value against the best paired on "
                                   "seeds, a verdict per pair), a plot with intervals, CSV/JSON, and one "
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
    _evidence_args(p)
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
                       description="Compare the challenger with the champion on register.metric, on "
                                   "the same validation images; promote only when better by more than "
                                   "register.margin AND by a paired test on both models' per-image "
                                   "predictions (register.test: bootstrap or mcnemar) at "
                                   "register.confidence. A champion is never scored on images it was "
                                   "trained on. The first model becomes champion. The decision, its "
                                   "test and numbers are written on the version.")
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


def _add_verify_model(sub) -> None:
    p = sub.add_parser("verify-model", help="check a registered version's files against its registration record",
                       description="Download models:/<name>@<alias> or models:/<name>/<version>, check every "
                                   "file (code, MLmodel, requirements, environment files, weights, config) "
                                   "against the sha256 manifest recorded when it was registered, and exit 2 "
                                   "naming each file changed, added or removed. With --out, the verified copy "
                                   "is placed there for a server to load (docs/serving.md).")
    p.add_argument("model_uri", help="models:/<name>@<alias> or models:/<name>/<version>")
    p.add_argument("--out", help="a new (or empty) folder to place the verified MLflow model in")


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

"""`report.html`: one self-contained page per evaluation.

Images are embedded as base64 data URIs so the file works on its own when logged to
MLflow, attached to a KFP run or downloaded. All text is escaped.
"""
from __future__ import annotations

import base64
import math
from datetime import datetime, timezone
from html import escape
from importlib import resources
from pathlib import Path
from string import Template

# Order and labels of the headline metrics.
METRIC_LABELS = {
    "accuracy": "Accuracy", "macro_f1": "Macro F1 (mean of per-class F1)",
    "f1_macro_pr": "F1 of macro P and R (the paper's F1: 2PR/(P+R))",
    "macro_precision": "Macro precision",
    "macro_recall": "Macro recall", "weighted_f1": "Weighted F1",
    "weighted_precision": "Weighted precision", "weighted_recall": "Weighted recall",
    "roc_auc": "ROC AUC (one-vs-rest)", "loss": "Cross-entropy loss", "n_samples": "Samples",
}
CARDS = ("accuracy", "macro_f1", "f1_macro_pr", "roc_auc", "n_samples")
PARAM_LABELS = {"total": "Total", "backbone": "Backbone", "adapter": "Adapter (CLAdapter)",
                "head": "Head", "trainable_stage1": "Trainable in stage 1 (backbone frozen)",
                "trainable_stage2": "Trainable in stage 2 (everything)"}


def fmt_metric(name: str, value) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if name == "n_samples":
        return f"{int(value):,}"
    return f"{float(value):.4f}"


def data_uri(png: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(png).read_bytes()).decode("ascii")


def _figure(png: Path, alt: str, caption: str = "") -> str:
    cap = f"<figcaption>{escape(caption)}</figcaption>" if caption else ""
    return f'<figure><img src="{data_uri(png)}" alt="{escape(alt)}">{cap}</figure>'


def _section(section_id: str, title: str, body: str) -> str:
    return f'<section id="{escape(section_id)}">\n<h2>{escape(title)}</h2>\n{body}\n</section>'


def _metrics_section(metrics: dict) -> str:
    cards = "".join(
        f'<div class="card"><div class="value">{escape(fmt_metric(k, metrics.get(k)))}</div>'
        f'<div class="name">{escape(METRIC_LABELS[k])}</div></div>'
        for k in CARDS if k in metrics or k == "roc_auc")
    names = [k for k in METRIC_LABELS if k in metrics or k == "roc_auc"]
    names += sorted(k for k in metrics if k not in METRIC_LABELS)
    rows = "".join(
        f'<tr data-metric="{escape(k)}"><td>{escape(METRIC_LABELS.get(k, k))}</td>'
        f'<td class="num">{escape(fmt_metric(k, metrics.get(k)))}</td></tr>' for k in names)
    table = (f'<table id="metrics-table"><thead><tr><th>metric</th><th class="num">value</th></tr>'
             f'</thead><tbody>{rows}</tbody></table>')
    note = ""
    if "roc_auc" not in metrics:
        note = ('<p class="note">ROC AUC is undefined here: some class has no sample in the '
                'evaluated split.</p>')
    return _section("metrics", "Metrics", f'<div class="cards">{cards}</div>{table}{note}')


def _params_section(report: dict) -> str:
    total = report.get("total") or 0
    rows = ""
    for key, label in PARAM_LABELS.items():
        if key not in report:
            continue
        share = f"{100.0 * report[key] / total:.2f} %" if total else "n/a"
        rows += (f'<tr data-param="{escape(key)}"><td>{escape(label)}</td>'
                 f'<td class="num">{int(report[key]):,}</td><td class="num">{escape(share)}</td></tr>')
    overhead = report.get("adapter_overhead_pct")
    if overhead is not None:
        rows += (f'<tr class="summary" data-param="adapter_overhead_pct"><td>Adapter overhead '
                 f'(adapter / backbone)</td><td class="num">{float(overhead):.2f} %</td><td></td></tr>')
    table = (f'<table id="param-table"><thead><tr><th>part</th><th class="num">parameters</th>'
             f'<th class="num">share of total</th></tr></thead><tbody>{rows}</tbody></table>')
    return _section("parameters", "Parameters", table)


def _per_class_section(per_class: dict, class_names: list[str]) -> str:
    head = ('<tr><th>class</th><th class="num">precision</th><th class="num">recall</th>'
            '<th class="num">F1</th><th class="num">support</th></tr>')
    rows = ""
    names = [c for c in class_names if c in per_class]
    names += [k for k in ("macro avg", "weighted avg") if k in per_class]
    for name in names:
        r = per_class[name]
        cls = ' class="summary"' if name in ("macro avg", "weighted avg") else ""
        rows += (f'<tr{cls}><td>{escape(name)}</td>'
                 + "".join(f'<td class="num">{float(r[k]):.4f}</td>' for k in ("precision", "recall", "f1-score"))
                 + f'<td class="num">{int(r["support"]):,}</td></tr>')
    if "accuracy" in per_class:
        rows += (f'<tr class="summary"><td>accuracy</td><td></td><td></td>'
                 f'<td class="num">{float(per_class["accuracy"]):.4f}</td><td></td></tr>')
    return _section("per-class", "Per-class report",
                    f'<table id="per-class-table"><thead>{head}</thead><tbody>{rows}</tbody></table>')


def render_report(config: dict, metrics: dict, param_report: dict, per_class: dict,
                  images: dict[str, Path | None], info: dict) -> str:
    """The HTML text. `images`: confusion / curves / tsne -> PNG path or None;
    `info`: split, model_dir, prepared_dir, notes (list of str), train_summary (dict)."""
    mode = config.get("mode", "?")
    backbone = config.get("backbone", "?")
    model_name = info.get("model_name") or Path(str(info.get("model_dir", "model"))).name
    title = f"Evaluation of {model_name}: {backbone}"
    tags = [f"mode: {mode}", f"split: {info.get('split', '?')}",
            f"classes: {config.get('num_classes', '?')}"]
    if mode == "cla":
        tags[1:1] = [f"K = {config.get('num_centers', '?')}", f"rank = {config.get('rank', '?')}",
                     f"adapter depth = {config.get('depth', '?')}"]
    subtitle = (f"Model directory {info.get('model_dir', '?')}; data {info.get('prepared_dir', '?')}; "
                f"input size {config.get('input_size', '?')}")

    sections = [_metrics_section(metrics)]
    if images.get("confusion"):
        sections.append(_section("confusion", "Confusion matrix", '<div class="narrow">' + _figure(
            images["confusion"], "confusion matrix",
            "Rows: true class; columns: predicted class; colour: share of the true class.") + "</div>"))
    if images.get("curves"):
        curves = _figure(images["curves"], "training curves",
                         "From the model's history.json; the background marks the training stage.")
    else:
        curves = ('<p class="note">No training history (history.json) in the model directory, '
                  'so no training curves.</p>')
    sections.append(_section("curves", "Training curves", curves))
    if images.get("tsne"):
        cap = ("t-SNE of pooled features without (backbone tokens, mean-pooled) and with the "
               "CLAdapter" if mode == "cla" else "t-SNE of the backbone's pooled features")
        sections.append(_section("tsne", "Feature space (t-SNE)", _figure(images["tsne"], "t-SNE", cap)))
    sections.append(_params_section(param_report))
    sections.append(_per_class_section(per_class, list(config.get("class_names", []))))
    summary = info.get("train_summary") or {}
    if summary:
        rows = "".join(f"<tr><td>{escape(str(k))}</td><td>{escape(str(v))}</td></tr>"
                       for k, v in sorted(summary.items()) if not isinstance(v, (dict, list)))
        if rows:
            sections.append(_section("training", "Training summary",
                                     f'<table id="train-table"><tbody>{rows}</tbody></table>'))
    notes = info.get("notes") or []
    if notes:
        sections.append(_section("notes", "Notes", "<ul>" + "".join(
            f"<li>{escape(n)}</li>" for n in notes) + "</ul>"))

    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    template = Template(resources.files("cladapter_core.evaluation").joinpath("templates/report.html").read_text())
    return template.substitute(
        title=escape(title), subtitle=escape(subtitle),
        tags="".join(f"<span>{escape(t)}</span>" for t in tags),
        sections="\n".join(sections),
        footer=escape(f"CLAdapter platform evaluation report, generated {stamp}"))

"""The cost of equal tuning effort: `cladapter compare` with a 3-point lr grid against one lr.

Both runs train the same methods on the same seeds and prepared demo digits with the demo's
params.yaml (test_vit, 8 + 3 epochs, stage-1 feature cache of 8 views), in this process,
one after the other; the figure is the ratio of their wall times (a ratio within one run:
the machine's load moves both). In both, each seed builds one feature cache per stored
output (tokens, pooled, mean of tokens), read by every frozen stage and grid point that
needs it; stages that train the backbone (full, every stage 2) cost once per grid point.

    python benchmarks/compare_grid.py [--seeds 0] [--methods linear full cla-stage1 cla-sft]
                                      [--grid 3] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--methods", nargs="+", default=None, help="default: all six")
    ap.add_argument("--grid", type=int, default=3)
    ap.add_argument("--out", default=None, help="folder for data and results.json (default: temp)")
    args = ap.parse_args()
    from cladapter_core.data import make_demo_data, prepare
    from cladapter_core.experiments.compare import compare
    from cladapter_core.params import load_params

    root = Path(args.out or tempfile.mkdtemp(prefix="compare-grid-"))
    params = load_params(str(REPO / "params.yaml"), [f"data.source={root / 'digits'}"], use_best=False)
    if not (root / "prepared" / "manifest.csv").is_file():
        make_demo_data(root / "digits")
        prepare(root / "digits", root / "prepared", params)
    rows = []
    for grid in (1, args.grid):
        p = load_params(str(REPO / "params.yaml"), [f"compare.lr_grid={grid}"], use_best=False)
        t0 = time.perf_counter()
        table = compare(p, root / "prepared", root / f"grid{grid}", seeds=args.seeds, methods=args.methods)
        rows.append({"grid": grid, "seconds": round(time.perf_counter() - t0, 1),
                     "macro_f1": {r["method"]: round(r["macro_f1_mean"], 4) for r in table}})
    ratio = rows[1]["seconds"] / rows[0]["seconds"]
    for r in rows:
        print(f"lr grid {r['grid']}: {r['seconds']:8.1f} s   macro-F1 {r['macro_f1']}")
    print(f"a {args.grid}-point grid costs {ratio:.2f}x one lr (same methods, seeds and data)")
    (root / "results.json").write_text(json.dumps({"runs": rows, "ratio": ratio}, indent=2) + "\n")
    print(f"results: {root / 'results.json'}")


if __name__ == "__main__":
    main()

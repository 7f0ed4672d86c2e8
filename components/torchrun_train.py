"""One DDP process of a training step: `torchrun --nproc_per_node N -m components.torchrun_train`.

Every rank calls the same `train.train` as a single process (it reads RANK/WORLD_SIZE,
joins the process group and wraps the model in DDP); rank 0 writes the model and, given
`--run-id`, logs each epoch to that MLflow run (the step's stage run, opened by the
parent process in `runtime.train_task`).
"""
from __future__ import annotations

import argparse
import json
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m components.torchrun_train")
    ap.add_argument("--params-json", required=True, help="resolved params (JSON file)")
    ap.add_argument("--prepared", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--stage", type=int, choices=(1, 2), required=True)
    ap.add_argument("--init-from")
    ap.add_argument("--run-id", help="MLflow run that rank 0 logs epochs to")
    args = ap.parse_args(argv)

    import torch.distributed as dist

    from cladapter_core.params import load_params
    from cladapter_core.training import Preempted, train

    with open(args.params_json) as fh:
        params = load_params(None, json.load(fh))
    from cladapter_core.console import configure
    from cladapter_core.settings import settings
    configure()
    rank = settings().rank
    callbacks = []
    if args.run_id and rank == 0:
        from cladapter_core.tracking import EpochLogger
        callbacks.append(EpochLogger(run_id=args.run_id))
    try:
        train(params, args.prepared, args.out, stage=args.stage, mode=params["train"]["mode"],
              init_from=args.init_from, resume=True, callbacks=callbacks, progress=rank == 0)
    except Preempted as e:
        print(f"rank {rank}: {e}", file=sys.stderr)
        return 143
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())

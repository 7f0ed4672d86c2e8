"""Run the `cladapter` command with a tripwire: SIGKILL this very process at one chosen call.

    python tests/faults/killpoint.py --at os:replace --nth 2 --when after --match stage1 \
        -- train --stage 1 ...

`--at module:attr[.attr]` names the function or method to watch (`os:replace`,
`mlflow:register_model`, `mlflow.tracking.client:MlflowClient.set_registered_model_alias`);
the process kills itself with SIGKILL at the `--nth` call whose arguments (as text) contain
`--match`, `--when` before or after the call runs. Nothing of the library is replaced:
the real code runs up to that instant, as if the machine had been preempted there. A line
`killpoint: ...` on stderr says it fired; a run that exits normally never reached the point.
"""
from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys


def arm(target: str, nth: int, when: str, match: str) -> None:
    module_name, _, attrs = target.partition(":")
    owner = importlib.import_module(module_name)
    *path, name = attrs.split(".")
    for attr in path:
        owner = getattr(owner, attr)
    original = getattr(owner, name)
    calls = {"n": 0}

    def fire(args, kwargs):
        sys.stderr.write(f"killpoint: SIGKILL {when} call {calls['n']} of {target} "
                         f"matching {match!r}\n")
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    def tripwire(*args, **kwargs):
        hit = match in " ".join(str(a) for a in (*args, *kwargs.values()))
        if hit:
            calls["n"] += 1
        due = hit and calls["n"] == nth
        if due and when == "before":
            fire(args, kwargs)
        result = original(*args, **kwargs)
        if due and when == "after":
            fire(args, kwargs)
        return result

    setattr(owner, name, tripwire)


def main(argv: list[str]) -> int:
    split = argv.index("--")
    ap = argparse.ArgumentParser(prog="killpoint")
    ap.add_argument("--at", required=True)
    ap.add_argument("--nth", type=int, default=1)
    ap.add_argument("--when", choices=("before", "after"), default="after")
    ap.add_argument("--match", default="")
    opts = ap.parse_args(argv[:split])
    arm(opts.at, opts.nth, opts.when, opts.match)
    from cladapter_core.cli import main as cli_main
    return cli_main(argv[split + 1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

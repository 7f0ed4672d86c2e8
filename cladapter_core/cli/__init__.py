"""The `cladapter` command. Each subcommand reads params.yaml, lets flags override it
(`-S section.key=value`, or the named flags), and calls one library function: the parser
(`parser`), the handlers (`commands`, `registry_commands`), plugin subcommands (`plugins`)."""
from __future__ import annotations

import sys

from ..errors import CLAdapterError
from .commands import (cmd_compare, cmd_demo, cmd_demo_data, cmd_evaluate, cmd_init, cmd_mirror_weights,
                       cmd_predict, cmd_prepare, cmd_sweep, cmd_train, cmd_tune)
from .parser import build_parser
from .plugins import _HANDLER, PLUGIN_GROUP  # noqa: F401  (PLUGIN_GROUP: public)
from .registry_commands import cmd_lineage, cmd_promote, cmd_register, cmd_serve, cmd_summary, cmd_verify_model


COMMANDS = {"init": cmd_init, "summary": cmd_summary, "register": cmd_register, "promote": cmd_promote, "lineage": cmd_lineage,
            "demo-data": cmd_demo_data, "prepare": cmd_prepare, "train": cmd_train,
            "evaluate": cmd_evaluate, "predict": cmd_predict, "compare": cmd_compare,
            "demo": cmd_demo, "tune": cmd_tune, "serve": cmd_serve, "sweep": cmd_sweep,
            "verify-model": cmd_verify_model, "mirror-weights": cmd_mirror_weights}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from ..console import configure
    from ..training import Preempted
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


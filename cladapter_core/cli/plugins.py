"""Subcommands added from outside the core (the `cladapter.commands` entry-point group:
`pipeline`, from pipelines/cli.py): the core knows nothing of KFP."""
from __future__ import annotations

import argparse
import sys

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


def add_plugins(sub) -> None:
    """Add every plugin command; one that fails is left out with a warning, the rest work.
    Each plugin's `register` is tried first on a scratch parser holding the names taken so
    far, so a failing one leaves nothing half-added in the real parser and its help."""
    for ep in _plugin_entry_points():
        try:
            register = ep.load()
            _try(register, ep.name, set(sub.choices))
        except Exception as exc:  # noqa: BLE001 - a broken plugin must not break the CLI
            print(f"cladapter: warning: command plugin '{ep.name}' ({ep.value}, entry point group "
                  f"{PLUGIN_GROUP}) failed to load and is left out: {type(exc).__name__}: {exc}",
                  file=sys.stderr)
            continue
        handler = register(sub)
        sub.choices[ep.name].set_defaults(**{_HANDLER: handler})


def _try(register, name: str, taken: set) -> None:
    """`register` on a scratch parser whose subcommands are `taken`: it must add `name`
    and return the command's handler."""
    scratch = argparse.ArgumentParser(add_help=False).add_subparsers()
    for other in taken:
        scratch.add_parser(other)
    handler = register(scratch)
    if name not in scratch.choices or name in taken:
        raise RuntimeError(f"register() did not add a '{name}' command")
    if not callable(handler):
        raise RuntimeError(f"register() returned {handler!r}, not the command's handler")

#!/usr/bin/env python3
"""Every third-party image of infra/, pinned as `name:tag@sha256:<digest>`: the tag for
the reader, the digest for the puller (a tag moved upstream cannot change what runs).

    infra/scripts/pin-images.py --list     the references and whether each is pinned (offline)
    infra/scripts/pin-images.py --check    resolve each tag and compare with its digest (online)
    infra/scripts/pin-images.py            resolve each tag and write its digest in place (online)

Resolving needs `crane` (go-containerregistry) and the registries: `crane digest name:tag`
gives the digest of what the tag points to now (for multi-platform images, the index).
The images this repository builds (ghcr.io/cladapter/...) have no digest before they
are pushed: they are pinned at release time (infra/README.md, "Supply chain").
tests/test_supply_chain.py uses `references` and `PINNED` to refuse a tag alone.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path

INFRA = Path(__file__).resolve().parents[1]
OWN = "ghcr.io/cladapter/"  # built here: pinned by digest when released, not in these files
PINNED = re.compile(r"(?P<name>[^\s@:]+(?::\d+)?(?:/[^\s@:]+)*):(?P<tag>[\w][\w.-]*)"
                    r"@sha256:(?P<digest>[0-9a-f]{64})")
# A reference in a Dockerfile (FROM, the BuildKit `# syntax=` frontend) or a manifest (image:).
_PATTERNS = (re.compile(r"^[ \t]*FROM[ \t]+(?:--platform=\S+[ \t]+)?(?P<ref>\S+)", re.I | re.M),
             re.compile(r"^#[ \t]*syntax=(?P<ref>\S+)", re.M),
             re.compile(r"^[ \t]*-?[ \t]*image:[ \t]*[\"']?(?P<ref>[^\s\"']+)", re.M))


def files(root: Path = INFRA) -> list[Path]:
    docker = sorted(p for p in (root / "docker").iterdir() if p.name.endswith("Dockerfile"))
    return docker + sorted((root / "k8s").rglob("*.yaml"))


def _instruction_starts(text: str) -> str:
    """The text with every continuation line blanked: a RUN's `\\`-continued lines (a
    Python `from x import y`, say) are not instructions."""
    lines, continued = [], False
    for line in text.split("\n"):
        is_comment = line.lstrip().startswith("#")
        lines.append("" if continued and not is_comment else line)
        if not is_comment:
            continued = line.rstrip().endswith("\\")
    return "\n".join(lines)


def references(path: Path) -> list[tuple[int, str]]:
    """(line number, image reference) of every image the file pulls, stage aliases and
    the images this repository builds left out."""
    text = path.read_text()
    if path.name.endswith("Dockerfile"):
        text = _instruction_starts(text)
    aliases = {m.group(1).lower() for m in re.finditer(r"^[ \t]*FROM[ \t]+\S+[ \t]+AS[ \t]+(\S+)", text, re.I | re.M)}
    out = []
    for pattern in _PATTERNS:
        for m in pattern.finditer(text):
            ref = m.group("ref")
            if ref.lower() in aliases or ref.startswith(OWN) or "$" in ref:
                continue
            out.append((text.count("\n", 0, m.start()) + 1, ref))
    return sorted(out)


def is_pinned(ref: str) -> bool:
    """`name:tag@sha256:` and 64 hex digits, and not a placeholder of one repeated digit."""
    m = PINNED.fullmatch(ref)
    return bool(m) and len(set(m.group("digest"))) > 1


def resolve(name_tag: str) -> str:
    crane = shutil.which("crane")
    if crane is None:
        sys.exit("crane is not on PATH: go install github.com/google/go-containerregistry/cmd/crane@latest")
    proc = subprocess.run([crane, "digest", name_tag], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        sys.exit(f"crane digest {name_tag}: {proc.stderr.strip()}")
    return proc.stdout.strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--list", action="store_true", help="print the references, offline")
    mode.add_argument("--check", action="store_true", help="compare the digests with the registries")
    args = parser.parse_args(argv)
    problems = 0
    for path in files():
        text, changed = path.read_text(), False
        for line, ref in references(path):
            where = f"{path.relative_to(INFRA.parent)}:{line}"
            name_tag = ref.split("@")[0]
            if args.list:
                print(f"{where}\t{'pinned' if is_pinned(ref) else 'NOT PINNED'}\t{ref}")
                problems += not is_pinned(ref)
                continue
            digest = resolve(name_tag)
            wanted = f"{name_tag}@{digest}"
            if ref == wanted:
                continue
            if args.check:
                print(f"{where}: {ref} != {wanted}")
                problems += 1
            else:
                text, changed = text.replace(ref, wanted), True
                print(f"{where}: {wanted}")
        if changed:
            path.write_text(text)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

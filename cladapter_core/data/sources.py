"""Listing a data source: an ImageFolder tree or a CSV manifest -> items with labels.

Nothing is decoded here; problems that concern one file (missing, unsupported type,
listed twice) are returned as bad entries so `prepare` can report them together with
the files that fail to decode. Problems with the source as a whole raise DataError.

Containment: every listed file must resolve inside the data root (the folder, or the
CSV's folder), symlinks followed. A CSV row `../other/x.png` or `/etc/x.png`, or a
symlink out of the folder, is refused naming the row or link and the root, unless
`data.allow_outside_root` is true (then `Listing.outside` names them): data outside the
root would be read, and with `data.resize` copied into the prepared output.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path

from cladapter_core.data.files import kind_of, kind_of_name
from cladapter_core.errors import DataError

SPLITS = ("train", "val", "test")
SPLIT_ALIASES = {
    "train": "train", "training": "train",
    "val": "val", "valid": "val", "validation": "val",
    "test": "test", "testing": "test",
}
MAX_LISTED = 30  # lines of detail in one error message


@dataclass
class Item:
    path: Path            # where the file/folder is (as the user gave it, joined)
    rel: str              # posix path relative to the source root (messages, summary)
    label: str            # class name
    split: str | None = None  # from a CSV split column
    fold: int | None = None   # from a CSV fold column
    line: int | None = None   # CSV line number
    kind: str | None = None   # "2d" / "3d" (None: unusable, see Listing.bad)


@dataclass
class Listing:
    kind: str                     # "folder" | "csv"
    root: Path                    # manifest paths are relative to this
    items: list[Item]             # usable-looking entries
    bad: list[tuple[Item, str]]   # entries that cannot be used, with the reason
    ignored: list[str]            # files of unsupported types inside class folders
    class_names: list[str]        # all classes named by the source
    has_split: bool = False
    has_fold: bool = False
    outside: list[str] = field(default_factory=list)  # where the files outside the root really are


ALLOW_FLAG = "data.allow_outside_root"


class _Containment:
    """Which listed paths resolve outside the root (symlinks followed); the error naming
    them, or with `allow` the list of where they lead."""

    def __init__(self, root: Path, allow: bool):
        self.root, self.real_root, self.allow = root, Path(os.path.realpath(root)), allow
        self._inside = str(self.real_root).rstrip(os.sep) + os.sep
        self._real_dirs: dict[str, str] = {}  # folder -> its real path: one resolve per folder
        self.problems: list[str] = []
        self.outside: list[str] = []

    def _real(self, path: Path) -> str:
        folder, name = os.path.split(str(path))
        if name in ("", ".", ".."):
            return os.path.realpath(path)
        real_folder = self._real_dirs.get(folder)
        if real_folder is None:
            real_folder = self._real_dirs[folder] = os.path.realpath(folder or ".")
        real = os.path.join(real_folder, name)
        return os.path.realpath(real) if os.path.islink(real) else real

    def check(self, path: Path, what: str) -> None:
        real = self._real(path)
        if real != str(self.real_root) and not real.startswith(self._inside):
            self.outside.append(real)
            self.problems.append(f"{what} -> {real}")

    def raise_unless_allowed(self, source: Path) -> list[str]:
        if self.problems and not self.allow:
            raise DataError(
                f"{source}: {len(self.problems)} path(s) lead outside the data root {self.real_root}:\n"
                + format_lines(self.problems)
                + f"\nMove the files under {self.root}, or set {ALLOW_FLAG}: true (-S "
                f"{ALLOW_FLAG}=true) to read them where they are.")
        return sorted(set(self.outside))


def format_lines(lines: list[str]) -> str:
    shown = lines[:MAX_LISTED]
    more = len(lines) - len(shown)
    text = "\n".join(f"  {line}" for line in shown)
    return text + (f"\n  ... and {more} more" if more > 0 else "")


def sort_classes(names) -> list[str]:
    """Numeric order when every name is an integer ("2" before "10"), else plain order."""
    names = sorted(set(names))
    if all(n.strip().lstrip("-").isdigit() for n in names):
        return sorted(names, key=lambda n: (int(n), n))
    return names


def list_source(source: Path, allow_outside_root: bool = False) -> Listing:
    """The items of `source` (a folder or a CSV manifest). Paths that resolve outside the
    data root are refused unless `allow_outside_root` (`data.allow_outside_root`)."""
    if not source.exists():
        raise DataError(f"data source {source} does not exist")
    if source.is_file():
        if source.suffix.lower() != ".csv":
            raise DataError(
                f"data source {source} is a file but not a .csv manifest; give an ImageFolder "
                "directory (one sub-folder per class) or a CSV with columns path,label"
            )
        return _list_csv(source, allow_outside_root)
    return _list_folder(source, allow_outside_root)


# ---------------------------------------------------------------- ImageFolder tree


def _scan(folder: Path, links: list[str] | None = None) -> tuple[list[str], list[str]]:
    """Names of the files and of the folders directly in `folder`, hidden ones left out, in
    name order: one directory read, no stat per entry (the kind comes with the entry).
    `links` gets the names of those that are symlinks (to check where they lead)."""
    files, folders = [], []
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                folders.append(entry.name)
            elif entry.is_file():
                files.append(entry.name)
            else:
                continue
            if links is not None and entry.is_symlink():
                links.append(entry.name)
    return sorted(files), sorted(folders)


def _check_links(folder: Path, links: list[str], rel: str, contained: _Containment) -> None:
    for name in links:
        contained.check(folder / name, f"symlink {rel}{name}")


def _check_clip(clip: Path, rel: str, contained: _Containment) -> None:
    """The frames of a 3D clip folder: any symlink among them must stay inside the root."""
    links: list[str] = []
    _scan(clip, links)
    _check_links(clip, links, f"{rel}/", contained)


def _list_folder(root: Path, allow_outside_root: bool = False) -> Listing:
    contained, links = _Containment(root, allow_outside_root), []
    class_dirs = [root / name for name in _scan(root, links)[1]]
    _check_links(root, links, "", contained)
    if not class_dirs:
        raise DataError(
            f"{root}: no class folders found; expected one sub-folder per class "
            f"(e.g. {root}/cat/001.png), or a CSV manifest with columns path,label"
        )
    items: list[Item] = []
    ignored: list[str] = []
    empty: list[str] = []
    for class_dir in class_dirs:
        links = []
        files, clips = _scan(class_dir, links)
        _check_links(class_dir, links, f"{class_dir.name}/", contained)
        kinds = {name: kind_of_name(name) for name in files}
        usable = [name for name in files if kinds[name] is not None]
        ignored += [f"{class_dir.name}/{name}" for name in files if kinds[name] is None]
        images = [name for name in usable if kinds[name] == "2d"]
        if clips and images:
            raise DataError(
                f"{class_dir}: holds both image files ({images[0]}) and sub-folders "
                f"({clips[0]}); use image files for 2D data or one sub-folder of frames "
                "per clip for 3D data, not both"
            )
        members = usable + clips
        if not members:
            empty.append(str(class_dir))
        for name in members:
            items.append(Item(path=class_dir / name, rel=f"{class_dir.name}/{name}", label=class_dir.name,
                              kind=kinds.get(name, "3d")))  # not a file: a folder of frames
        for name in clips:
            _check_clip(class_dir / name, f"{class_dir.name}/{name}", contained)
    outside = contained.raise_unless_allowed(root)
    if empty:
        raise DataError(
            "empty class folder(s) (no image, .npy/.npz file or frame folder):\n" + format_lines(empty)
        )
    names = sort_classes(d.name for d in class_dirs)
    return Listing(kind="folder", root=root, items=items, bad=[], ignored=sorted(ignored), class_names=names,
                   outside=outside)


# ---------------------------------------------------------------- CSV manifest


def _list_csv(csv_path: Path, allow_outside_root: bool = False) -> Listing:
    root = csv_path.parent
    contained = _Containment(root, allow_outside_root)
    rows = _read_csv(csv_path)
    col = _csv_columns(csv_path, rows[0])
    has_split, has_fold = "split" in col, "fold" in col

    items: list[Item] = []
    bad: list[tuple[Item, str]] = []
    problems: list[str] = []
    first_line: dict[str, int] = {}
    for line_no, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue  # blank line
        parsed = _parse_row(row, line_no, col)
        if isinstance(parsed, str):
            problems.append(parsed)
            continue
        item = _csv_item(root, line_no, *parsed)
        contained.check(item.path, f"line {line_no}: {parsed[0]}")
        key = os.path.normpath(os.path.abspath(item.path))
        if key in first_line:
            bad.append((item, f"listed again on line {line_no} (first on line {first_line[key]})"))
            continue
        first_line[key] = line_no
        item.kind = kind_of(item.path) if item.path.exists() else None
        reason = _unusable(item, csv_path)
        if reason:
            bad.append((item, reason))
        else:
            items.append(item)
    if problems:
        raise DataError(f"{csv_path}: bad rows in CSV manifest:\n" + format_lines(problems))
    outside = contained.raise_unless_allowed(csv_path)
    listed = items + [it for it, _ in bad]
    if not listed:
        raise DataError(f"{csv_path}: CSV manifest has a header but no rows")
    names = _csv_class_names(csv_path, listed, has_split, has_fold)
    return Listing(
        kind="csv", root=root, items=items, bad=bad, ignored=[], class_names=names,
        has_split=has_split, has_fold=has_fold, outside=outside,
    )


def _read_csv(csv_path: Path) -> list[list[str]]:
    """All rows of the manifest; the first is a non-empty header."""
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.reader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{csv_path}: cannot read CSV manifest: {exc}") from None
    if not rows or not any(cell.strip() for cell in rows[0]):
        raise DataError(f"{csv_path}: CSV manifest is empty; expected a header row with columns path,label")
    return rows


def _csv_columns(csv_path: Path, header_row: list[str]) -> dict[str, int]:
    """Column name -> index for path, label and (when present) split, fold."""
    header = [h.strip().lower() for h in header_row]
    missing = [c for c in ("path", "label") if c not in header]
    if missing:
        raise DataError(
            f"{csv_path}: CSV manifest lacks column(s) {', '.join(missing)}; it has: "
            f"{', '.join(h for h in header if h) or '(none)'}. Needed: path,label "
            "(optional: split with train/val/test, or fold)"
        )
    return {name: header.index(name) for name in ("path", "label", "split", "fold") if name in header}


def _parse_row(row: list[str], line_no: int, col: dict[str, int]):
    """(path, label, split, fold) of one data row, or the problem with it as a string."""
    cell = lambda name: row[col[name]].strip() if col[name] < len(row) else ""  # noqa: E731
    path_s, label = cell("path"), cell("label")
    if not path_s:
        return f"line {line_no}: empty path"
    if not label:
        return f"line {line_no}: empty label for {path_s}"
    split = fold = None
    if "split" in col:
        raw = cell("split")
        split = SPLIT_ALIASES.get(raw.lower())
        if split is None:
            return f"line {line_no}: split '{raw}' is not one of train, val, test"
    if "fold" in col and split != "test":
        raw = cell("fold")
        if raw.lower() == "test":
            split = "test"
        else:
            try:
                fold = int(raw)
                if fold < 0:
                    raise ValueError
            except ValueError:
                return f"line {line_no}: fold '{raw}' is not a whole number >= 0 (or 'test')"
    return path_s, label, split, fold


def _csv_item(root: Path, line_no: int, path_s: str, label: str, split: str | None, fold: int | None) -> Item:
    path = Path(path_s)
    path = path if path.is_absolute() else root / path
    try:
        rel = Path(os.path.relpath(path, root)).as_posix()
    except ValueError:  # another drive (Windows)
        rel = path.as_posix()
    return Item(path=path, rel=rel, label=label, split=split, fold=fold, line=line_no)


def _unusable(item: Item, csv_path: Path) -> str | None:
    """Why a listed file cannot be used (missing, unsupported type: no kind), or None."""
    if item.kind is not None:
        return None
    if not item.path.exists():
        return f"missing file (listed on line {item.line} of {csv_path.name})"
    return f"unsupported file type '{item.path.suffix}' (line {item.line})"


def _csv_class_names(csv_path: Path, listed: list[Item], has_split: bool, has_fold: bool) -> list[str]:
    """Classes come from the rows that train on them; val/test labels must be among those."""
    if not (has_split or has_fold):
        return sort_classes(it.label for it in listed)
    pool = [it for it in listed if it.split != "test" and (it.split in (None, "train") or has_fold)]
    names = sort_classes(it.label for it in pool)
    unknown = [it for it in listed if it.label not in set(names)]
    if unknown:
        where = "train rows" if not has_fold else "non-test rows"
        lines = [f"line {it.line}: label '{it.label}' ({it.split or 'fold'} row, {it.rel})" for it in unknown]
        raise DataError(
            f"{csv_path}: label(s) not found in any of the {where}, so no model could learn them "
            f"(known labels: {', '.join(names) or 'none'}):\n" + format_lines(lines)
        )
    return names

"""An image folder as a list of (file, key, label): the three layouts `jobs/make_shards.py` reads.

- class folders (`train/n01440764/n01440764_10026.JPEG`): the label of an image is the index of its class
  folder among the sorted names of ALL class folders (torchvision's ImageFolder convention, which also
  refuses a class folder without images: so do we), or its index in a previous run's `classes.json`
  (`classes=`, so that val and train share labels); images are found at any depth under a class folder;
- a flat folder (`val/ILSVRC2012_val_00000001.JPEG`), with an optional labels file of `name label` lines
  (name: the file's path relative to the folder, or its base name, with or without the extension);
- a list file of `path[,label]` lines (paths relative to the list file's folder, or absolute / URLs).

The layout of a folder is `layout=` "classes" or "flat", or "auto": flat with a labels file, else class
folders when images lie only in subfolders, flat when only at the top, refused when both. The folder is
walked by pipeline/pack/folder_walk.py (directory links followed, unreadable directories an error).
Image files are recognised by extension (IMAGE_EXTENSIONS, any case); in a folder, hidden files,
`__MACOSX/` and other files are ignored (a list file names its files: any path is taken). Keys come from
the relative paths (pipeline/pack/sample_keys.py). The order is the sorted relative paths (list files:
their line order).
"""

from __future__ import annotations

import json
import posixpath
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

from fsspec.core import url_to_fs

from pipeline.data.decode import IMAGE_EXTENSIONS
from pipeline.data.reasons import BAD_LIST_LINE, DUPLICATE_LINE, IN_SUBFOLDER, NOT_LISTED, OUTSIDE_CLASSES
from pipeline.pack.folder_walk import FolderWalk, walk_folder
from pipeline.pack.sample_keys import KeyMaker

LAYOUTS = ("class folders", "flat folder", "list file")
LAYOUT_CHOICES = ("auto", "flat", "classes")


@dataclass(frozen=True)
class FolderItem:
    """One image file to pack: where it is, its sample key, its label (None: no .cls member)."""

    url: str
    key: str
    ext: str  # the member extension: the file's, lower case
    label: int | None


@dataclass
class FolderListing:
    layout: str
    items: list[FolderItem]
    classes: list[str] | None = None  # class folder names, index = label (class-folder layout)
    skipped: list[dict] = field(default_factory=list)  # {"file", "reason", "detail"}


def list_image_folder(
    source: str, labels: str | None = None, layout: str = "auto", classes: str | None = None
) -> FolderListing:
    """The images named by `source` (a folder or a list file, local or fsspec) in their fixed order.
    Raises ValueError (a one-line message) when the source, the labels or the classes file cannot be used,
    OSError when a folder cannot be listed."""
    if layout not in LAYOUT_CHOICES:
        raise ValueError(f"--layout must be one of {', '.join(LAYOUT_CHOICES)}, got {layout!r}")
    fs, root = url_to_fs(source)
    if not fs.exists(root):
        raise ValueError(f"--input {source}: no such folder or list file")
    if not fs.isdir(root):
        if labels is not None or classes is not None or layout != "auto":
            raise ValueError(
                "--labels, --classes and --layout are for a folder; a list file has path,label lines"
            )
        return _list_file(source)
    walk = walk_folder(source)
    images = {rel: url for rel, url in walk.files.items() if _is_image(rel)}
    if _decide_layout(source, layout, labels, images) == "classes":
        listing = _class_folders(source, walk, images, classes)
    else:
        if classes is not None:
            raise ValueError("--classes is for class folders (--layout classes)")
        listing = _flat_folder(images, labels)
    listing.skipped = walk.skipped + listing.skipped
    return listing


def _decide_layout(source: str, layout: str, labels: str | None, images: dict[str, str]) -> str:
    if layout == "classes" and labels is not None:
        raise ValueError("--labels is for a flat folder; class folders give the labels")
    if layout != "auto":
        return layout
    if labels is not None:
        return "flat"
    nested = sum("/" in rel for rel in images)
    top = len(images) - nested
    if top and nested:
        raise ValueError(
            f"--input {source} holds {top} images at its top and {nested} in subfolders: give --layout flat "
            "(the subfolders' images skipped) or --layout classes (the top-level images skipped)"
        )
    return "classes" if nested else "flat"


def _class_folders(
    source: str, walk: FolderWalk, images: dict[str, str], classes: str | None
) -> FolderListing:
    folders = [d for d in walk.top_folders if not _hidden(d)]
    filled = {rel.split("/", 1)[0] for rel in images if "/" in rel}
    if classes is not None:
        names = read_classes(classes)
        unknown = [f for f in folders if f not in names]
        if unknown:
            raise ValueError(f"--classes {classes} has no class {_some(unknown)} of --input {source}")
    else:
        empty = [f for f in folders if f not in filled]
        if empty:
            raise ValueError(
                f"--input {source}: class folder(s) without image files: {_some(empty)} (a label is the "
                "index among all class folders: remove them, or give the labels with --classes)"
            )
        names = folders
    index = {c: i for i, c in enumerate(names)}
    listing = FolderListing("class folders", [], names)
    keys = KeyMaker()
    for rel, url in images.items():
        if "/" not in rel:
            listing.skipped.append({"file": url, "reason": OUTSIDE_CLASSES, "detail": rel})
            continue
        listing.items.append(FolderItem(url, keys.key(rel), _ext(rel), index[rel.split("/", 1)[0]]))
    return listing


def _flat_folder(images: dict[str, str], labels: str | None) -> FolderListing:
    listing = FolderListing("flat folder", [])
    names = _read_labels(labels) if labels is not None else None
    keys = KeyMaker()
    for rel, url in images.items():
        if "/" in rel:  # a flat folder's images are the files directly in it
            listing.skipped.append({"file": url, "reason": IN_SUBFOLDER, "detail": rel})
            continue
        label = None
        if names is not None:
            found = {names[n] for n in (rel, posixpath.splitext(rel)[0]) if n in names}
            if len(found) > 1:
                raise ValueError(
                    f"--labels {labels} gives {rel} two labels {sorted(found)} "
                    "(by its name with and without extension)"
                )
            if not found:
                listing.skipped.append({"file": url, "reason": NOT_LISTED, "detail": labels})
                continue
            label = found.pop()
        listing.items.append(FolderItem(url, keys.key(rel), _ext(rel), label))
    return listing


def _list_file(source: str) -> FolderListing:
    base = posixpath.dirname(source)
    listing = FolderListing("list file", [])
    keys = KeyMaker()
    seen: dict[str, tuple[int, int | None]] = {}  # file -> (line, label)
    for number, line in _text_lines(source, "--input"):
        name, label = line, None
        head, comma, tail = line.rpartition(",")
        if comma and re.fullmatch(r"-?\d+", tail.strip()):
            name, label = head.strip(), int(tail)
        why = _bad_name(name)
        if why is not None:
            detail = f"line {number}: {line[:200]!r} ({why})"
            listing.skipped.append({"file": source, "reason": BAD_LIST_LINE, "detail": detail})
            continue
        absolute = "://" in name or name.startswith("/")
        url = name if "://" in name else _normalised(name if absolute else posixpath.join(base, name))
        if url in seen:
            first, first_label = seen[url]
            if first_label != label:
                raise ValueError(
                    f"--input {source}: line {number} gives {name} label {label}, "
                    f"line {first} gave {first_label}"
                )
            detail = f"line {number} repeats line {first}"
            listing.skipped.append({"file": url, "reason": DUPLICATE_LINE, "detail": detail})
            continue
        seen[url] = (number, label)
        rel = name.split("://", 1)[-1].lstrip("/") if absolute else posixpath.normpath(name)
        listing.items.append(FolderItem(url, keys.key(rel), _ext(name), label))
    return listing


def _normalised(url: str) -> str:
    """`./a.jpg` and `a.jpg` are one file, and `dir/../x.jpg` is `x.jpg` on an object store too."""
    scheme, sep, path = url.rpartition("://")
    return scheme + sep + posixpath.normpath(path)


def _bad_name(name: str) -> str | None:
    if not name:
        return "no path"
    if name.endswith("/") or _ext(name) not in IMAGE_EXTENSIONS:
        return f"not an image file name: the extension must be one of {', '.join(IMAGE_EXTENSIONS)}"
    return None


def _text_lines(url: str, option: str) -> Iterator[tuple[int, str]]:
    """(number, stripped line) of a UTF-8 text file (a BOM is dropped), blank and `#` lines left out;
    read line by line (a list of millions of files is never held whole)."""
    fs, path = url_to_fs(url)
    if not fs.isfile(path):
        raise ValueError(f"{option} {url}: no such file")
    number = 0
    with fs.open(path, "rt", encoding="utf-8-sig", newline=None) as f:
        try:
            for number, line in enumerate(f, 1):
                line = line.strip()
                if line and not line.startswith("#"):
                    yield number, line
        except UnicodeDecodeError:
            raise ValueError(f"{option} {url}: not UTF-8 text (near line {number + 1})") from None


def _read_labels(url: str) -> dict[str, int]:
    """`name label` lines (whitespace or a comma before the label; the name may hold spaces)."""
    out: dict[str, int] = {}
    first: dict[str, int] = {}
    for number, line in _text_lines(url, "--labels"):
        m = re.fullmatch(r"(.+?)[\s,]+(-?\d+)", line)
        if m is None:
            raise ValueError(f"--labels {url}: line {number} is not 'name label': {line[:200]!r}")
        name, label = m.group(1).strip(), int(m.group(2))
        if name in out and out[name] != label:
            raise ValueError(
                f"--labels {url}: line {number} gives {name} label {label}, "
                f"line {first[name]} gave {out[name]}"
            )
        out[name] = label
        first.setdefault(name, number)
    return out


def read_classes(url: str) -> list[str]:
    """The class names of a `classes.json` (ours: {"classes": [...]}, or a plain list), index = label."""
    fs, path = url_to_fs(url)
    if not fs.isfile(path):
        raise ValueError(f"--classes {url}: no such file")
    with fs.open(path, "rb") as f:
        try:
            doc = json.loads(f.read())
        except ValueError as e:
            raise ValueError(f"--classes {url}: not JSON ({e})") from None
    names = doc.get("classes") if isinstance(doc, dict) else doc
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f'--classes {url}: expected {{"classes": [names...]}} or a list of class names')
    if len(set(names)) != len(names):
        raise ValueError(f"--classes {url}: a class name repeats")
    return names


def _some(names: list[str]) -> str:
    return ", ".join(names[:5]) + (f", ... ({len(names)} in all)" if len(names) > 5 else "")


def _hidden(part: str) -> bool:
    return part.startswith((".", "__"))


def _is_image(relative: str) -> bool:
    parts = relative.split("/")
    if any(_hidden(p) for p in parts):
        return False
    return _ext(relative) in IMAGE_EXTENSIONS


def _ext(name: str) -> str:
    return posixpath.splitext(name)[1][1:].lower()

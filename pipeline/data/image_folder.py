"""An image folder as a list of (file, key, label): the three layouts `jobs/make_shards.py` reads.

- class folders (`train/n01440764/n01440764_10026.JPEG`): the label of an image is the index of its class
  folder among the sorted class folder names; images are found at any depth under a class folder;
- a flat folder (`val/ILSVRC2012_val_00000001.JPEG`), with an optional labels file of `name label` lines
  (name: the file's path relative to the folder, or its base name, with or without the extension);
- a list file of `path[,label]` lines (paths relative to the list file's folder, or absolute / URLs).

Image files are recognised by extension (IMAGE_EXTENSIONS, any case); hidden files, `__MACOSX/` and
other files are ignored. Keys are the relative path without the extension, made tar-safe: characters
other than letters, digits, `_`, `-` and `/` become `_` (a dot would split a WebDataset key), and a key
that would repeat an earlier one gets `_1`, `_2`, ... appended. The order is the sorted relative paths
(list files: their line order).
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass, field

from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from pipeline.data.decode import IMAGE_EXTENSIONS

# Reasons a file of the listing gives no sample (the tar-side reasons are in decode.py and samples.py).
NOT_LISTED = "not in the labels file"
OUTSIDE_CLASSES = "outside the class folders"  # a file beside the class folders
IN_SUBFOLDER = "in a subfolder of a flat folder"  # with --labels the folder is flat
BAD_LIST_LINE = "bad list line"
LAYOUTS = ("class folders", "flat folder", "list file")

_UNSAFE = re.compile(r"[^\w\-/]", re.ASCII)


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


def list_image_folder(source: str, labels: str | None = None) -> FolderListing:
    """The images named by `source` (a folder or a list file, local or fsspec) in their fixed order.
    Raises ValueError (a one-line message) when the source or the labels file cannot be used."""
    fs, root = url_to_fs(source)
    if not fs.exists(root):
        raise ValueError(f"--input {source}: no such folder or list file")
    if not fs.isdir(root):
        if labels is not None:
            raise ValueError("--labels is for a flat folder; a list file carries its labels as path,label")
        return _list_file(source)
    local = isinstance(fs, LocalFileSystem) and "://" not in source
    root = root.rstrip("/")
    files = sorted(p for p in fs.find(root) if _is_image(posixpath.relpath(p, root)))

    def url(path: str) -> str:
        return path if local else fs.unstrip_protocol(path)

    relative = [posixpath.relpath(p, root) for p in files]
    nested = [r for r in relative if "/" in r]
    if nested and labels is None:
        classes = sorted({r.split("/", 1)[0] for r in nested})
        index = {c: i for i, c in enumerate(classes)}
        listing = FolderListing("class folders", [], classes)
        keys = _KeyMaker()
        for path, rel in zip(files, relative, strict=True):
            if "/" not in rel:
                listing.skipped.append({"file": url(path), "reason": OUTSIDE_CLASSES, "detail": rel})
                continue
            label = index[rel.split("/", 1)[0]]
            listing.items.append(FolderItem(url(path), keys.key(rel), _ext(rel), label))
        return listing
    listing = FolderListing("flat folder", [])
    names = _read_labels(labels) if labels is not None else None
    keys = _KeyMaker()
    for path, rel in zip(files, relative, strict=True):
        if "/" in rel:  # a flat folder's images are the files directly in it
            listing.skipped.append({"file": url(path), "reason": IN_SUBFOLDER, "detail": rel})
            continue
        label = None
        if names is not None:
            stem = posixpath.splitext(rel)[0]
            label = next((names[n] for n in (rel, stem) if n in names), None)
            if label is None:
                listing.skipped.append({"file": url(path), "reason": NOT_LISTED, "detail": labels})
                continue
        listing.items.append(FolderItem(url(path), keys.key(rel), _ext(rel), label))
    return listing


def _list_file(source: str) -> FolderListing:
    fs, path = url_to_fs(source)
    base = posixpath.dirname(source)
    listing = FolderListing("list file", [])
    keys = _KeyMaker()
    with fs.open(path, "rt", encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            name, label = line, None
            head, comma, tail = line.rpartition(",")
            if comma and re.fullmatch(r"-?\d+", tail.strip()):
                name, label = head.strip(), int(tail)
            if not _is_image(name):
                detail = f"line {number}: {line[:200]!r} (not an image file name)"
                listing.skipped.append({"file": source, "reason": BAD_LIST_LINE, "detail": detail})
                continue
            absolute = "://" in name or name.startswith("/")
            url = name if absolute else (posixpath.join(base, name) if base else name)
            rel = name.split("://", 1)[-1].lstrip("/")
            listing.items.append(FolderItem(url, keys.key(rel), _ext(name), label))
    return listing


def _read_labels(url: str) -> dict[str, int]:
    """`name label` lines (whitespace or a comma between them); blank and `#` lines ignored."""
    out: dict[str, int] = {}
    fs, path = url_to_fs(url)
    if not fs.isfile(path):
        raise ValueError(f"--labels {url}: no such file")
    with fs.open(path, "rt", encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = re.split(r"[\s,]+", line)
            if len(parts) != 2 or not re.fullmatch(r"-?\d+", parts[1]):
                raise ValueError(f"--labels {url}: line {number} is not 'name label': {line[:200]!r}")
            out[parts[0]] = int(parts[1])
    return out


def _is_image(relative: str) -> bool:
    parts = relative.split("/")
    if any(p.startswith((".", "__")) for p in parts) or "__MACOSX" in parts:
        return False
    return _ext(relative) in IMAGE_EXTENSIONS


def _ext(name: str) -> str:
    return posixpath.splitext(name)[1][1:].lower()


class _KeyMaker:
    """Unique tar-safe keys from relative paths (see the module doc)."""

    def __init__(self) -> None:
        self.seen: set[str] = set()

    def key(self, relative: str) -> str:
        stem = posixpath.splitext(relative)[0]
        parts = [_UNSAFE.sub("_", p).lstrip("_") or "x" for p in stem.split("/") if p]
        base = "/".join(parts)
        key, n = base, 0
        while key in self.seen:
            n += 1
            key = f"{base}_{n}"
        self.seen.add(key)
        return key

"""Every file under a folder, local or on any fsspec store, with nothing dropped: the walk behind
`pipeline/pack/image_folder.py`.

fsspec's `find` omits directories it cannot list and does not follow directory links, so a class folder
that is unreadable or a symlink would vanish with its files. Here a local walk follows directory links
(a link back to one of its own ancestors is a loop: recorded, not followed) and lets any error listing a
directory propagate (an OSError: the job exits 1 and a rerun completes once the folder can be read).
Files that are not regular (FIFOs, devices, sockets, broken links) are listed like any other: reading
them (pipeline/pack/source_file.py) records why they give no sample.
"""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass, field

from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from pipeline.data.reasons import LINK_LOOP


@dataclass
class FolderWalk:
    """The files under a folder (relative path -> full path or URL, sorted by relative path), the names
    of its direct subfolders, and the links not followed."""

    files: dict[str, str] = field(default_factory=dict)
    top_folders: list[str] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)  # {"file", "reason", "detail"}


def walk_folder(source: str) -> FolderWalk:
    """Every file under the folder `source`. Raises OSError when a directory cannot be listed."""
    fs, root = url_to_fs(source)
    root = root.rstrip("/") or "/"
    found = FolderWalk()
    if isinstance(fs, LocalFileSystem) and "://" not in source:
        _walk_local(root, "", {_identity(root)}, found)
    else:
        _walk_store(fs, root, found)
    found.files = dict(sorted(found.files.items()))
    found.top_folders.sort()
    return found


def _identity(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _walk_local(path: str, rel: str, ancestors: set[tuple[int, int]], found: FolderWalk) -> None:
    with os.scandir(path) as entries:  # an unreadable directory raises here: never skipped silently
        entries = sorted(entries, key=lambda e: e.name)
    for entry in entries:
        child = posixpath.join(rel, entry.name) if rel else entry.name
        try:
            is_dir = entry.is_dir()  # follows links
        except OSError:
            is_dir = False
        if not is_dir:
            found.files[child] = entry.path
            continue
        if not rel:
            found.top_folders.append(entry.name)
        identity = _identity(entry.path)
        if identity in ancestors:
            detail = f"{child} -> {os.path.realpath(entry.path)}"
            found.skipped.append({"file": entry.path, "reason": LINK_LOOP, "detail": detail})
            continue
        _walk_local(entry.path, child, ancestors | {identity}, found)


def _walk_store(fs, root: str, found: FolderWalk) -> None:
    for directory, dirs, files in fs.walk(root, detail=True, on_error="raise"):
        rel_dir = posixpath.relpath(directory, root) if directory.rstrip("/") != root else ""
        if not rel_dir:
            found.top_folders.extend(posixpath.basename(d.rstrip("/")) for d in dirs)
        for name in files:
            child = posixpath.join(rel_dir, name) if rel_dir else name
            found.files[child] = fs.unstrip_protocol(posixpath.join(directory, name))

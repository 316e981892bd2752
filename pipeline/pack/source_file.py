"""Reading one source file for make_shards: its bytes, or the content reason it gives no sample; an I/O
failure is raised, never turned into a skip.

Content reasons (recorded skips, the same on every rerun): the file is missing, is not a regular file
(a FIFO, a device such as a link to /dev/zero, a directory named like an image), or is larger than the
limit. A local file is checked with stat before it is opened (non-blocking, so a FIFO never hangs the
job) and read up to the limit, never whole. Anything else (permission denied, a timeout, an object store's
5xx) is an OSError for the caller: the shard fails, the job exits 1 and a rerun completes it once the
cause is fixed.
"""

from __future__ import annotations

import os
import stat

import fsspec

from pipeline.data.reasons import MISSING, NOT_REGULAR, TOO_LARGE

_CHUNK = 16 * 1024 * 1024


class SourceReadError(OSError):
    """A source file that could not be read for a reason other than its content (the shard fails)."""


def read_source(url: str, max_bytes: int) -> bytes | tuple[str, str]:
    """The bytes of the file at `url` (a local path or an fsspec URL), or (reason, detail) when its
    content cannot be a sample. Raises SourceReadError (an OSError) for I/O failures."""
    try:
        if "://" not in url:
            return _read_local(url, max_bytes)
        return _read_store(url, max_bytes)
    except (FileNotFoundError, NotADirectoryError) as e:
        if not _only_not_found(e):  # fsspec's HTTP store reports a 503 as FileNotFoundError
            raise SourceReadError(f"{url}: {type(e).__name__}: {e} (caused by {_causes(e)})") from e
        return MISSING, f"{type(e).__name__}: {e}"
    except IsADirectoryError:
        return NOT_REGULAR, "a directory"
    except SourceReadError:
        raise
    except Exception as e:  # noqa: BLE001  (any other failure of a filesystem is an I/O error here)
        raise SourceReadError(f"{url}: {type(e).__name__}: {e}") from e


def _chain(e: BaseException) -> list[BaseException]:
    out = []
    while e is not None and len(out) < 10:
        out.append(e)
        e = e.__cause__ or e.__context__
    return out


def _status(e: BaseException) -> int | None:
    """The HTTP status an exception carries (aiohttp's `status`, botocore's response metadata), if any."""
    status = getattr(e, "status", None)
    if isinstance(status, int):
        return status
    response = getattr(e, "response", None)
    if isinstance(response, dict):
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return status if isinstance(status, int) else None
    return None


def _only_not_found(e: BaseException) -> bool:
    """Whether a FileNotFoundError means the file is not there: every exception behind it is one too
    or an HTTP 404, not a 5xx, a timeout or a dropped connection."""
    return all(isinstance(c, (FileNotFoundError, NotADirectoryError)) or _status(c) == 404 for c in _chain(e))


def _causes(e: BaseException) -> str:
    return "; ".join(f"{type(c).__name__}: {str(c)[:200]}" for c in _chain(e)[1:])


def _read_local(path: str, max_bytes: int) -> bytes | tuple[str, str]:
    why = _not_usable(os.stat(path), max_bytes)  # stat first: opening a FIFO or device is never tried
    if why is not None:
        return why
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
    with os.fdopen(fd, "rb") as f:
        why = _not_usable(os.fstat(fd), max_bytes)  # the file opened may differ from the one checked
        if why is not None:
            return why
        return _read_at_most(f, max_bytes)


def _not_usable(st: os.stat_result, max_bytes: int) -> tuple[str, str] | None:
    if not stat.S_ISREG(st.st_mode):
        return NOT_REGULAR, _kind(st.st_mode)
    if st.st_size > max_bytes:
        return TOO_LARGE, f"{st.st_size} bytes > --max-file-bytes {max_bytes}"
    return None


_KINDS = (
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISDIR, "a directory"),
)


def _kind(mode: int) -> str:
    for test, name in _KINDS:
        if test(mode):
            return name
    return f"mode {oct(mode)}"


def _read_store(url: str, max_bytes: int) -> bytes | tuple[str, str]:
    with fsspec.open(url, "rb") as f:
        size = getattr(f, "size", None)
        if isinstance(size, int) and size > max_bytes:
            return TOO_LARGE, f"{size} bytes > --max-file-bytes {max_bytes}"
        return _read_at_most(f, max_bytes)


def _read_at_most(f, max_bytes: int) -> bytes | tuple[str, str]:
    """At most max_bytes + 1 bytes in pieces (a file that grew past the limit is not read on)."""
    parts, size = [], 0
    while size <= max_bytes:
        chunk = f.read(min(_CHUNK, max_bytes + 1 - size))
        if not chunk:
            return b"".join(parts)
        parts.append(chunk)
        size += len(chunk)
    return TOO_LARGE, f"more than {max_bytes} bytes > --max-file-bytes {max_bytes}"

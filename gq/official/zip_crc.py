"""The CRC-32 check of a zip-format PyTorch checkpoint's members, which `torch.load` does not make.

`torch.save` writes a zip whose every member (the pickle and one per tensor storage) carries its CRC-32;
PyTorch's reader never compares them, so flipped bytes inside a tensor load as a wrong weight.
`verify_zip_crc` reads each member through Python's zipfile, which compares the CRC at the member's end.
A member whose recorded CRC is 0 is not checked: `torch.serialization.set_crc32_options(False)` writes 0
for every member.
"""

from __future__ import annotations

import io
import zipfile

ZIP_MAGIC = b"PK\x03\x04"  # what torch itself tests to tell its zip format from the legacy pickle one
_PIECE = 1 << 24  # read 16 MiB at a time: the check holds no member whole


def verify_zip_crc(data: bytes) -> None:
    """Raise RuntimeError naming the first member of a zip checkpoint that fails its CRC-32 (or a zip
    structure Python's zipfile cannot read); return for a checkpoint in the legacy (non-zip) format."""
    if not data.startswith(ZIP_MAGIC):
        return
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            for info in archive.infolist():
                if info.CRC == 0:
                    continue  # not recorded
                with archive.open(info) as member:
                    while member.read(_PIECE):
                        pass
    except zipfile.BadZipFile as e:
        raise RuntimeError(f"zip check failed: {e}") from None
    except (OSError, ValueError, EOFError, NotImplementedError) as e:
        raise RuntimeError(f"zip structure unreadable: {e}") from None

"""Reading a PyTorch `.ckpt` (a pickle) without ever running code from it.

`load_checkpoint` first tries `torch.load(weights_only=True)`. A real Lightning checkpoint can also hold
callback or hyper-parameter objects that `weights_only` refuses as a whole; for those it unpickles again
with `RestrictedUnpickler`, which builds tensors, containers and primitives and turns every other global
into an inert placeholder class, never imported and never called, so the weights come out and the
file's foreign objects stay dead data. The placeholders' names are returned, for the provenance. Only
the objects listed in `_ALLOWED` are resolved, by a dictionary lookup that imports nothing. Before either
read, a zip checkpoint's members are checked against their CRC-32 (`gq.official.zip_crc`).
"""

from __future__ import annotations

import io
import pickle
import types
from collections import OrderedDict
from typing import Any

import torch

from gq.official.zip_crc import verify_zip_crc

# The globals a state_dict needs, and nothing that can reach the file system, a shell or an import.
_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "slice"): slice,
    ("builtins", "complex"): complex,
    ("_codecs", "encode"): __import__("codecs").encode,  # protocol 2 writes bytes as encode(str, latin1)
    ("torch", "Size"): torch.Size,
    ("torch", "device"): torch.device,
    ("torch._utils", "_rebuild_tensor"): torch._utils._rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
}
# The dtypes, read from torch's namespace as it stands: `getattr(torch, name)` would import a submodule
# a pickle names (torch._dynamo, torch._inductor, torch.onnx) on demand; a lookup here imports nothing.
_ALLOWED |= {("torch", name): value for name, value in vars(torch).items() if isinstance(value, torch.dtype)}


class Inert:
    """Stands for a global the checkpoint names and we refuse to import: accepts anything, does nothing."""

    qualname = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> Inert:
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    def __repr__(self) -> str:
        return f"<inert {self.qualname}>"


def _allowed(module: str, name: str) -> Any | None:
    return _ALLOWED.get((module, name))


def _restricted_module(skipped: list[str]) -> types.ModuleType:
    """A pickle-module stand-in for `torch.load(pickle_module=...)` whose Unpickler records what it skips."""

    class RestrictedUnpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            found = _allowed(module, name)
            if found is not None:
                return found
            qualname = f"{module}.{name}"
            if qualname not in skipped:
                skipped.append(qualname)
            return type(f"Inert_{name}", (Inert,), {"qualname": qualname})

    module = types.ModuleType("gq_restricted_pickle")
    module.Unpickler = RestrictedUnpickler
    module.load = lambda f, **kw: RestrictedUnpickler(f, **kw).load()
    module.__name__ = "gq_restricted_pickle"
    return module


def load_checkpoint(data: bytes) -> tuple[Any, list[str]]:
    """A `.ckpt`'s object with tensors on the CPU, and the globals replaced by placeholders (empty if none).

    Raises pickle.UnpicklingError, RuntimeError or EOFError for a damaged file (a zip member failing its
    CRC-32 included), or any other error a malformed pickle provokes (the caller words it).
    """
    verify_zip_crc(data)
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True), []
    except pickle.UnpicklingError:
        pass  # weights_only refused some global: read again, placeholders for every such global
    skipped: list[str] = []
    module = _restricted_module(skipped)
    obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=False, pickle_module=module)
    return obj, skipped

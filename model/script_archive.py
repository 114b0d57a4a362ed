"""Read the weights of a TorchScript archive without running anything in it.

``torch.jit.load`` compiles the code stored in an archive and runs it: a class's
``__setstate__`` runs while the archive loads, so a file passed as CLIP weights
could do whatever its author wrote. OpenAI publishes CLIP as such an archive;
this module reads the weights out of one as data only:

- ``<name>/data.pkl`` pickles the module tree: objects of ``__torch__.*``
  classes whose state is a dict of their attributes (parameters, buffers,
  submodules, flags). An unpickler that rebuilds tensors (from the storages
  ``<name>/data/<key>``), plain containers and these attribute dicts, and
  nothing else, reads it. Any other global, and an object whose state is not
  an attribute dict (a class with its own ``__setstate__``), is refused.
- Which attributes are parameters and buffers is declared in the archive's
  code, ``__parameters__ = [...]`` and ``__buffers__ = [...]`` at the top of
  each class under ``<name>/code/``. The code is parsed (``ast``) to read those
  two literals; it is never compiled or run.

Names come out as ``torch.jit.load(path).state_dict()`` gives them, in the same
order: each module's parameters, then its buffers, then its submodules in turn.
"""
from __future__ import annotations

import ast
import collections
import os
import pickle
import sys
import zipfile
from typing import Any

import torch

from utils.checkpoint import CheckpointError

_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "DoubleStorage": torch.float64,
    "LongStorage": torch.int64, "IntStorage": torch.int32, "ShortStorage": torch.int16,
    "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}
# TorchScript pickles typed lists through these; each returns its argument.
_LIST_BUILDERS = ("build_intlist", "build_doublelist", "build_boollist", "build_tensorlist")


class _ScriptObject:
    """An object of a TorchScript class: the class's qualified name and the object's attributes."""
    __slots__ = ("attributes",)
    qualified_name = ""

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict):
            raise pickle.UnpicklingError(
                f"class {self.qualified_name} restores its objects with its own code "
                f"(__setstate__), which this reader does not run")
        self.attributes = state


class _TensorRecord:
    """A tensor rebuilt from the archive; wrapped so that the pickle cannot set state on it."""
    __slots__ = ("tensor",)

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor

    def __setstate__(self, state: Any) -> None:
        raise pickle.UnpicklingError("the pickle sets state on a tensor")


def _plain_list(items: Any) -> list:
    if not isinstance(items, list):
        raise pickle.UnpicklingError(f"a typed list built from a {type(items).__name__}")
    return items


def _restore_type_tag(value: Any, type_name: Any) -> Any:
    return value


class _WeightsUnpickler(pickle.Unpickler):
    """Unpickles an archive's data.pkl into _ScriptObjects, _TensorRecords and plain data."""

    def __init__(self, archive: zipfile.ZipFile, prefix: str):
        super().__init__(archive.open(f"{prefix}/data.pkl"))
        self.archive = archive
        self.prefix = prefix
        self.classes: dict[str, type] = {}
        self.storages: dict[str, torch.Tensor] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module == "__torch__" or module.startswith("__torch__."):
            qualified = f"{module}.{name}"
            if qualified not in self.classes:
                self.classes[qualified] = type(name, (_ScriptObject,),
                                               {"__slots__": (), "qualified_name": qualified})
            return self.classes[qualified]
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch.jit._pickle" and name in _LIST_BUILDERS:
            return _plain_list
        if (module, name) == ("torch.jit._pickle", "restore_type_tag"):
            return _restore_type_tag
        raise pickle.UnpicklingError(f"it refers to {module}.{name}, which is neither a tensor "
                                     f"nor plain data")

    def persistent_load(self, pid: Any) -> torch.Tensor:
        """A storage, as a flat tensor of its dtype, from ``<prefix>/data/<key>``."""
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], torch.dtype) and isinstance(pid[2], str)):
            raise pickle.UnpicklingError(f"unexpected storage reference {pid!r:.100}")
        dtype, key = pid[1], pid[2]
        storage = self.storages.get(key)
        if storage is None:
            name = f"{self.prefix}/data/{key}"
            try:
                raw = bytearray(self.archive.read(name))
            except KeyError:
                raise pickle.UnpicklingError(f"it refers to {name}, which the archive does not "
                                             f"hold") from None
            item = torch.empty((), dtype=dtype).element_size()
            if len(raw) % item:
                raise pickle.UnpicklingError(f"{name} holds {len(raw)} bytes, not a whole "
                                             f"number of {dtype} elements")
            storage = (torch.frombuffer(raw, dtype=dtype) if raw
                       else torch.empty(0, dtype=dtype))
            self.storages[key] = storage
        if storage.dtype != dtype:
            raise pickle.UnpicklingError(f"storage {key} is read as {storage.dtype} and {dtype}")
        return storage


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any,
                    hooks: Any, metadata: Any = None) -> _TensorRecord:
    if not isinstance(storage, torch.Tensor):
        raise pickle.UnpicklingError(f"a tensor built on a {type(storage).__name__}")
    shaped = isinstance(size, tuple) and isinstance(stride, tuple) and len(size) == len(stride)
    if not shaped or not all(type(n) is int for n in (offset, *size, *stride)):
        raise pickle.UnpicklingError(f"a tensor with size {size!r:.60} and stride {stride!r:.60}")
    return _TensorRecord(storage.as_strided(size, stride, offset))


def _class_declarations(source: str) -> dict[str, tuple[bool, list[str], list[str]]]:
    """{class name: (is a Module, __parameters__, __buffers__)} of one code file (literals only)."""
    found = {}
    for node in ast.parse(source).body:
        if not isinstance(node, ast.ClassDef):
            continue
        declared = {"__parameters__": [], "__buffers__": []}
        for item in node.body:
            if (isinstance(item, ast.Assign) and len(item.targets) == 1
                    and isinstance(item.targets[0], ast.Name) and item.targets[0].id in declared):
                names = ast.literal_eval(item.value)
                if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                    raise ValueError(f"class {node.name} declares {item.targets[0].id} as "
                                     f"{names!r:.80}")
                declared[item.targets[0].id] = names
        is_module = any(isinstance(b, ast.Name) and b.id == "Module" for b in node.bases)
        found[node.name] = (is_module, declared["__parameters__"], declared["__buffers__"])
    return found


class _ModuleTree:
    """Walks the unpickled module tree into a state dict, reading declarations from the code."""

    def __init__(self, archive: zipfile.ZipFile, prefix: str):
        self.archive = archive
        self.prefix = prefix
        self.files: dict[str, dict] = {}

    def declaration(self, qualified_name: str) -> tuple[bool, list[str], list[str]]:
        module, _, name = qualified_name.rpartition(".")
        path = f"{self.prefix}/code/{module.replace('.', '/')}.py"
        if path not in self.files:
            try:
                source = self.archive.read(path).decode("utf-8")
            except KeyError:
                raise ValueError(f"class {qualified_name} has no code file {path}") from None
            self.files[path] = _class_declarations(source)
        if name not in self.files[path]:
            raise ValueError(f"class {qualified_name} is not defined in {path}")
        return self.files[path][name]

    def state_dict(self, root: Any) -> dict[str, torch.Tensor]:
        if not isinstance(root, _ScriptObject) or not self.declaration(root.qualified_name)[0]:
            what = getattr(root, "qualified_name", type(root).__name__)
            raise ValueError(f"data.pkl holds a {what}, not a module")
        out: dict[str, torch.Tensor] = {}
        self._collect(root, "", out, set())
        return out

    def _collect(self, obj: _ScriptObject, prefix: str, out: dict, open_objects: set) -> None:
        if id(obj) in open_objects:
            raise ValueError(f"module {prefix.rstrip('.')} contains itself")
        open_objects.add(id(obj))
        attributes = getattr(obj, "attributes", {})
        _, parameters, buffers = self.declaration(obj.qualified_name)
        for name in [*parameters, *buffers]:
            value = attributes.get(name)
            if value is None:  # an Optional parameter that is unset, e.g. a Linear without bias
                continue
            if not isinstance(value, _TensorRecord):
                raise ValueError(f"{prefix}{name} is a {type(value).__name__}, not a tensor")
            out[prefix + name] = value.tensor
        for name, value in attributes.items():
            if isinstance(value, _ScriptObject) and self.declaration(value.qualified_name)[0]:
                self._collect(value, f"{prefix}{name}.", out, open_objects)
        open_objects.discard(id(obj))


def archive_prefix(archive: zipfile.ZipFile) -> str:
    """The archive's top folder, the one that holds data.pkl."""
    prefixes = [n[:-len("/data.pkl")] for n in archive.namelist()
                if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(prefixes) != 1:
        raise ValueError(f"expected one <name>/data.pkl, found {len(prefixes)}")
    return prefixes[0]


def read_script_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict of the module in TorchScript archive ``path``, read without running it.

    Raises CheckpointError naming the file and what was refused or missing.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            prefix = archive_prefix(archive)
            byteorder = f"{prefix}/byteorder"
            if byteorder in archive.namelist():
                order = archive.read(byteorder).decode("ascii", "replace").strip()
                if order != sys.byteorder:
                    raise ValueError(f"its tensors are {order}-endian, this machine is "
                                     f"{sys.byteorder}-endian")
            root = _WeightsUnpickler(archive, prefix).load()
            return _ModuleTree(archive, prefix).state_dict(root)
    except Exception as err:  # noqa: BLE001 - whatever the file holds, one clear refusal
        raise CheckpointError(
            f"{path} was not loaded as CLIP weights: {err}. Nothing in the file was run. "
            f"Use OpenAI's archive or a state dict (torch.save(model.state_dict(), path))."
        ) from err

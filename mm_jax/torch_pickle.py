"""Reading ``torch.save`` files without torch: numpy arrays from a state-dict ``.pth`` / ``.pt``.

ConsisID's face files (facexlib's RetinaFace and BiSeNet, EVA-CLIP) are published as torch pickles,
and sampling reads them as published on machines without torch. Both of torch's formats are read:

- the zip format (torch >= 1.6): ``<name>/data.pkl`` (the object, protocol 2) whose tensors name
  their storages by persistent id ``("storage", <torch.XStorage>, key, location, numel)``, each
  storage stored raw in ``<name>/data/<key>`` (little-endian unless ``<name>/byteorder`` says
  otherwise);
- the legacy format (torch < 1.6): four pickles (magic number, protocol 1001, system info, the
  object with ids ``("storage", <type>, key, location, numel, view)``), the list of storage keys,
  then each storage as its int64 element count and its raw bytes, in that order.

Unpickling is allow-listed: a tensor (``torch._utils._rebuild_tensor_v2``, or ``_rebuild_parameter``
around one), the typed storages of ``STORAGE_DTYPES`` and ``collections.OrderedDict``; any other
global is refused with ``TorchPickleError`` naming it (a pickle can otherwise run any code). A tensor
comes back as a numpy array of its own dtype (``ml_dtypes.bfloat16`` for bfloat16) and layout:
strides and storage offsets are honoured, views of one storage copied out.
"""
from __future__ import annotations

import collections
import pickle
import io
import struct
import zipfile
from pathlib import Path

import ml_dtypes
import numpy as np

STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001


class TorchPickleError(ValueError):
    """A file that is not a torch pickle we read, or one that holds something besides tensors and
    plain containers (the message names the file and what was refused)."""


class _Storage:
    """A storage type, as the pickle names it (``torch.FloatStorage``)."""

    def __init__(self, name: str):
        self.name, self.dtype = name, np.dtype(STORAGE_DTYPES[name])


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    """``storage`` (a flat numpy array) viewed at ``offset`` with ``size`` and ``stride`` (elements), copied."""
    size, stride = tuple(size), tuple(stride)
    if not all(size):
        return np.zeros(size, storage.dtype)
    need = offset + sum((n - 1) * s for n, s in zip(size, stride)) + 1
    if need > storage.size:
        raise TorchPickleError(f"a tensor of size {size}, stride {stride} at offset {offset} overruns its storage "
                               f"of {storage.size} elements")
    item = storage.itemsize
    view = np.lib.stride_tricks.as_strided(storage[offset:], size, [s * item for s in stride], writeable=False)
    return np.array(view)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *state):
    return data


ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
}


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, load_storage, source: str):
        super().__init__(file)
        self.load_storage, self.source = load_storage, source

    def find_class(self, module, name):
        if module == "torch" and name in STORAGE_DTYPES:
            return _Storage(name)
        if (module, name) in ALLOWED:
            return ALLOWED[(module, name)]
        raise TorchPickleError(f"{self.source}: refusing to unpickle {module}.{name}; only tensors "
                               "(torch._utils._rebuild_tensor_v2, _rebuild_parameter), typed storages and "
                               "OrderedDict are read")

    def persistent_load(self, pid):
        if not isinstance(pid, tuple) or not pid or pid[0] not in ("storage", b"storage"):
            raise TorchPickleError(f"{self.source}: unknown persistent id {pid!r} (only tensor storages are read)")
        storage_type = pid[1]
        if not isinstance(storage_type, _Storage):
            raise TorchPickleError(f"{self.source}: storage of type {storage_type!r}; expected one of "
                                   f"{sorted(STORAGE_DTYPES)}")
        return self.load_storage(storage_type, *pid[2:])


def _key(k) -> str:
    return k.decode("ascii") if isinstance(k, bytes) else str(k)


def _load_zip(zf: zipfile.ZipFile, source: str):
    names = zf.namelist()
    pkl = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pkl) != 1:
        raise TorchPickleError(f"{source}: a zip file but not a torch.save archive (no single <name>/data.pkl; "
                               f"it holds {names[:5]}{'...' if len(names) > 5 else ''})")
    prefix = pkl[0][:-len("data.pkl")]
    order = zf.read(prefix + "byteorder").decode().strip() if prefix + "byteorder" in names else "little"
    if order not in ("little", "big"):
        raise TorchPickleError(f"{source}: byteorder {order!r}")
    cache: dict[str, np.ndarray] = {}

    def load_storage(storage_type: _Storage, key, location, numel, *rest):
        key = _key(key)
        if key not in cache:
            dt = storage_type.dtype.newbyteorder("<" if order == "little" else ">") \
                if storage_type.dtype.itemsize > 1 and storage_type.dtype.kind != "V" else storage_type.dtype
            raw = zf.read(prefix + "data/" + key)
            if len(raw) < numel * dt.itemsize:
                raise TorchPickleError(f"{source}: storage {key} holds {len(raw)} bytes; {numel} x {dt} expected")
            cache[key] = np.frombuffer(raw, dt, count=numel).astype(storage_type.dtype, copy=False)
        return cache[key]

    return _Unpickler(io.BytesIO(zf.read(pkl[0])), load_storage, source).load()


class _Pending:
    """A legacy-format tensor whose storage bytes come after the object pickle."""

    def __init__(self, storage, offset, size, stride, *rest):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride


def _fill(obj, storages: dict):
    """``obj`` with every ``_Pending`` tensor built from ``storages``, through dicts, lists and tuples."""
    if isinstance(obj, _Pending):
        return _rebuild_tensor_v2(storages[obj.storage], obj.offset, obj.size, obj.stride)
    if isinstance(obj, dict):
        return type(obj)((k, _fill(v, storages)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_fill(v, storages) for v in obj)
    return obj


class _LegacyUnpickler(_Unpickler):
    def find_class(self, module, name):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _Pending
        return super().find_class(module, name)


def _load_legacy(f, source: str):
    try:
        magic = pickle.load(f)
    except Exception as e:
        raise TorchPickleError(f"{source}: neither a zip nor a legacy torch.save file ({e})") from None
    if magic != LEGACY_MAGIC:
        raise TorchPickleError(f"{source}: neither a zip nor a legacy torch.save file (bad magic number)")
    if (proto := pickle.load(f)) != LEGACY_PROTOCOL:
        raise TorchPickleError(f"{source}: legacy torch.save protocol {proto}; {LEGACY_PROTOCOL} is read")
    sys_info = pickle.load(f)
    little = sys_info.get("little_endian", True) if isinstance(sys_info, dict) else True
    roots: dict[str, tuple[_Storage, int]] = {}
    views: dict[str, tuple[str, int, int]] = {}

    def load_storage(storage_type: _Storage, key, location, numel, view=None):
        key = _key(key)
        roots.setdefault(key, (storage_type, int(numel)))
        if view is None:
            return key
        vkey, offset, vsize = view
        views[_key(vkey)] = (key, int(offset), int(vsize))
        return _key(vkey)

    obj = _LegacyUnpickler(f, load_storage, source).load()
    data: dict[str, np.ndarray] = {}
    for key in (_key(k) for k in pickle.load(f)):
        storage_type, numel = roots[key]
        dt = storage_type.dtype
        if dt.itemsize > 1 and dt.kind != "V":
            dt = dt.newbyteorder("<" if little else ">")
        head = f.read(8)
        count = struct.unpack("<q" if little else ">q", head)[0] if len(head) == 8 else -1
        raw = f.read(max(count, 0) * dt.itemsize)
        if count != numel or len(raw) != count * dt.itemsize:
            raise TorchPickleError(f"{source}: storage {key} is truncated or mis-sized")
        data[key] = np.frombuffer(raw, dt).astype(storage_type.dtype, copy=False)
    for vkey, (root, offset, vsize) in views.items():
        data[vkey] = data[root][offset:offset + vsize]
    return _fill(obj, data)


def load(path: str | Path):
    """The object ``torch.save`` wrote to ``path`` with every tensor as a numpy array.
    ``FileNotFoundError`` if there is no such file; ``TorchPickleError`` for anything else unreadable."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            return _load_zip(zf, str(path))
    with open(path, "rb") as f:
        return _load_legacy(f, str(path))


def state_dict(path: str | Path, keys: tuple[str, ...] = ("state_dict", "model", "module")) -> dict[str, np.ndarray]:
    """The tensors of a state-dict file as ``{key: numpy array}``: the top-level dict, or the dict
    under the first of ``keys`` it holds (checkpoints that wrap their weights), with DataParallel's
    ``module.`` prefix kept (callers strip what their format allows). Non-tensor entries are refused."""
    obj = load(path)
    for k in keys:
        if isinstance(obj, dict) and isinstance(obj.get(k), dict):
            obj = obj[k]
            break
    if not isinstance(obj, dict):
        raise TorchPickleError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    bad = [k for k, v in obj.items() if not isinstance(v, np.ndarray)]
    if bad:
        raise TorchPickleError(f"{path}: entries {bad[:5]} are not tensors; expected a state dict")
    return dict(obj)



"""msgpack encoding of non-tensor training state (RNG states, `state_dict()`s of schedulers, samplers, ...).

Plain data only: tuples, tensors, numpy arrays and scalars travel as msgpack extension types holding dtype, shape
and raw bytes, so decoding never runs code (unlike pickle) and a value comes back with its type: a tuple a tuple,
an np.float32 an np.float32 (as a Python float it would compute in float64 after a restore). Integers beyond
msgpack's 64 bits (a numpy Generator's PCG64 state) travel the same way.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import msgpack
import numpy as np
import torch

_TUPLE, _TENSOR, _NDARRAY, _NPSCALAR, _BIGINT = 1, 2, 3, 4, 5


def _default(obj: Any) -> Any:
    if isinstance(obj, tuple):
        return msgpack.ExtType(_TUPLE, pack(list(obj)))
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        raw = t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        return msgpack.ExtType(_TENSOR, pack([str(t.dtype).removeprefix("torch."), list(t.shape), raw]))
    if isinstance(obj, (np.ndarray, np.generic)):
        if obj.dtype.hasobject:  # its bytes are pointers: caught now, not when a restore decodes them
            raise TypeError(f"ftmem cannot snapshot a numpy array of Python objects ({obj!r:.80}); "
                            f"state_dict() must hold plain data, tensors or numpy arrays of numbers or strings")
        a = np.asarray(obj, order="C")  # ascontiguousarray would make a 0-d array 1-d
        return msgpack.ExtType(_NDARRAY if isinstance(obj, np.ndarray) else _NPSCALAR,
                               pack([a.dtype.str, list(a.shape), a.tobytes()]))
    if isinstance(obj, (dict, OrderedDict)):
        return dict(obj)
    if isinstance(obj, int) and not -2**63 <= obj < 2**64:
        return msgpack.ExtType(_BIGINT, int(obj).to_bytes(obj.bit_length() // 8 + 1, "little", signed=True))
    if isinstance(obj, (bool, int, float, str, bytes, list)):  # subclasses (e.g. IntEnum) as their base
        for base in (bool, int, float, str, bytes, list):
            if isinstance(obj, base):
                return base(obj)
    raise TypeError(f"ftmem cannot snapshot a value of type {type(obj).__name__} ({obj!r:.80}); "
                    f"state_dict() must hold plain data, tensors or numpy arrays")


def _ext_hook(code: int, data: bytes) -> Any:
    if code == _TUPLE:
        return tuple(unpack(data))
    if code == _TENSOR:
        dtype, shape, raw = unpack(data)
        flat = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
        return flat.view(getattr(torch, dtype)).reshape(shape)
    if code in (_NDARRAY, _NPSCALAR):
        dtype, shape, raw = unpack(data)
        a = np.frombuffer(raw, dtype=np.dtype(dtype)).reshape(shape).copy()
        return a if code == _NDARRAY else a[()]
    if code == _BIGINT:
        return int.from_bytes(data, "little", signed=True)
    return msgpack.ExtType(code, data)


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, default=_default, use_bin_type=True, strict_types=True)


def unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, ext_hook=_ext_hook, raw=False, strict_map_key=False)

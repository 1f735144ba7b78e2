"""JSON in and out of the request path: orjson, with the stdlib as the fallback for NaN/Infinity."""

from __future__ import annotations

import base64
import json
from typing import Any

import numpy as np
import orjson
import simdjson

from edgekit_runtime.errors import InvalidInputError

__all__ = ["dumps", "jsonable", "loads", "loads_tensors"]

_OPTS = orjson.OPT_SERIALIZE_NUMPY
# Below this size orjson's Python objects are cheaper than walking simdjson's lazy proxies.
_FAST_PATH_BYTES = 32 * 1024


def loads(body: bytes | memoryview) -> Any:
    """Parse a request body; NaN, Infinity and -Infinity are accepted (TF Serving does)."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raw = bytes(body)
        if b"NaN" in raw or b"Infinity" in raw:
            try:
                return json.loads(raw)
            except (ValueError, RecursionError):
                pass
        msg = f"malformed JSON body: {e}"
        raise InvalidInputError(msg) from None


def loads_tensors(body: bytes | memoryview, tensor_keys: frozenset[str]) -> Any:
    """Parse a request body, turning big numeric arrays under ``tensor_keys`` straight into arrays.

    Building one Python float per element and then an array from them dominates big JSON
    requests (an image is ~150k numbers: ~20 ms with orjson + numpy, ~50 ms when nested). simdjson
    copies a numeric array of any nesting into a buffer in C; the shape comes from the first element
    at each level and must account for every element, else the value goes the slow way and is
    reported as ragged there. Anything else (small bodies, NaN, strings, b64) takes ``loads``.
    """
    if len(body) < _FAST_PATH_BYTES:
        return loads(body)
    try:
        doc = simdjson.Parser().parse(bytes(body))
    except ValueError:
        return loads(body)  # NaN / Infinity, or malformed: the slow path accepts or explains
    return _convert(doc, tensor_keys, in_tensor=False)


def _convert(node: Any, keys: frozenset[str], *, in_tensor: bool) -> Any:
    if isinstance(node, simdjson.Object):
        # Under a tensor key, an object maps input names to tensors (TF Serving's columnar format).
        # (items() would convert the values to Python objects: index the lazy proxy instead)
        return {k: _convert(node[k], keys, in_tensor=in_tensor or k in keys) for k in node.keys()}  # noqa: SIM118
    if isinstance(node, simdjson.Array):
        if in_tensor:
            arr = _numeric(node)
            if arr is not None:
                return arr
        return node.as_list() if in_tensor else [_convert(node[i], keys, in_tensor=False) for i in range(len(node))]
    return node


def _numeric(node: Any) -> np.ndarray | None:
    shape: list[int] = []
    leaf: Any = node
    while isinstance(leaf, simdjson.Array):
        shape.append(len(leaf))
        if not len(leaf):
            return None
        leaf = leaf[0]
    if isinstance(leaf, bool) or not isinstance(leaf, int | float):
        return None
    kind = "i" if isinstance(leaf, int) else "d"
    try:
        buf = node.as_buffer(of_type=kind)
    except (TypeError, ValueError):
        if kind == "d":
            return None
        try:  # ints first, floats later in the array
            buf, kind = node.as_buffer(of_type="d"), "d"
        except (TypeError, ValueError):
            return None
    arr = np.frombuffer(buf, dtype=np.int64 if kind == "i" else np.float64)
    if arr.size != int(np.prod(shape)):
        return None  # ragged: let the slow path name the problem
    return arr.reshape(shape)


def jsonable(arr: np.ndarray) -> Any:
    """What orjson can write for an output array: numpy itself when it can, else lists (bytes as b64)."""
    if arr.dtype == object:
        return [_scalar(x) for x in arr.ravel()] if arr.ndim <= 1 else [jsonable(a) for a in arr]
    if arr.dtype.byteorder == ">" or not arr.flags.c_contiguous:
        arr = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("="))
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        return _NonFinite(arr)  # orjson writes NaN as null; the stdlib fallback keeps NaN / Infinity
    return arr


class _NonFinite:
    """An array with NaN/Infinity: orjson refuses it, so ``dumps`` falls back to the stdlib."""

    __slots__ = ("arr",)

    def __init__(self, arr: np.ndarray) -> None:
        self.arr = arr


def _scalar(x: Any) -> Any:
    if isinstance(x, bytes):
        try:
            return x.decode()
        except UnicodeDecodeError:
            return {"b64": base64.b64encode(x).decode()}
    return x


def dumps(doc: Any) -> bytes:
    try:
        return orjson.dumps(doc, option=_OPTS)
    except TypeError:
        # An output with NaN/Infinity: write them the way TF Serving does (not as null).
        return json.dumps(doc, default=_default).encode()


def _default(o: Any) -> Any:
    if isinstance(o, _NonFinite):
        return o.arr.tolist()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, np.generic):
        return o.item()
    msg = f"cannot write {type(o).__name__} as JSON"
    raise TypeError(msg)

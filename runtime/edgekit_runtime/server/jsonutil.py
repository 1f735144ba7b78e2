"""JSON in and out of the request path: orjson, with the stdlib as the fallback for NaN/Infinity."""

from __future__ import annotations

import base64
import json
from typing import Any

import numpy as np
import orjson

from edgekit_runtime.errors import InvalidInputError

__all__ = ["dumps", "jsonable", "loads"]

_OPTS = orjson.OPT_SERIALIZE_NUMPY


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

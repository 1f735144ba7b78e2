"""Tensor specs, dtype names and quantization helpers shared by bundles, backends and servers."""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from edgekit_runtime.errors import InvalidInputError

# numpy dtype name <-> Open Inference Protocol v2 datatype.
_NP_TO_V2: dict[str, str] = {
    "bool": "BOOL",
    "uint8": "UINT8",
    "uint16": "UINT16",
    "uint32": "UINT32",
    "uint64": "UINT64",
    "int8": "INT8",
    "int16": "INT16",
    "int32": "INT32",
    "int64": "INT64",
    "float16": "FP16",
    "float32": "FP32",
    "float64": "FP64",
    "object": "BYTES",
    "bytes": "BYTES",
}
_V2_TO_NP: dict[str, str] = {v: k for k, v in _NP_TO_V2.items() if k != "bytes"}
DTYPES: frozenset[str] = frozenset(_NP_TO_V2) - {"bytes"}


# Looked up on every request: numpy's dtype.name and np.dtype(str) are slow next to a dict hit.
_V2_DTYPES: dict[str, np.dtype[Any]] = {v: np.dtype(k) for v, k in _V2_TO_NP.items()}
_DTYPE_V2: dict[np.dtype[Any], str] = {np.dtype(k): v for k, v in _NP_TO_V2.items() if k != "bytes"}


def v2_datatype(dtype: str | np.dtype[Any]) -> str:
    """The Open Inference Protocol datatype name of a numpy dtype (or its name)."""
    if isinstance(dtype, str):
        return _NP_TO_V2[dtype]
    found = _DTYPE_V2.get(dtype)
    return found if found is not None else _NP_TO_V2[dtype.name]


def numpy_dtype(v2: str) -> np.dtype[Any]:
    """The numpy dtype of an Open Inference Protocol datatype name; InvalidInputError if unknown."""
    try:
        return _V2_DTYPES[v2] if v2 in _V2_DTYPES else _V2_DTYPES[v2.upper()]
    except KeyError:
        known = ", ".join(sorted(_V2_TO_NP))
        msg = f"unknown datatype {v2!r}; use one of {known}"
        raise InvalidInputError(msg) from None


class QuantParams(BaseModel):
    """Affine quantization of a tensor: real = scale * (q - zero_point). Per-tensor has one of each."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    scale: list[float]
    zero_point: list[int]
    axis: int = 0


class TensorSpec(BaseModel):
    """Name, dtype and shape of a model input or output; -1 marks a dynamic dimension."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    dtype: str
    shape: list[int]
    quantization: QuantParams | None = None

    @property
    def np_dtype(self) -> np.dtype[Any]:
        return np.dtype(self.dtype)

    @property
    def dynamic_batch(self) -> bool:
        return bool(self.shape) and self.shape[0] == -1

    def describe(self) -> str:
        return f"{self.name}: {self.dtype}{self.shape}"

    def check(self, value: np.ndarray, *, batched: bool = True) -> None:
        """Raise InvalidInputError naming this input when ``value`` has the wrong rank or shape."""
        expected = self.shape if batched else self.shape[1:]
        got = list(value.shape)
        if len(got) != len(expected) or any(e not in (-1, g) for e, g in zip(expected, got, strict=True)):
            if batched and self.shape and self.shape[0] != -1:
                # A fixed batch of 1 is batched row by row by the runtime; any batch size works.
                tail_ok = len(got) == len(expected) and all(
                    e in (-1, g) for e, g in zip(expected[1:], got[1:], strict=True)
                )
                if tail_ok:
                    return
            msg = f"input {self.name!r} has shape {got}; expected {expected} (-1 = any size), dtype {self.dtype}"
            raise InvalidInputError(msg)


class Signature(BaseModel):
    """The inputs and outputs of a model, in the model's own order."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    inputs: list[TensorSpec]
    outputs: list[TensorSpec] = Field(default_factory=list)

    def input(self, name: str) -> TensorSpec:
        for spec in self.inputs:
            if spec.name == name:
                return spec
        names = ", ".join(s.name for s in self.inputs)
        msg = f"model has no input named {name!r}; its inputs are: {names}"
        raise InvalidInputError(msg)


def quantize(x: np.ndarray, spec: TensorSpec) -> np.ndarray:
    """Float -> the integer dtype of a quantized tensor, with its scale and zero point (per-tensor)."""
    q = spec.quantization
    if q is None or not np.issubdtype(spec.np_dtype, np.integer) or np.issubdtype(x.dtype, np.integer):
        return x.astype(spec.np_dtype, copy=False)
    info = np.iinfo(spec.np_dtype)
    with np.errstate(over="ignore"):  # values beyond float32 saturate like any other out-of-range value
        scaled = np.round(x.astype(np.float32) / q.scale[0]) + q.zero_point[0]
    out: np.ndarray = np.clip(scaled, info.min, info.max).astype(spec.np_dtype)
    return out


def dequantize(x: np.ndarray, spec: TensorSpec) -> np.ndarray:
    """The integer values of a quantized output -> float32; float tensors pass through."""
    q = spec.quantization
    if q is None or not np.issubdtype(x.dtype, np.integer):
        return x
    out: np.ndarray = (x.astype(np.float32) - q.zero_point[0]) * np.float32(q.scale[0])
    return out


def _out_of_range(name: str, label: str, dtype: np.dtype[Any], value: Any) -> InvalidInputError:
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        bounds = f"integers in [{info.min}, {info.max}]"
    else:
        bounds = f"numbers within +-{float(np.finfo(dtype).max):.6g} (or NaN, Infinity)"
    shown = str(value)
    shown = shown if len(shown) <= 40 else f"{shown[:20]}...({len(shown)} digits)"
    return InvalidInputError(f"input {name!r}: {label} values must be {bounds}; got {shown}")


def _int_range(value: np.ndarray, dtype: np.dtype[Any], name: str, label: str) -> None:
    info = np.iinfo(dtype)
    if value.size:
        lo, hi = value.min(), value.max()
        # max + 1 and min are powers of two, exact as floats too (float(2**63 - 1) rounds up to 2**63)
        if lo < info.min:
            raise _out_of_range(name, label, dtype, lo)
        if hi >= info.max + 1 if value.dtype.kind == "f" else hi > info.max:
            raise _out_of_range(name, label, dtype, hi)


def _integers(value: np.ndarray, dtype: np.dtype[Any], name: str, label: str) -> np.ndarray:
    """Integers, or floats with integral values (JSON does not tell 1 from 1.0), within ``dtype``'s
    range -> ``dtype``; InvalidInputError otherwise. Checked before the cast, which would wrap."""
    if value.dtype.kind == "f" and value.size:
        if not np.isfinite(value).all():
            msg = f"input {name!r}: {label} values must be integers; got NaN or infinite numbers"
            raise InvalidInputError(msg)
        _int_range(value, dtype, name, label)
        if not np.all(np.mod(value, 1) == 0):
            msg = f"input {name!r}: {label} values must be integers; got non-integer numbers"
            raise InvalidInputError(msg)
    else:
        _int_range(value, dtype, name, label)
    return value.astype(dtype)


def coerce_input(value: np.ndarray, spec: TensorSpec) -> np.ndarray:
    """Bring a client's array to the dtype the model wants: quantize floats for integer inputs,
    cast between numeric kinds only where no information is lost silently; else InvalidInputError."""
    want = spec.np_dtype
    if value.dtype == want:
        return value
    floats = np.issubdtype(value.dtype, np.floating)
    if spec.quantization is not None and floats:
        if value.size and not np.isfinite(value).all():
            msg = f"input {spec.name!r}: a quantized {spec.dtype} input takes finite numbers; got NaN or infinite"
            raise InvalidInputError(msg)
        return quantize(value, spec)
    if np.issubdtype(want, np.floating) and (np.issubdtype(value.dtype, np.number) or value.dtype == np.bool_):
        return value.astype(want)
    if np.issubdtype(want, np.integer) and (floats or np.issubdtype(value.dtype, np.integer)):
        return _integers(value, want, spec.name, spec.dtype)
    msg = f"input {spec.name!r} expects dtype {spec.dtype}; got {value.dtype}"
    raise InvalidInputError(msg)


# -- JSON values of a declared type -------------------------------------------------------------

_WANTED = {"b": "true or false", "i": "integers", "u": "integers", "f": "numbers", "O": "strings"}


def from_json(value: Any, dtype: np.dtype[Any], name: str, label: str = "") -> np.ndarray:
    """A JSON array (nested lists, or the numeric array of the fast JSON path) as an array of ``dtype``,
    exactly: InvalidInputError naming the input (and ``label``, the datatype's name) when an element is
    not of that type (BOOL takes true/false, integers take integers, floats take numbers, BYTES
    strings) or out of its range. Nothing is truncated, wrapped, parsed from strings or saturated; the
    only conversion is the exact one JSON itself implies (1.0 is the integer 1)."""
    label = label or dtype.name
    if not isinstance(value, list | np.ndarray):
        msg = f"input {name!r}: 'data' must be an array of {label} values, got {type(value).__name__}"
        raise InvalidInputError(msg)
    kind = dtype.kind
    try:
        raw = value if isinstance(value, np.ndarray) else np.asarray(value, dtype=object if kind == "O" else None)
    except (ValueError, TypeError, OverflowError, RecursionError) as e:
        msg = f"input {name!r}: 'data' is not a well-formed {label} array ({e})"
        raise InvalidInputError(msg) from None
    if not raw.size:
        return np.empty(raw.shape, dtype)
    got = raw.dtype.kind
    if kind == "O":
        try:
            encoded: np.ndarray = np.vectorize(_utf8, otypes=[object])(raw)
            return encoded
        except UnicodeEncodeError:
            msg = f"input {name!r}: {label} 'data' holds a string that is not valid Unicode (a lone surrogate)"
            raise InvalidInputError(msg) from None
        except TypeError:
            pass
    elif got == "O" and kind in "iuf" and all(type(x) is int for x in raw.flat):
        # integers beyond 64 bits (the stdlib parser of bodies with NaN keeps them exact)
        big = max(raw.flat, key=abs)
        if kind == "f" and abs(big) <= float(np.finfo(dtype).max):  # a Python int, compared exactly
            return raw.astype(dtype)
        raise _out_of_range(name, label, dtype, big)
    elif kind == "b" and got == "b":
        return raw
    elif kind in "iu" and got in "iuf":
        return _integers(raw, dtype, name, label)
    elif kind == "f" and got in "iuf":
        with np.errstate(over="ignore"):
            out = raw.astype(dtype)
        if dtype.itemsize < 8 and not np.isfinite(out).all():
            overflow = ~np.isfinite(out) & np.isfinite(raw)
            if overflow.any():
                raise _out_of_range(name, label, dtype, raw[overflow].flat[0])
        return out
    msg = f"input {name!r}: {label} 'data' must hold {_WANTED.get(kind, kind)} only; got {_describe(raw)}"
    raise InvalidInputError(msg)


def _utf8(x: Any) -> bytes:
    if not isinstance(x, str):
        raise TypeError
    return x.encode()


def _describe(raw: np.ndarray) -> str:
    if raw.dtype.kind != "O":
        return {"b": "booleans", "i": "integers", "u": "integers", "f": "floating-point numbers", "U": "strings"}.get(
            raw.dtype.kind, str(raw.dtype)
        )
    for x in raw.flat:
        if type(x) not in (int, float):
            return "null" if x is None else type(x).__name__
    return "mixed values"

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
    scaled = np.round(x.astype(np.float32) / q.scale[0]) + q.zero_point[0]
    out: np.ndarray = np.clip(scaled, info.min, info.max).astype(spec.np_dtype)
    return out


def dequantize(x: np.ndarray, spec: TensorSpec) -> np.ndarray:
    """The integer values of a quantized output -> float32; float tensors pass through."""
    q = spec.quantization
    if q is None or not np.issubdtype(x.dtype, np.integer):
        return x
    return (x.astype(np.float32) - q.zero_point[0]) * np.float32(q.scale[0])


def coerce_input(value: np.ndarray, spec: TensorSpec) -> np.ndarray:
    """Bring a client's array to the dtype the model wants: quantize floats for integer inputs,
    cast between numeric kinds only where no information is lost silently; else InvalidInputError."""
    want = spec.np_dtype
    if value.dtype == want:
        return value
    if spec.quantization is not None and np.issubdtype(value.dtype, np.floating):
        return quantize(value, spec)
    if np.issubdtype(want, np.floating) and (np.issubdtype(value.dtype, np.number) or value.dtype == np.bool_):
        return value.astype(want)
    if np.issubdtype(want, np.integer) and np.issubdtype(value.dtype, np.integer):
        info = np.iinfo(want)
        if value.size and (value.min() < info.min or value.max() > info.max):
            msg = f"input {spec.name!r} has values outside the range of {spec.dtype} [{info.min}, {info.max}]"
            raise InvalidInputError(msg)
        return value.astype(want)
    if np.issubdtype(want, np.integer) and np.issubdtype(value.dtype, np.floating):
        if value.size and not np.all(np.mod(value, 1) == 0):
            msg = f"input {spec.name!r} expects {spec.dtype}; got non-integer numbers"
            raise InvalidInputError(msg)
        return coerce_input(value.astype(np.int64), spec)
    msg = f"input {spec.name!r} expects dtype {spec.dtype}; got {value.dtype}"
    raise InvalidInputError(msg)

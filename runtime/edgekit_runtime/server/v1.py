"""TF Serving's REST API (``/v1/models/...``): decode requests, encode replies. Logic is in the dataplane."""

from __future__ import annotations

import asyncio
import base64
import binascii
from typing import Any

import numpy as np

from edgekit_runtime.dataplane import DataPlane
from edgekit_runtime.errors import InvalidInputError
from edgekit_runtime.model import LoadedModel
from edgekit_runtime.runtime import VersionStatus
from edgekit_runtime.server.errors import Reply, json_reply
from edgekit_runtime.server.jsonutil import dumps, jsonable, loads_tensors
from edgekit_runtime.tensors import TensorSpec, from_json

__all__ = ["label_version", "metadata", "predict", "reload", "status"]

_DT = {
    "float32": "DT_FLOAT",
    "float64": "DT_DOUBLE",
    "float16": "DT_HALF",
    "int8": "DT_INT8",
    "uint8": "DT_UINT8",
    "int16": "DT_INT16",
    "uint16": "DT_UINT16",
    "int32": "DT_INT32",
    "uint32": "DT_UINT32",
    "int64": "DT_INT64",
    "uint64": "DT_UINT64",
    "bool": "DT_BOOL",
    "object": "DT_STRING",
}


def _status_doc(items: list[VersionStatus]) -> dict[str, Any]:
    return {
        "model_version_status": [
            {
                "version": str(s.version),
                "state": s.state,
                "status": {"error_code": s.error_code, "error_message": s.error_message},
            }
            for s in items
        ]
    }


def label_version(dp: DataPlane, name: str, label: str) -> str:
    """TF Serving's ``/labels/L``: the version that holds label ``L`` now (``stable``: the serving
    one; ``canary``: one in a shadow check or a health window). NotFoundError (404) names the
    labels otherwise; ``/labels/L`` then answers whatever ``/versions/N`` answers."""
    return str(dp.runtime.label(name, label))


def status(dp: DataPlane, name: str, version: str | None) -> Reply:
    return json_reply(_status_doc(dp.status(name, version)))


async def reload(dp: DataPlane, name: str) -> Reply:
    """``POST /v1/models/{m}:reload`` (edgekit's admin route): rescan now, retry failed versions."""
    items = await asyncio.to_thread(dp.reload, name)
    return json_reply(_status_doc(items))


def _tensor_info(spec: TensorSpec) -> dict[str, Any]:
    return {
        "dtype": _DT.get(spec.dtype, "DT_INVALID"),
        "tensor_shape": {"dim": [{"size": str(d), "name": ""} for d in spec.shape], "unknown_rank": False},
        "name": spec.name,
    }


def metadata(dp: DataPlane, name: str, version: str | None) -> Reply:
    lm = dp.model(name, version)
    sig = {
        "inputs": {s.name: _tensor_info(s) for s in lm.inputs},
        "outputs": {s.name: _tensor_info(s) for s in lm.outputs},
        "method_name": "tensorflow/serving/predict",
    }
    return json_reply(
        {
            "model_spec": {"name": lm.name, "signature_name": "", "version": str(lm.version)},
            "metadata": {"signature_def": {"signature_def": {"serving_default": sig}}},
        }
    )


# -- predict ----------------------------------------------------------------------------------


# "instances" rows, "inputs" columns (a list, or an object of named lists).
_TENSOR_KEYS = frozenset({"instances", "inputs"})


def _is_b64(x: Any) -> bool:
    return isinstance(x, dict) and len(x) == 1 and "b64" in x


def _first_leaf(x: Any) -> Any:
    while isinstance(x, list) and x:
        x = x[0]
    return x


def _b64(x: Any, where: str) -> Any:
    if isinstance(x, list):
        return [_b64(v, where) for v in x]
    if _is_b64(x):
        try:
            return base64.b64decode(x["b64"], validate=True)
        except (binascii.Error, TypeError, ValueError):
            msg = f"input {where!r}: invalid base64 in a {{'b64': ...}} value"
            raise InvalidInputError(msg) from None
    return x


def _array(value: Any, spec: TensorSpec | None, name: str, lm: LoadedModel) -> np.ndarray:
    """A JSON value -> an array of the input's dtype; {"b64": ...} leaves are decoded."""
    expected = f"dtype {spec.dtype}, shape {spec.shape}" if spec is not None else ""
    try:
        if isinstance(_first_leaf(value), dict):
            decoded = _b64(value, name)
            if spec is not None and spec.dtype != "object":
                # A numeric input given as b64: each value holds the raw little-endian bytes of one row.
                dt = spec.np_dtype.newbyteorder("<")
                tail = [d if d > 0 else -1 for d in spec.shape[1:]]
                rows = decoded if isinstance(decoded, list) else [decoded]
                return np.stack([np.frombuffer(r, dtype=dt).reshape(tail) for r in rows])
            arr = np.empty(_shape_of(decoded), dtype=object)
            arr[...] = decoded
            return arr
        if spec is not None and spec.np_dtype.kind == "f" and isinstance(value, list | np.ndarray):
            return from_json(value, spec.np_dtype, name)  # numbers only: no bools, strings or nulls
        arr = np.asarray(value)
    except InvalidInputError:
        raise
    except (ValueError, TypeError, OverflowError, RecursionError) as e:
        msg = f"input {name!r} is not a well-formed array ({e}); expected {expected or lm.describe_inputs()}"
        raise InvalidInputError(msg) from None
    if arr.dtype.kind in "OUS" and (spec is None or spec.dtype != "object"):
        msg = f"input {name!r} has non-numeric or ragged values; expected {expected or lm.describe_inputs()}"
        raise InvalidInputError(msg)
    if arr.dtype.kind in "US":  # JSON strings for a string input: numpy's fixed-width text -> the str objects it takes
        arr = arr.astype(object)
    return arr


def _shape_of(x: Any) -> tuple[int, ...]:
    shape = []
    while isinstance(x, list):
        shape.append(len(x))
        x = x[0] if x else None
    return tuple(shape)


def decode(body: bytes, lm: LoadedModel) -> tuple[dict[str, np.ndarray], bool]:
    """The feeds of a predict body and whether it used the row ("instances") format."""
    doc = loads_tensors(body, _TENSOR_KEYS)
    if not isinstance(doc, dict):
        msg = 'the body must be a JSON object with "instances" (rows) or "inputs" (columns)'
        raise InvalidInputError(msg)
    sig = doc.get("signature_name")
    if sig not in (None, "", "serving_default"):
        msg = f"signature {sig!r} does not exist; this model has only 'serving_default'"
        raise InvalidInputError(msg)
    rows_fmt = "instances" in doc
    if rows_fmt == ("inputs" in doc):
        msg = 'give exactly one of "instances" (row format) or "inputs" (columnar format)'
        raise InvalidInputError(msg)
    specs = {s.name: s for s in lm.inputs}
    if rows_fmt:
        instances = doc["instances"]
        if not isinstance(instances, list | np.ndarray) or not len(instances):
            msg = '"instances" must be a non-empty list, one element per row'
            raise InvalidInputError(msg)
        first = instances[0]
        if isinstance(first, dict) and not _is_b64(first):
            names = list(first)
            columns: dict[str, Any] = {}
            for k in names:
                try:
                    columns[k] = [inst[k] for inst in instances]
                except (KeyError, TypeError):
                    msg = f"every instance must be an object with the same inputs ({names}); one lacks {k!r}"
                    raise InvalidInputError(msg) from None
            if any(not isinstance(inst, dict) or len(inst) != len(names) for inst in instances):
                msg = f"every instance must be an object with the same inputs ({names})"
                raise InvalidInputError(msg)
        else:
            if len(lm.inputs) != 1:
                msg = f"this model has several inputs; send each instance as an object: {lm.describe_inputs()}"
                raise InvalidInputError(msg)
            columns = {lm.inputs[0].name: instances}
    else:
        inputs = doc["inputs"]
        if isinstance(inputs, dict) and not _is_b64(inputs):
            columns = inputs
        else:
            if len(lm.inputs) != 1:
                msg = f'this model has several inputs; send "inputs" as an object: {lm.describe_inputs()}'
                raise InvalidInputError(msg)
            columns = {lm.inputs[0].name: inputs}
    return {k: _array(v, specs.get(k), k, lm) for k, v in columns.items()}, rows_fmt


def encode(outputs: dict[str, np.ndarray], rows_fmt: bool) -> bytes:
    if len(outputs) == 1:
        (arr,) = outputs.values()
        return dumps({"predictions" if rows_fmt else "outputs": jsonable(arr)})
    if not rows_fmt:
        return dumps({"outputs": {k: jsonable(v) for k, v in outputs.items()}})
    n = next(iter(outputs.values())).shape[0]
    return dumps({"predictions": [{k: jsonable(v[i]) for k, v in outputs.items()} for i in range(n)]})


async def predict(dp: DataPlane, name: str, version: str | None, body: bytes) -> Reply:
    lm = dp.model(name, version)
    with dp.counted(lm):
        feeds, rows_fmt = decode(body, lm)
        outputs = await dp.infer(lm, feeds, pinned=version is not None)
        return Reply(200, encode(outputs, rows_fmt))

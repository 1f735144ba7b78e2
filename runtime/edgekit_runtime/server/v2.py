"""The Open Inference Protocol v2 (KServe / Triton / MLServer), with the binary tensor data extension.

Binary extension: the body is the JSON header followed by raw little-endian tensors; the header's
length is in ``Inference-Header-Content-Length``; an input's ``parameters.binary_data_size`` says how
many bytes it takes; BYTES elements are each prefixed with a 4-byte little-endian length. Outputs are
binary when asked per output (``parameters.binary_data``) or for all (``parameters.binary_data_output``),
and the reply uses the same layout.
"""

from __future__ import annotations

import asyncio
import struct
import sys
from math import prod
from typing import Any

import numpy as np
import orjson

from edgekit_runtime.dataplane import DataPlane
from edgekit_runtime.errors import InvalidInputError
from edgekit_runtime.model import LoadedModel
from edgekit_runtime.server.errors import Reply, json_reply
from edgekit_runtime.server.jsonutil import dumps, jsonable, loads_tensors
from edgekit_runtime.tensors import TensorSpec, from_json, numpy_dtype, v2_datatype

__all__ = ["HEADER_LENGTH", "infer", "model_metadata", "model_ready"]

HEADER_LENGTH = b"inference-header-content-length"
_OCTET = b"application/octet-stream"
_TENSOR_KEYS = frozenset({"data"})
_LITTLE = sys.byteorder == "little"
_PLATFORM = {"tflite": "tensorflow_lite", "onnx": "onnxruntime_onnx"}


def model_metadata(dp: DataPlane, name: str, version: str | None) -> Reply:
    lm = dp.model(name, version)
    return json_reply(
        {
            "name": lm.name,
            "versions": [str(v) for v in dp.versions(name)] if version is None else [str(lm.version)],
            "platform": _PLATFORM.get(lm.manifest.format, lm.manifest.format),
            "inputs": [{"name": s.name, "datatype": v2_datatype(s.dtype), "shape": s.shape} for s in lm.inputs],
            "outputs": [{"name": s.name, "datatype": v2_datatype(s.dtype), "shape": s.shape} for s in lm.outputs],
        }
    )


def model_ready(dp: DataPlane, name: str, version: str | None) -> Reply:
    ready, why = dp.model_ready(name, version)
    doc: dict[str, Any] = {"name": name, "ready": ready}
    if why:
        doc["error"] = why
    # The protocol: 200 means ready, a 4xx means not ready.
    return json_reply(doc, 200 if ready else 400)


async def load(dp: DataPlane, name: str) -> Reply:
    """``POST /v2/repository/models/{m}/load`` (Triton's repository extension): rescan and retry now."""
    await asyncio.to_thread(dp.reload, name)
    ready, why = dp.model_ready(name)
    if not ready:
        return json_reply({"error": why}, 400)
    return json_reply({})


# -- infer ------------------------------------------------------------------------------------


def _bytes_elements(buf: memoryview, count: int, name: str) -> np.ndarray:
    if count * 4 > len(buf):  # before allocating: a claimed shape must not cost memory
        msg = f"input {name!r}: {len(buf)} bytes of BYTES data cannot hold {count} elements (4-byte length each)"
        raise InvalidInputError(msg)
    out = np.empty(count, dtype=object)
    pos = 0
    for i in range(count):
        if pos + 4 > len(buf):
            msg = f"input {name!r}: BYTES data ends after {i} of {count} elements"
            raise InvalidInputError(msg)
        (n,) = struct.unpack_from("<I", buf, pos)
        pos += 4
        if pos + n > len(buf):
            msg = f"input {name!r}: BYTES element {i} is longer than the data"
            raise InvalidInputError(msg)
        out[i] = bytes(buf[pos : pos + n])
        pos += n
    if pos != len(buf):
        msg = f"input {name!r}: {len(buf) - pos} bytes left after {count} BYTES elements"
        raise InvalidInputError(msg)
    return out


def _dim(d: Any) -> int | None:
    if isinstance(d, float) and d.is_integer():
        d = int(d)  # 2.0 is the integer 2 in JSON (and in JSON Schema, hence in the OpenAPI document)
    return d if isinstance(d, int) and not isinstance(d, bool) and d >= 0 else None


def _shape(raw: Any, name: str) -> list[int]:
    dims = [_dim(d) for d in raw] if isinstance(raw, list) else [None]
    if None in dims:
        msg = f"input {name!r}: 'shape' must be a list of non-negative integers, got {raw!r}"
        raise InvalidInputError(msg)
    return dims  # type: ignore[return-value]  # no None left


def _binary(chunk: memoryview, dt: np.dtype[Any], shape: list[int], name: str) -> np.ndarray:
    count = prod(shape)
    if dt.kind == "O":
        return _bytes_elements(chunk, count, name)
    if len(chunk) != count * dt.itemsize:
        msg = f"input {name!r}: shape {shape} of {v2_datatype(dt)} needs {count * dt.itemsize} bytes, got {len(chunk)}"
        raise InvalidInputError(msg)
    if dt.kind == "b" and len(chunk) and np.frombuffer(chunk, np.uint8).max() > 1:
        msg = f"input {name!r}: BOOL binary data must be bytes 0 (false) or 1 (true)"
        raise InvalidInputError(msg)
    return np.frombuffer(chunk, dtype=dt if _LITTLE else dt.newbyteorder("<"))


def _decode_input(inp: Any, binary: memoryview, offset: int) -> tuple[str, np.ndarray, int]:
    """One element of ``inputs``: (name, array of exactly its declared datatype and shape, next offset)."""
    if not isinstance(inp, dict) or not isinstance(inp.get("name"), str):
        msg = "each element of 'inputs' must be an object with 'name', 'shape', 'datatype' and 'data'"
        raise InvalidInputError(msg)
    name: str = inp["name"]
    shape = _shape(inp.get("shape"), name)
    datatype = inp.get("datatype")
    if not isinstance(datatype, str):
        msg = f"input {name!r}: 'datatype' is missing (one of BOOL, UINT8..64, INT8..64, FP16, FP32, FP64, BYTES)"
        raise InvalidInputError(msg)
    datatype = datatype.upper()
    dt = numpy_dtype(datatype)
    params = inp.get("parameters")
    if params is not None and not isinstance(params, dict):
        msg = f"input {name!r}: 'parameters' must be an object"
        raise InvalidInputError(msg)
    size = params.get("binary_data_size") if params else None
    if size is not None:
        if not isinstance(size, int) or isinstance(size, bool) or size < 0 or offset + size > len(binary):
            msg = f"input {name!r}: binary_data_size {size!r} does not fit the {len(binary) - offset} binary bytes left"
            raise InvalidInputError(msg)
        arr = _binary(binary[offset : offset + size], dt, shape, name)
        offset += size
    else:
        if "data" not in inp:
            msg = f"input {name!r} has no 'data' (and no parameters.binary_data_size)"
            raise InvalidInputError(msg)
        arr = from_json(inp["data"], dt, name, datatype).reshape(-1)
        if arr.size != (count := prod(shape)):
            msg = f"input {name!r}: shape {shape} has {count} elements but 'data' has {arr.size}"
            raise InvalidInputError(msg)
    try:
        return name, arr.reshape(shape), offset
    except ValueError:  # more than 64 dimensions, or a size numpy cannot index
        msg = f"input {name!r}: shape {shape} is not a shape an array can have"
        raise InvalidInputError(msg) from None


def _describe(spec: TensorSpec) -> str:
    return f"{spec.name!r} {v2_datatype(spec.dtype)} ({spec.dtype}) shape {spec.shape}"


def _check_against_model(lm: LoadedModel, name: str, arr: np.ndarray) -> None:
    """The declared datatype must be the model's: v2 is typed, and edgekit converts none (Triton's rule)."""
    spec = next((s for s in lm.inputs if s.name == name), None)
    if spec is None:
        msg = f"model {lm.name!r} has no input {name!r}; its inputs: {', '.join(map(_describe, lm.inputs))}"
        raise InvalidInputError(msg)
    if arr.dtype != spec.np_dtype:
        want = v2_datatype(spec.dtype)
        msg = (
            f"input {name!r} is {v2_datatype(arr.dtype)}, but model {lm.name!r} expects {_describe(spec)}; "
            f"send {want} data (the v2 protocol converts no datatypes)"
        )
        raise InvalidInputError(msg)


def decode(
    body: bytes, header_length: int | None, lm: LoadedModel
) -> tuple[dict[str, np.ndarray], dict[str, Any], list[tuple[str, bool]]]:
    """Feeds, the request document (for its id) and the output selection of an infer body."""
    if header_length is None:
        doc, binary = loads_tensors(body, _TENSOR_KEYS), memoryview(b"")
    else:
        if header_length > len(body):
            msg = f"Inference-Header-Content-Length {header_length} is larger than the body ({len(body)} bytes)"
            raise InvalidInputError(msg)
        view = memoryview(body)
        doc, binary = loads_tensors(view[:header_length], _TENSOR_KEYS), view[header_length:]
    if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), list) or not doc["inputs"]:
        msg = "the body must be a JSON object with a non-empty 'inputs' list"
        raise InvalidInputError(msg)
    if "id" in doc and not isinstance(doc["id"], str):
        msg = f"'id' must be a string, got {type(doc['id']).__name__}"
        raise InvalidInputError(msg)
    feeds: dict[str, np.ndarray] = {}
    offset = 0
    for inp in doc["inputs"]:
        name, arr, offset = _decode_input(inp, binary, offset)
        _check_against_model(lm, name, arr)
        if name in feeds:
            msg = f"input {name!r} is given twice"
            raise InvalidInputError(msg)
        feeds[name] = arr
    if offset != len(binary):
        msg = f"{len(binary) - offset} bytes of binary data after the last input"
        raise InvalidInputError(msg)
    return feeds, doc, _selection(lm, doc)


def _raw(arr: np.ndarray) -> bytes:
    if arr.dtype == object:
        parts = []
        for x in arr.ravel():
            b = x if isinstance(x, bytes) else str(x).encode()
            parts.append(struct.pack("<I", len(b)))
            parts.append(b)
        return b"".join(parts)
    if _LITTLE and arr.dtype.isnative:
        return arr.tobytes()  # C order, native = little-endian
    return np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).tobytes()


def _selection(lm: LoadedModel, doc: dict[str, Any]) -> list[tuple[str, bool]]:
    """Which outputs to return and whether each is binary; checked before inference runs."""
    params = doc.get("parameters")
    binary_all = bool(params.get("binary_data_output")) if isinstance(params, dict) else False
    names = [s.name for s in lm.outputs]
    wanted = doc.get("outputs")
    if not wanted:
        return [(k, binary_all) for k in names]
    if not isinstance(wanted, list):
        msg = "'outputs' must be a list of {'name': ...} objects"
        raise InvalidInputError(msg)
    selection = []
    for o in wanted:
        if not isinstance(o, dict) or o.get("name") not in names:
            asked = o.get("name") if isinstance(o, dict) else o
            msg = f"requested output {asked!r} does not exist; outputs are: {', '.join(names)}"
            raise InvalidInputError(msg)
        p = o.get("parameters")
        binary = p.get("binary_data", binary_all) if isinstance(p, dict) else binary_all
        selection.append((o["name"], bool(binary)))
    return selection


def encode(
    lm: LoadedModel, outputs: dict[str, np.ndarray], doc: dict[str, Any], selection: list[tuple[str, bool]]
) -> Reply:
    items = []
    chunks = []
    for name, binary in selection:
        arr = outputs[name]
        item: dict[str, Any] = {"name": name, "datatype": v2_datatype(arr.dtype), "shape": list(arr.shape)}
        if binary:
            raw = _raw(arr)
            item["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            item["data"] = jsonable(arr.reshape(-1))
        items.append(item)
    reply: dict[str, Any] = {"model_name": lm.name, "model_version": str(lm.version), "outputs": items}
    if "id" in doc:
        reply["id"] = doc["id"]
    header = dumps(reply)
    if not chunks:
        return Reply(200, header)
    return Reply(200, header + b"".join(chunks), _OCTET, [(HEADER_LENGTH, str(len(header)).encode())])


async def infer(dp: DataPlane, name: str, version: str | None, body: bytes, header_length: int | None) -> Reply:
    lm = dp.model(name, version)
    with dp.counted(lm):
        feeds, doc, selection = decode(body, header_length, lm)
        request_id = doc.get("id") if isinstance(doc.get("id"), str) else None
        outputs = await dp.infer(lm, feeds, pinned=version is not None, request_id=request_id)
        return encode(lm, outputs, doc, selection)


_MAX_FEEDBACK_ITEMS = 1000


def _feedback_item(item: Any, where: str) -> tuple[str, np.ndarray]:
    if not isinstance(item, dict) or not isinstance(item.get("id"), str) or not item["id"]:
        msg = f'{where}: give {{"id": "<the inference request\'s id>", "label": 3}} (or "labels", "value", "values")'
        raise InvalidInputError(msg)
    given = [k for k in ("label", "labels", "value", "values") if k in item]
    if len(given) != 1:
        msg = f"{where}: give exactly one of label, labels, value, values (got {given or 'none'})"
        raise InvalidInputError(msg)
    raw = item[given[0]]
    try:
        truth = np.asarray(raw)
    except (TypeError, ValueError):
        truth = np.asarray(None)
    ok = truth.dtype.kind in "iu" if given[0].startswith("label") else truth.dtype.kind in "iuf"
    if not ok or truth.size == 0 or truth.size > 1 << 20:
        kind = "integers" if given[0].startswith("label") else "numbers"
        msg = f"{where}: {given[0]} must be {kind} (one per row of the request)"
        raise InvalidInputError(msg)
    return item["id"], truth


def feedback(dp: DataPlane, name: str, body: bytes) -> Reply:
    """``POST /v2/models/NAME/feedback``: ground truth for earlier requests by their ``id``."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        msg = f"the feedback body is not JSON: {e}"
        raise InvalidInputError(msg) from None
    if isinstance(doc, dict) and "items" in doc:
        items = doc["items"]
        if not isinstance(items, list) or not 1 <= len(items) <= _MAX_FEEDBACK_ITEMS:
            msg = f"items must be a list of 1 to {_MAX_FEEDBACK_ITEMS} feedback objects"
            raise InvalidInputError(msg)
        parsed = [_feedback_item(it, f"items[{i}]") for i, it in enumerate(items)]
    else:
        parsed = [_feedback_item(doc, "the feedback body")]
    return json_reply(dp.feedback(name, parsed))

"""What the target can run: ops, integer-only compute, static shapes, tensor rank, tensor arena.

Checked on the converted model itself (the TFLite flatbuffer read with its schema, or the ONNX
graph), before a bundle is written. An op the target cannot run is an UnsupportedOpError that
names the op and the profile; other violations are ConversionErrors saying what to change.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgekit.errors import ConversionError, UnsupportedOpError
from edgekit.profiles import Profile

# Tensor types that are not integer compute (TFLite schema TensorType names).
_FLOAT_TYPES = {"FLOAT32", "FLOAT16", "FLOAT64", "BFLOAT16"}
# Ops whose float tensors are the model's I/O boundary, not compute.
_BOUNDARY_OPS = {"QUANTIZE", "DEQUANTIZE"}
_ITEMSIZE = {
    "FLOAT32": 4, "FLOAT16": 2, "FLOAT64": 8, "INT32": 4, "INT64": 8, "INT16": 2, "UINT16": 2,
    "INT8": 1, "UINT8": 1, "BOOL": 1, "UINT32": 4, "UINT64": 8, "INT4": 1,
}  # fmt: skip


@dataclass
class TensorInfo:
    name: str
    dtype: str
    shape: list[int]
    constant: bool


@dataclass
class OpInfo:
    name: str
    inputs: list[int]
    outputs: list[int]


@dataclass
class Graph:
    """The main subgraph of a TFLite model: ops in execution order and their tensors."""

    ops: list[OpInfo]
    tensors: list[TensorInfo]
    graph_inputs: list[int]
    graph_outputs: list[int]
    op_names: list[str] = field(default_factory=list)


def _schema() -> Any:
    try:
        from tensorflow.lite.python import schema_py_generated as schema
    except ImportError:  # pragma: no cover - the runtime's LiteRT wheel carries the same schema
        from ai_edge_litert import schema_py_generated as schema
    return schema


def read_tflite(model: bytes) -> Graph:
    """Parse a TFLite flatbuffer into ops and tensors (main subgraph)."""
    schema = _schema()
    m = schema.ModelT.InitFromPackedBuf(model, 0)
    op_names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    type_names = {v: k for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
    sg = m.subgraphs[0]
    tensors = []
    for t in sg.tensors:
        sig = t.shapeSignature if t.shapeSignature is not None and len(t.shapeSignature) else t.shape
        shape = [int(d) for d in (sig if sig is not None else [])]
        has_data = t.buffer > 0 and m.buffers[t.buffer].data is not None and len(m.buffers[t.buffer].data) > 0
        name = t.name.decode() if isinstance(t.name, bytes) else str(t.name)
        tensors.append(TensorInfo(name, type_names.get(t.type, str(t.type)), shape, has_data))
    ops = []
    for op in sg.operators:
        code = m.operatorCodes[op.opcodeIndex]
        builtin = max(int(code.builtinCode), int(code.deprecatedBuiltinCode))
        name = op_names.get(builtin, str(builtin))
        if name == "CUSTOM" and code.customCode:
            custom = code.customCode.decode() if isinstance(code.customCode, bytes) else str(code.customCode)
            name = f"CUSTOM:{custom}"
        ins = [int(i) for i in (op.inputs if op.inputs is not None else []) if i >= 0]
        outs = [int(i) for i in (op.outputs if op.outputs is not None else []) if i >= 0]
        ops.append(OpInfo(name, ins, outs))
    return Graph(ops, tensors, [int(i) for i in sg.inputs], [int(i) for i in sg.outputs], sorted({o.name for o in ops}))


def tensor_arena_bytes(graph: Graph) -> int:
    """Peak bytes of live activations in execution order: a lower bound of TFLite Micro's arena
    (its greedy planner adds alignment and scratch buffers, so budget some headroom)."""
    sizes = {}
    first: dict[int, int] = {}
    last: dict[int, int] = {}
    for i in graph.graph_inputs:
        first[i] = 0
    for step, op in enumerate(graph.ops):
        for t in op.outputs:
            first.setdefault(t, step)
        for t in op.inputs:
            last[t] = step
    for t in graph.graph_outputs:
        last[t] = len(graph.ops)
    for t in set(first) | set(last):
        info = graph.tensors[t]
        if info.constant:
            continue
        sizes[t] = int(np.prod([max(d, 1) for d in info.shape])) * _ITEMSIZE.get(info.dtype, 4)
    peak = 0
    for step in range(len(graph.ops) + 1):
        live = sum(s for t, s in sizes.items() if first.get(t, 0) <= step <= last.get(t, first.get(t, 0)))
        peak = max(peak, live)
    return peak


def float_ops(graph: Graph) -> dict[str, int]:
    """Ops of a quantized TFLite model that compute in float (a float tensor in or out, other than the
    QUANTIZE/DEQUANTIZE boundaries), counted by op: what the converter's float fallback left."""
    out: dict[str, int] = {}
    for op in graph.ops:
        if op.name in _BOUNDARY_OPS:
            continue
        if any(graph.tensors[t].dtype in _FLOAT_TYPES for t in op.inputs + op.outputs):
            out[op.name] = out.get(op.name, 0) + 1
    return dict(sorted(out.items()))


def _onnx_facts(model: bytes, quantized: bool) -> tuple[list[str], dict[str, int]]:
    """The op types of an ONNX model, and in a QDQ model the nodes left in float: those that take no
    input from a DequantizeLinear (ONNX Runtime runs a node in int8 where QDQ pairs surround it)."""
    import onnx

    graph = onnx.load_from_string(model).graph
    ops = sorted({n.op_type for n in graph.node})
    if not quantized:
        return ops, {}
    dequantized = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    left: dict[str, int] = {}
    for n in graph.node:
        if n.op_type in {"QuantizeLinear", "DequantizeLinear"} or any(i in dequantized for i in n.input):
            continue
        left[n.op_type] = left.get(n.op_type, 0) + 1
    return ops, dict(sorted(left.items()))


def check(profile: Profile, fmt: str, model: bytes) -> dict[str, Any]:
    """Raise on anything the target cannot run; return facts for the report (ops, arena estimate)."""
    c = profile.constraints
    where = f"profile {profile.name}"
    quantized = profile.conversion.needs_calibration
    if fmt == "onnx":
        ops, left = _onnx_facts(model, quantized)
        _check_ops(ops, c.allowed_ops, where)
        return {"ops": ops, "float_ops": left} if quantized else {"ops": ops}
    graph = read_tflite(model)
    _check_ops(graph.op_names, c.allowed_ops, where)
    facts: dict[str, Any] = {"ops": graph.op_names}
    if quantized:
        facts["float_ops"] = float_ops(graph)
    if c.full_integer:
        for op in graph.ops:
            if op.name in _BOUNDARY_OPS:
                continue
            for t in op.inputs + op.outputs:
                info = graph.tensors[t]
                if info.dtype in _FLOAT_TYPES:
                    msg = (
                        f"{where} needs a fully integer model, but op {op.name} computes in {info.dtype.lower()} "
                        f"(tensor {info.name!r}); use calibration data that covers the inputs, or replace that layer"
                    )
                    raise UnsupportedOpError(msg)
    if c.static_shapes:
        for i in graph.graph_inputs + graph.graph_outputs:
            info = graph.tensors[i]
            if any(d < 0 for d in info.shape):
                msg = f"{where} needs static shapes, but tensor {info.name!r} has shape {info.shape}"
                raise ConversionError(msg)
    if c.max_tensor_rank is not None:
        for op in graph.ops:
            for t in op.inputs + op.outputs:
                info = graph.tensors[t]
                if len(info.shape) > c.max_tensor_rank:
                    msg = (
                        f"{where} supports tensors of rank <= {c.max_tensor_rank}, but op {op.name} uses "
                        f"{info.name!r} with shape {info.shape}"
                    )
                    raise UnsupportedOpError(msg)
    arena = tensor_arena_bytes(graph)
    facts["tensor_arena_kb"] = round(arena / 1024, 1)
    if c.max_tensor_arena_kb is not None and arena / 1024 > c.max_tensor_arena_kb:
        msg = (
            f"{where}: the model needs about {arena / 1024:.0f} KB of tensor arena (activations), more than "
            f"constraints.max_tensor_arena_kb = {c.max_tensor_arena_kb}; use a smaller input or fewer channels"
        )
        raise ConversionError(msg)
    return facts


def _check_ops(ops: list[str], allowed: list[str], where: str) -> None:
    if not allowed:
        return
    bad = [op for op in ops if op not in set(allowed)]
    if bad:
        msg = (
            f"op {bad[0]} cannot run on {where} (not in its constraints.allowed_ops)"
            + (f"; also: {', '.join(bad[1:])}" if len(bad) > 1 else "")
            + "; replace that layer or choose another profile"
        )
        raise UnsupportedOpError(msg)

"""tensors.py: exact decoding of JSON values of a declared dtype, and coercion of client arrays."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pytest

from edgekit_runtime.errors import InvalidInputError
from edgekit_runtime.tensors import QuantParams, TensorSpec, coerce_input, from_json, quantize


@pytest.mark.parametrize(
    ("value", "dtype", "expected"),
    [
        ([[1, 2], [3, 4]], "int8", np.array([[1, 2], [3, 4]], np.int8)),
        ([1, 2.5], "float32", np.array([1, 2.5], np.float32)),
        ([1.0, -2.0], "int16", np.array([1, -2], np.int16)),  # JSON does not tell 1 from 1.0
        ([True, False], "bool", np.array([True, False])),
        (["a", "é"], "object", np.array([b"a", "é".encode()], object)),
        ([], "int8", np.zeros(0, np.int8)),
        (np.arange(4, dtype=np.int64), "uint8", np.arange(4, dtype=np.uint8)),  # the fast JSON path's arrays
        ([2**64 - 1], "uint64", np.array([2**64 - 1], np.uint64)),
        ([float("nan"), float("inf")], "float16", np.array([np.nan, np.inf], np.float16)),
        ([10**30], "float32", np.array([1e30], np.float32)),
    ],
)
def test_from_json_is_exact(value: Any, dtype: str, expected: np.ndarray) -> None:
    got = from_json(value, np.dtype(dtype), "x")
    assert got.dtype == expected.dtype
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize(
    ("value", "dtype", "needle"),
    [
        ([200], "int8", "[-128, 127]"),
        ([2**64], "uint64", "[0, 18446744073709551615]"),
        ([2.0**63], "int64", "[-9223372036854775808, 9223372036854775807]"),  # == float(2**63 - 1)
        ([2.0**64], "uint64", "[0, 18446744073709551615]"),
        ([10**400], "float64", "numbers within"),
        ([1e39], "float32", "numbers within"),
        ([1.5], "int8", "non-integer"),
        ([float("inf")], "int8", "NaN or infinite"),
        ([1, 0], "bool", "true or false"),
        (["1"], "float32", "strings"),
        ([None], "float32", "null"),
        ([1], "object", "strings"),
        ([[1], [1, 2]], "float32", "well-formed"),
        (5, "float32", "must be an array"),
        (["\ud800"], "object", "Unicode"),
    ],
)
def test_from_json_refuses_what_is_not_of_the_type(value: Any, dtype: str, needle: str) -> None:
    with pytest.raises(InvalidInputError, match="'x'") as e:
        from_json(value, np.dtype(dtype), "x", "LABEL")
    assert needle in e.value.message
    assert "LABEL" in e.value.message


def test_coerce_input_never_warns_or_wraps() -> None:
    spec = TensorSpec(name="x", dtype="int32", shape=[-1, 2])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for bad in ([np.inf, 1.0], [np.nan, 1.0], [1e300, 1.0], [3e9, 1.0]):
            with pytest.raises(InvalidInputError, match="'x'"):
                coerce_input(np.array([bad]), spec)
        np.testing.assert_array_equal(coerce_input(np.array([[2.0, -3.0]]), spec), [[2, -3]])
        q = TensorSpec(name="q", dtype="int8", shape=[-1, 2], quantization=QuantParams(scale=[0.1], zero_point=[0]))
        with pytest.raises(InvalidInputError, match="NaN"):
            coerce_input(np.array([[np.nan, 1.0]]), q)
        np.testing.assert_array_equal(quantize(np.array([[1e300, -1e300]]), q), [[127, -128]])

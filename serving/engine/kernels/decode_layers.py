"""The argument structures and signature of `decode_layers.c` (a decode step's decoder layers in one
call), as ctypes declares them; `models/decode_layers.py` fills them from a loaded decoder."""

from __future__ import annotations

import ctypes

_ptr, _i64 = ctypes.c_void_p, ctypes.c_int64


class Ops(ctypes.Structure):
    """The kernels' entry points, in the variant of the model's dtype."""

    _fields_ = [(name, _ptr) for name in ("linear", "add_norm", "rotary", "silu_mul", "write_kv", "attend")]


class Layer(ctypes.Structure):
    """One layer's norm weights and few-row packed linears with their biases (None for none)."""

    _fields_ = [
        (name, _ptr)
        for name in (
            "norm1",
            "qkv",
            "qkv_bias",
            "o",
            "o_bias",
            "norm2",
            "gate_up",
            "gate_up_bias",
            "down",
            "down_bias",
        )  # fmt: skip
    ]


class Shape(ctypes.Structure):
    """The model's sizes and the KV pool's layout (strides in elements)."""

    _fields_ = [
        *[(name, _i64) for name in ("hidden", "heads", "kv_heads", "head_dim", "intermediate")],
        *[
            (name, _i64)
            for name in ("layer_stride", "block_stride", "kind_stride", "slot_stride", "block_size")
        ],
        ("eps", ctypes.c_float),
        ("scale", ctypes.c_float),
        ("bf16", ctypes.c_int),
    ]


def bind(lib: ctypes.CDLL) -> None:
    lib.epd_decode_layers_work.argtypes = [ctypes.POINTER(Shape), _i64]
    lib.epd_decode_layers_work.restype = _i64
    fn = lib.epd_decode_layers
    fn.argtypes = [ctypes.POINTER(Ops), ctypes.POINTER(Shape), ctypes.POINTER(Layer), _i64, _ptr, _ptr, _i64]
    fn.argtypes += [_ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, ctypes.c_int, ctypes.c_int, _ptr, _ptr]
    fn.restype = ctypes.c_int


def address(fn: object) -> int:
    """A loaded library function's address, to hand to another kernel as a pointer."""
    return ctypes.cast(fn, _ptr).value or 0

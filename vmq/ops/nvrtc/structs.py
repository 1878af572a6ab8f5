"""ctypes mirrors of the kernel argument structs of ``csrc/cuda/launchers.h`` (and of the one
struct that ``multi_scan.cu`` keeps to itself), passed to the kernels by value.

Each mirror lists the C++ fields in order with the same types, so ctypes lays it out as the C
compiler does (natural alignment; ``enum class`` is an ``int``, ``bool`` one byte). Two checks
hold them to the sources: ``tests/test_nvrtc.py`` compiles a small C++ program against
``launchers.h`` and compares every ``sizeof`` and ``offsetof``; and every NVRTC build appends
:func:`size_checks` (``static_assert`` on ``sizeof``) for the structs its kernels take, so a
struct that changes in C++ stops the build instead of launching with a stale layout.
"""

from __future__ import annotations

import ctypes
from typing import Dict, List, Tuple, Type

_ptr = ctypes.c_void_p
_i64 = ctypes.c_int64
_int = ctypes.c_int
_bool = ctypes.c_bool
_float = ctypes.c_float

# enum class ScanType { kFloat, kHalf, kInt8 } and ScanMerge { kSum, kMean, kNone }
SCAN_TYPE = {"kFloat": 0, "kHalf": 1, "kInt8": 2}
SCAN_MERGE = {"kSum": 0, "kMean": 1, "kNone": 2}
DIRS_PER_LAUNCH = 8  # multi_scan.cu's kDirsPerLaunch: the directions of one launch's Launch struct


class GemmArgs(ctypes.Structure):
    _fields_ = [("x", _ptr), ("w", _ptr), ("w_sum", _ptr), ("x_scale", _ptr), ("x_zero_point", _ptr),
                ("w_scale", _ptr), ("bias", _ptr), ("out_scale", _ptr), ("out_zero_point", _ptr), ("out_f", _ptr),
                ("out_q", _ptr), ("m", _i64), ("n", _i64), ("k", _i64), ("rows_per_param", _i64),
                ("out_bits", _int)]


class ScanTensor(ctypes.Structure):
    _fields_ = [("p", _ptr), ("s0", _i64), ("s1", _i64), ("s2", _i64)]


class ScanDirection(ctypes.Structure):
    _fields_ = [("u", ScanTensor), ("delta", ScanTensor), ("B", ScanTensor), ("C", ScanTensor),
                ("u_scale", _ptr), ("delta_scale", _ptr), ("A", _ptr), ("D", _ptr)]


class ScanArgs(ctypes.Structure):
    _fields_ = [("fwd", ScanDirection), ("bwd", ScanDirection), ("z", ScanTensor), ("value_type", _int),
                ("float_type", _int), ("batch", _i64), ("dim", _i64), ("len", _i64), ("d_state", _i64),
                ("softplus", _bool), ("divide_out", _bool), ("out", _ptr)]


class MultiScanDirection(ctypes.Structure):
    _fields_ = [("u", ScanTensor), ("delta", ScanTensor), ("B", ScanTensor), ("C", ScanTensor),
                ("u_scale", _ptr), ("delta_scale", _ptr), ("A", _ptr), ("D", _ptr), ("delta_bias", _ptr)]


class MultiScanArgs(ctypes.Structure):
    _fields_ = [("dirs", _ptr), ("in_index", _ptr), ("out_index", _ptr), ("z", ScanTensor), ("value_type", _int),
                ("float_type", _int), ("batch", _i64), ("dim", _i64), ("positions", _i64), ("steps", _i64),
                ("seqlen", _i64), ("d_state", _i64), ("K", _i64), ("softplus", _bool), ("merge", _int),
                ("out", _ptr)]


class MultiScanLaunch(ctypes.Structure):  # multi_scan.cu: struct Launch (anonymous namespace)
    _fields_ = [("dir", MultiScanDirection * DIRS_PER_LAUNCH), ("k0", _int), ("count", _int), ("first", _bool),
                ("last", _bool)]


class VqGemmArgs(ctypes.Structure):
    _fields_ = [("x", _ptr), ("x_half", _bool), ("codes", _ptr), ("codebook", _ptr), ("scale", _ptr),
                ("bias", _ptr), ("out", _ptr), ("m", _i64), ("n", _i64), ("k", _i64), ("cols", _i64),
                ("size", _i64), ("dim", _i64), ("rows_per_group", _i64)]


class ScanTrainArgs(ctypes.Structure):
    _fields_ = [("u", _ptr), ("delta", _ptr), ("A", _ptr), ("B", _ptr), ("C", _ptr), ("batch", _i64), ("dim", _i64),
                ("len", _i64), ("d_state", _i64)]


class ScanTrainGrads(ctypes.Structure):
    _fields_ = [("grad_y", _ptr), ("ckpt", _ptr), ("gu", _ptr), ("gdelta", _ptr), ("gA_part", _ptr), ("gB", _ptr),
                ("gC", _ptr)]


# the C++ name of each mirror; LAUNCHERS_H: those declared in launchers.h (the compiled layout test)
CXX_NAMES: Dict[Type[ctypes.Structure], str] = {
    GemmArgs: "vmq::cuda::GemmArgs", ScanTensor: "vmq::cuda::ScanTensor", ScanDirection: "vmq::cuda::ScanDirection",
    ScanArgs: "vmq::cuda::ScanArgs", MultiScanDirection: "vmq::cuda::MultiScanDirection",
    MultiScanArgs: "vmq::cuda::MultiScanArgs", MultiScanLaunch: "vmq::cuda::Launch", VqGemmArgs: "vmq::cuda::VqGemmArgs",
    ScanTrainArgs: "vmq::cuda::ScanTrainArgs", ScanTrainGrads: "vmq::cuda::ScanTrainGrads",
}
LAUNCHERS_H = (GemmArgs, ScanTensor, ScanDirection, ScanArgs, MultiScanDirection, MultiScanArgs, VqGemmArgs,
               ScanTrainArgs, ScanTrainGrads)


def layout(cls: Type[ctypes.Structure]) -> List[Tuple[str, int]]:
    """``[("sizeof", n), (field, offset), ...]`` of a mirror, as the compiled layout test prints them."""
    return [("sizeof", ctypes.sizeof(cls))] + [(name, getattr(cls, name).offset) for name, _ in cls._fields_]


def size_checks(*classes: Type[ctypes.Structure]) -> List[str]:
    """C++ ``static_assert`` lines: each mirror's size is its C++ struct's."""
    return [f'static_assert(sizeof({CXX_NAMES[c]}) == {ctypes.sizeof(c)}, "{CXX_NAMES[c]}: its ctypes mirror '
            f'(vmq/ops/nvrtc/structs.py) has another size");' for c in classes]


def enum_checks() -> List[str]:
    """C++ ``static_assert`` lines: the enumerators' values used here are the C++ ones."""
    return [f'static_assert(static_cast<int>(vmq::cuda::{enum}::{name}) == {value}, "vmq::cuda::{enum}::{name}");'
            for enum, values in (("ScanType", SCAN_TYPE), ("ScanMerge", SCAN_MERGE)) for name, value in values.items()]


def fill(struct: ctypes.Structure, **values) -> ctypes.Structure:
    """Set fields by name; a name the struct lacks is an error (ctypes would add an attribute)."""
    names = {name for name, _ in type(struct)._fields_}
    for name, value in values.items():
        if name not in names:
            raise AttributeError(f"{type(struct).__name__} has no field {name!r}")
        setattr(struct, name, value)
    return struct

"""The few CUDA calls the onnxruntime backend makes on the device itself, through the driver API (ctypes).

onnxruntime's Python API hands out device buffers (OrtValue.data_ptr) but cannot slice or copy part of
one: these calls copy one row of logits to the host, copy a prefix of each KV head on the device (a trim),
and read the device's memory in use. The driver library (libcuda) comes with the GPU driver, so this needs
no CUDA toolkit, cupy or CUDA build of torch. Calls run in the device's primary context, the one
onnxruntime's CUDA provider (the runtime API) uses, so its pointers are valid here.
"""

from __future__ import annotations

import ctypes
import sys

import numpy as np

CUdeviceptr = ctypes.c_uint64


def load_driver() -> ctypes.CDLL:
    """libcuda; OSError when there is none."""
    return ctypes.CDLL("nvcuda.dll" if sys.platform == "win32" else "libcuda.so.1")


class CudaDevice:
    """Device `ordinal`'s primary context, made current on the calling thread."""

    def __init__(self, ordinal: int = 0):
        self.lib = lib = load_driver()
        lib.cuMemcpyDtoH_v2.argtypes = [ctypes.c_void_p, CUdeviceptr, ctypes.c_size_t]
        lib.cuMemcpyDtoD_v2.argtypes = [CUdeviceptr, CUdeviceptr, ctypes.c_size_t]
        lib.cuMemGetInfo_v2.argtypes = [ctypes.POINTER(ctypes.c_size_t), ctypes.POINTER(ctypes.c_size_t)]
        lib.cuCtxSetCurrent.argtypes = [ctypes.c_void_p]
        self._check(lib.cuInit(0), "cuInit")
        device = ctypes.c_int()
        self._check(lib.cuDeviceGet(ctypes.byref(device), ordinal), "cuDeviceGet")
        self.context = ctypes.c_void_p()
        self._check(lib.cuDevicePrimaryCtxRetain(ctypes.byref(self.context), device), "cuDevicePrimaryCtxRetain")
        self.current()

    @staticmethod
    def _check(status: int, call: str) -> None:
        if status != 0:
            raise RuntimeError(f"CUDA driver: {call} failed (CUresult {status})")

    def current(self) -> None:
        """Make the primary context current here (a no-op when it is, as after an onnxruntime run)."""
        self._check(self.lib.cuCtxSetCurrent(self.context), "cuCtxSetCurrent")

    def to_host(self, out: np.ndarray, src: int) -> np.ndarray:
        """Copy out.nbytes from device address `src` into the contiguous host array `out` (synchronous)."""
        self._check(self.lib.cuMemcpyDtoH_v2(out.ctypes.data, src, out.nbytes), "cuMemcpyDtoH")
        return out

    def copy(self, dst: int, src: int, nbytes: int) -> None:
        """Device to device; call synchronize() before the copies are read by another stream."""
        self._check(self.lib.cuMemcpyDtoD_v2(dst, src, nbytes), "cuMemcpyDtoD")

    def synchronize(self) -> None:
        self._check(self.lib.cuCtxSynchronize(), "cuCtxSynchronize")

    def used_bytes(self) -> int:
        """Device memory in use now, by every process and context (total - free)."""
        free, total = ctypes.c_size_t(), ctypes.c_size_t()
        self._check(self.lib.cuMemGetInfo_v2(ctypes.byref(free), ctypes.byref(total)), "cuMemGetInfo")
        return total.value - free.value


def device_count() -> int:
    """GPUs the driver sees; 0 without a driver or a device."""
    try:
        lib = load_driver()
    except OSError:
        return 0
    count = ctypes.c_int(0)
    if lib.cuInit(0) != 0 or lib.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0
    return count.value


__all__ = ["CudaDevice", "device_count", "load_driver"]

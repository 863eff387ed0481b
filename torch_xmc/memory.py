"""Scratch memory of the CUDA kernels.

The CUDA kernels take their scratch (partial sums, label-chunk buffers, heaps) with cudaMallocAsync from the
device's default memory pool, which PyTorch's allocator statistics (torch.cuda.max_memory_allocated) do not
see. These read and reset that pool's high-water mark through the CUDA runtime, so a measurement of peak memory
can add it to PyTorch's.
"""
import ctypes
import glob
import os

import torch

_USED_MEM_HIGH = 8  # cudaMemPoolAttrUsedMemHigh
_runtime = None


def _cudart():
    global _runtime
    if _runtime is None:
        torch.cuda.init()  # the runtime PyTorch loaded is then in the process
        here = os.path.dirname(torch.__file__)
        names = ["libcudart.so.13", "libcudart.so.12", "libcudart.so"]
        names += sorted(glob.glob(os.path.join(here, "..", "nvidia", "*", "lib", "libcudart.so*")))
        names += sorted(glob.glob(os.path.join(here, "lib", "libcudart*.so*")))
        for name in names:
            try:
                _runtime = ctypes.CDLL(name)
                break
            except OSError:
                continue
        else:
            raise RuntimeError("torch_xmc.memory: the CUDA runtime library (libcudart) was not found")
    return _runtime


def _pool(device):
    pool = ctypes.c_void_p()
    index = torch.device(device if device is not None else "cuda").index
    err = _cudart().cudaDeviceGetDefaultMemPool(ctypes.byref(pool),
                                                index if index is not None else torch.cuda.current_device())
    if err:
        raise RuntimeError(f"cudaDeviceGetDefaultMemPool failed with error {err}")
    return pool


def reset_scratch_peak(device=None) -> None:
    """Reset the high-water mark of the kernels' scratch pool on a CUDA device (default: the current one)."""
    value = ctypes.c_uint64(0)
    err = _cudart().cudaMemPoolSetAttribute(_pool(device), _USED_MEM_HIGH, ctypes.byref(value))
    if err:
        raise RuntimeError(f"cudaMemPoolSetAttribute failed with error {err}")


def scratch_peak_bytes(device=None) -> int:
    """Most bytes of kernel scratch in use at once on a CUDA device since the last reset_scratch_peak."""
    value = ctypes.c_uint64(0)
    err = _cudart().cudaMemPoolGetAttribute(_pool(device), _USED_MEM_HIGH, ctypes.byref(value))
    if err:
        raise RuntimeError(f"cudaMemPoolGetAttribute failed with error {err}")
    return value.value

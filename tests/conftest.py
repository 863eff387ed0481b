import zlib

import pytest
import torch

import torch_xmc  # noqa: F401  (registers the ops)


def has_kernel(op: str, key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(op, key)


# A device runs only where its kernels were built and a device exists; the rest are skipped, never faked.
DEVICES = ["cpu"] + (
    ["cuda"] if torch.cuda.is_available() and has_kernel("torch_xmc::gsffi_forward", "CUDA") else []
)


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    # fresh random inputs per test, reproducible from the test's name (str hash() changes between processes)
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))

"""The one place that resolves device and dtype, allocates host memory and checks free memory.

Memory checks run before allocating, so an impossible placement fails with one line instead of
an out-of-memory error from deep inside torch.
"""

from __future__ import annotations

import weakref

import psutil
import torch

from kvpr.errors import KvprError

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
GIB = 1024**3


def resolve_device(name: str) -> torch.device:
    """``auto`` means the first CUDA device when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise KvprError(f"--device {name!r} is not a device: use auto, cpu or cuda[:N]") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise KvprError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise KvprError(f"--device {name}: kvpr runs on cpu or cuda")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` is fp16 on a GPU (the paper's setting) and fp32 on the CPU (exact, and fast there)."""
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if name not in _DTYPES:
        raise KvprError(f"--dtype {name!r}: use auto, float32, float16 or bfloat16")
    return _DTYPES[name]


def element_size(dtype: torch.dtype) -> int:
    """Bytes of one element of ``dtype``."""
    return torch.empty((), dtype=dtype).element_size()


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def pin_host_memory(compute_device: torch.device) -> bool:
    """Host buffers are pinned when a CUDA device will copy from them (pageable copies run 4-6x slower)."""
    return compute_device.type == "cuda"


def host_empty(shape: tuple[int, ...], dtype: torch.dtype, pin: bool) -> torch.Tensor:
    """An uninitialised host tensor, page-locked when asked.

    Pinned through ``cudaHostRegister`` of exactly the bytes asked for: torch's caching host
    allocator (``pin_memory=True``) rounds every block up to a power of two, which would turn a
    35 GiB cache into 64 GiB of locked memory. Unregistered when the tensor is collected.
    """
    tensor = torch.empty(shape, dtype=dtype)
    if pin and tensor.numel():
        cudart = torch.cuda.cudart()
        pointer = tensor.data_ptr()
        status = cudart.cudaHostRegister(pointer, tensor.numel() * tensor.element_size(), 0)
        if status != cudart.cudaError.success:
            raise KvprError(
                f"pinning {tensor.numel() * tensor.element_size() / GIB:.2f} GiB of host memory failed "
                f"({status}): lower --batch-size or the lengths"
            )
        weakref.finalize(tensor, cudart.cudaHostUnregister, pointer)
    return tensor


def check_host_memory(nbytes: int, what: str, budget_gib: float | None = None) -> None:
    """Raise if ``nbytes`` more host memory would not fit.

    The limit is what the OS reports available now, or ``budget_gib`` when the user states it
    (``--host-memory-gib``): some VMs report only a part of their memory until it is touched.
    """
    available = budget_gib * GIB if budget_gib is not None else 0.9 * psutil.virtual_memory().available
    if nbytes > available:
        raise KvprError(
            f"{what} needs {nbytes / GIB:.2f} GiB of host memory but only {available / GIB:.2f} GiB "
            "is available: lower --batch-size or the prompt/generation lengths, use a smaller model, "
            "or state the real budget with --host-memory-gib"
        )


def check_device_memory(nbytes: int, device: torch.device, what: str, host_budget_gib: float | None = None) -> None:
    """Raise if ``nbytes`` more memory would not fit on ``device`` (host memory for the CPU)."""
    if device.type != "cuda":
        check_host_memory(nbytes, what, host_budget_gib)
        return
    free, _total = torch.cuda.mem_get_info(device)
    if nbytes > 0.95 * free:
        raise KvprError(
            f"{what} needs {nbytes / GIB:.2f} GiB of GPU memory but only {free / GIB:.2f} GiB is "
            "free: use --offload cpu, lower --batch-size or the lengths, or a smaller model"
        )

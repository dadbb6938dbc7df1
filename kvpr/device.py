"""The one place that resolves device and dtype, allocates host memory and checks free memory.

Memory checks run before allocating, so an impossible placement fails with one line instead of
an out-of-memory error from deep inside torch.
"""

from __future__ import annotations

import gc
import weakref

import psutil
import torch

from kvpr.errors import KvprError

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
GIB = 1024**3
# Share of the free device memory a plan or a check may fill: the allocator rounds blocks up and
# kernels take workspace beyond the tensors counted.
DEVICE_FILL = 0.95
# Share of the OS's available host memory kvpr counts on when no budget is stated.
HOST_FILL = 0.9


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


def host_memory_limit(budget_gib: float | None, check_total: bool = True) -> float:
    """Host bytes kvpr may use: the stated budget (``--host-memory-gib``: some VMs report only a part of
    their memory until it is touched), or a share of what the OS reports available now. A budget above
    the machine's total memory is refused (``check_total=False``: a plan for another machine)."""
    memory = psutil.virtual_memory()
    if budget_gib is None:
        return HOST_FILL * memory.available
    if check_total and budget_gib * GIB > memory.total:
        raise KvprError(
            f"--host-memory-gib {budget_gib:g} exceeds this machine's {memory.total / GIB:.1f} GiB of memory: "
            "state at most that (or leave it out to use what the OS reports available)"
        )
    return budget_gib * GIB


def check_host_memory(nbytes: int, what: str, budget_gib: float | None = None, held: int = 0) -> None:
    """Raise if ``nbytes`` more host memory would not fit.

    ``held``: host bytes this engine already holds; a stated budget must count them, the OS's
    available figure already has.
    """
    available = host_memory_limit(budget_gib) - (held if budget_gib is not None else 0)
    if nbytes > available:
        raise KvprError(
            f"{what} needs {nbytes / GIB:.2f} GiB of host memory but only {max(available, 0) / GIB:.2f} GiB "
            "is available: lower --batch-size or the prompt/generation lengths, use a smaller model, "
            "or state the real budget with --host-memory-gib"
        )


def reusable_device_bytes(driver_free: int, reserved: int, allocated: int) -> int:
    """Device bytes a new allocation can take: the driver's free memory plus what torch's caching
    allocator holds for no tensor (a finished run's cache: the driver counts it as used, but the
    allocator reuses it, and releases it and retries before an allocation fails)."""
    return driver_free + max(0, reserved - allocated)


def settle_device_memory(device: torch.device) -> None:
    """Bring torch's memory counters up to date before they are read for a placement.

    An executor dropped inside a reference cycle holds its cache until collected; and a tensor a
    side stream used (``record_stream``: the GPU tier's tail, read by its flushes) stays counted as
    allocated after it is freed until the allocator next processes its events, which only an
    allocation or ``empty_cache`` does. Without this a second run under ``--offload auto`` saw the
    first run's GPU tier as still held and put its whole cache on the host.
    """
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()  # frees the blocks whose stream events completed, then the cached ones


def free_device_bytes(device: torch.device) -> int:
    """Bytes free for new tensors on CUDA ``device`` (``reusable_device_bytes`` of its state now)."""
    settle_device_memory(device)
    free, _total = torch.cuda.mem_get_info(device)
    return reusable_device_bytes(free, torch.cuda.memory_reserved(device), torch.cuda.memory_allocated(device))


def check_device_memory(
    nbytes: int, device: torch.device, what: str, host_budget_gib: float | None = None, held: int = 0
) -> None:
    """Raise if ``nbytes`` more memory would not fit on ``device`` (host memory for the CPU, where
    ``held`` is as in ``check_host_memory``)."""
    if device.type != "cuda":
        check_host_memory(nbytes, what, host_budget_gib, held)
        return
    free = free_device_bytes(device)
    if nbytes > DEVICE_FILL * free:
        raise KvprError(
            f"{what} needs {nbytes / GIB:.2f} GiB of GPU memory but only {free / GIB:.2f} GiB is "
            "free: use --offload cpu, lower --batch-size or the lengths, or a smaller model"
        )

"""Throughput mode's weights: each decoder layer split across GPU, CPU and disk, streamed per layer.

Placement follows FlexGen's rule, so ``--percent wg wc ...`` means the same thing in both: in each
layer, a tensor goes to the tier that holds the middle of its byte range when the layer's tensors
are laid end to end in order. Every layer has the same shapes, so every layer gets the same
assignment. Embeddings, final norm and LM head stay on the GPU (they are used once per step).

The streamed tensors of a layer (CPU and disk tiers) are packed into one flat buffer per tier, so
a layer's load is one host-to-device copy from pinned memory (plus one sequential file read for
the disk share). Two flat GPU buffers alternate: layer ``i + 1`` loads into one while layer ``i``
computes from the other; the layer's parameters are pointed at the buffer while it runs.

With ``--compress-weight`` the CPU and disk shares are stored as FlexGen's 4-bit groups
(:mod:`kvpr.compress.weight_quant`; 1-D tensors in the model dtype): host memory, disk and the
copy carry the encoded bytes (about 0.28 of fp16). The two alternating GPU buffers then hold
encoded bytes, and a layer is decoded on the compute stream into one model-dtype buffer when it is
activated: the copy stream stays pure DMA, and since the next layer's decode is queued behind this
layer's compute on the same stream, one decoded buffer suffices. GPU-resident tensors stay in the
model dtype (decoding them every block would cost compute for memory the placement already gave).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from kvpr.cache.disk import DiskTensor
from kvpr.compress.weight_quant import WeightLayout
from kvpr.device import host_empty
from kvpr.throughput_config import Tier

if TYPE_CHECKING:
    from kvpr.models.base import DecoderModel
    from kvpr.runtime.streams import StreamSet
    from kvpr.throughput_config import Placement


class LayerWeights:
    """Where every decoder layer's tensors live, and the double-buffered loads that bring the
    streamed ones to the GPU.

    Build it on the model with meta parameters, then pass :meth:`place` to the loader: each tensor
    is moved to its home as it is read, so peak GPU memory is the GPU share plus one tensor.
    """

    def __init__(
        self,
        model: "DecoderModel",
        placement: "Placement",
        device: torch.device,
        dtype: torch.dtype,
        pin: bool,
        offload_dir: Path | None,
        compress: bool = False,
    ) -> None:
        self.device = device
        self.compress = compress
        self.dtype = dtype
        layers = model.decoder_layers
        self.num_layers = len(layers)
        prefix = {id(module): name for name, module in model.named_modules()}
        self._layer_of: dict[str, tuple[int, str]] = {}
        for index, layer in enumerate(layers):
            for local, _param in layer.named_parameters():
                self._layer_of[f"{prefix[id(layer)]}.{local}"] = (index, local)
        params = list(layers[0].named_parameters())
        sizes = [p.numel() for _name, p in params]
        tiers = placement.weight_tiers(sizes)
        self.tier = {name: tier for (name, _p), tier in zip(params, tiers)}
        # Offsets in one layer's flat buffer: CPU share first, then disk share.
        self._slots: dict[str, tuple[int, torch.Size]] = {}
        offset = 0
        for wanted in (Tier.CPU, Tier.DISK):
            for (name, param), tier in zip(params, tiers):
                if tier is wanted:
                    self._slots[name] = (offset, param.shape)
                    offset += param.numel()
            if wanted is Tier.CPU:
                self.cpu_numel = offset
        self.disk_numel = offset - self.cpu_numel
        # The stored form of the streamed share: elements of ``dtype``, or bytes of the encodings.
        self._layouts = {name: WeightLayout.of(tuple(shape), dtype) for name, (_o, shape) in self._slots.items()}
        self._bytes: dict[str, int] = {}  # compressed: byte offset of each encoding in a layer's buffer
        offset = 0
        for name in self._slots:  # the same order: CPU share first, then disk share
            self._bytes[name] = offset
            offset += self._layouts[name].nbytes
        self.cpu_bytes = sum(layout.nbytes for name, layout in self._layouts.items() if self.tier[name] is Tier.CPU)
        self.disk_bytes = offset - self.cpu_bytes
        self._store_dtype = torch.uint8 if compress else dtype
        self._cpu_len = self.cpu_bytes if compress else self.cpu_numel  # in _store_dtype units
        self._disk_len = self.disk_bytes if compress else self.disk_numel
        self.gpu_numel = sum(size for size, tier in zip(sizes, tiers) if tier is Tier.GPU)
        self.element_size = torch.empty((), dtype=dtype).element_size()
        tied = model.tied_parameters()
        every = sum(p.numel() for name, p in model.named_parameters(remove_duplicate=False) if name not in tied)
        self.other_numel = every - self.num_layers * sum(sizes)
        self._pin, self._offload_dir = pin, offload_dir
        self.host: list[torch.Tensor] = []
        self.disk: DiskTensor | None = None
        self._layers = layers
        self._streams: StreamSet | None = None

    def allocate(self) -> None:
        """Create the CPU share's pinned buffers and the disk share's file (after the memory checks)."""
        if self._cpu_len:
            self.host = [host_empty((self._cpu_len,), self._store_dtype, self._pin) for _ in range(self.num_layers)]
        if self._disk_len:
            assert self._offload_dir is not None, "disk-tier weights need an offload directory"
            shape = (self.num_layers, self._disk_len)
            self.disk = DiskTensor(self._offload_dir / "weights.bin", shape, self._store_dtype)
        self._homes = [{name: self._home(layer, name) for name in self._slots} for layer in range(self.num_layers)]

    # -- sizes (for memory checks) ----------------------------------------------------------

    def total_bytes(self, tier: Tier) -> int:
        """Bytes of the whole model on ``tier`` (embeddings and LM head count on the GPU)."""
        other = self.other_numel * self.element_size if tier is Tier.GPU else 0
        return self.num_layers * self.layer_bytes(tier) + other

    @property
    def streamed(self) -> bool:
        return bool(self._slots)

    def layer_bytes(self, tier: Tier) -> int:
        """Bytes of one decoder layer's tensors on ``tier`` (encoded on CPU and disk if compressed)."""
        if self.compress and tier is not Tier.GPU:
            return self.cpu_bytes if tier is Tier.CPU else self.disk_bytes
        numel = {Tier.GPU: self.gpu_numel, Tier.CPU: self.cpu_numel, Tier.DISK: self.disk_numel}[tier]
        return numel * self.element_size

    def buffer_bytes(self) -> int:
        """GPU memory of the two layer buffers (compressed: two encoded, one decoded)."""
        if not self.streamed:
            return 0
        decoded = (self.cpu_numel + self.disk_numel) * self.element_size
        return 2 * (self.cpu_bytes + self.disk_bytes) + decoded if self.compress else 2 * decoded

    # -- loading ----------------------------------------------------------------------------

    def place(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """Move one freshly read tensor to its home; returns what the parameter should hold."""
        located = self._layer_of.get(name)
        tier = Tier.GPU if located is None else self.tier[located[1]]
        if tier is Tier.GPU:
            return tensor.to(device=self.device, dtype=self.dtype)
        index, local = located  # type: ignore[misc]
        offset, _shape = self._slots[local]
        if self.compress:  # the encoding of the tensor in the model dtype, as round_trip makes it
            flat = self._layouts[local].encode(tensor.to(dtype=self.dtype))
            offset = self._bytes[local]
        else:
            flat = tensor.to(dtype=self.dtype).reshape(-1)
        if tier is Tier.CPU:
            self.host[index][offset : offset + flat.numel()].copy_(flat)
        else:
            assert self.disk is not None
            self.disk.write(index, offset - self._cpu_len, flat.cpu().contiguous())
        return self._homes[index][local]

    # -- streaming ----------------------------------------------------------------------------

    def start(self, streams: "StreamSet") -> None:
        """Bind to a run's streams (the previous run must have finished); the two GPU layer buffers
        and the pinned disk staging are allocated once and reused by every run."""
        self._streams = streams
        self._slot_of: dict[int, int] = {}
        self._turn = 0
        # The loader assigns new Parameter objects: look them up after loading, not before.
        self._params = [[(layer.get_parameter(name), name) for name in self._slots] for layer in self._layers]
        if not self.streamed or hasattr(self, "_gpu"):
            return
        numel = self._cpu_len + self._disk_len
        self._gpu = [torch.empty(numel, dtype=self._store_dtype, device=self.device) for _ in range(2)]
        self._staging = [host_empty((self._disk_len,), self._store_dtype, streams.enabled) for _ in range(2)]
        self._ready = [streams.event() for _ in range(2)]
        self._free = [streams.event() for _ in range(2)]
        self._staged = [streams.event() for _ in range(2)]  # staging buffer copied: may be refilled
        # Views made here, outside inference mode: a parameter's data may only be swapped for a
        # normal tensor, and views made inside inference mode are inference tensors.
        if self.compress:  # one decoded buffer, every layer's parameters point at its views
            decoded = torch.empty(self.cpu_numel + self.disk_numel, dtype=self.dtype, device=self.device)
            self._gpu_views = [{name: self._slice(decoded, name) for name in self._slots}] * 2
        else:
            self._gpu_views = [{name: self._slice(buffer, name) for name in self._slots} for buffer in self._gpu]

    def prefetch(self, layer: int) -> None:
        """Queue the load of ``layer``'s streamed tensors on the copy stream (no-op if queued)."""
        if not self.streamed or layer in self._slot_of:
            return
        streams = self._streams
        assert streams is not None, "call start() first"
        slot, self._turn = self._turn, self._turn ^ 1
        self._slot_of[layer] = slot
        target = self._gpu[slot]
        if self.disk is not None:
            staged = self._staged[slot]
            if staged is not None:
                staged.synchronize()  # the last copy out of this staging buffer has finished
            self.disk.read_into(layer, 0, self._staging[slot])  # the host thread reads while the GPU runs
        streams.copy_waits(self._free[slot])  # the layer that used this buffer has finished
        with streams.on_copy():
            if self._cpu_len:
                target[: self._cpu_len].copy_(self.host[layer], non_blocking=True)
            if self.disk is not None:
                target[self._cpu_len :].copy_(self._staging[slot], non_blocking=True)
                streams.record_on_copy(self._staged[slot])
            streams.record_on_copy(self._ready[slot])

    def activate(self, layer: int) -> None:
        """Make ``layer``'s parameters point at its loaded buffer; compute waits for the load."""
        if not self.streamed:
            return
        self.prefetch(layer)
        slot = self._slot_of[layer]
        self._streams.compute_waits(self._ready[slot])  # type: ignore[union-attr]
        views = self._gpu_views[slot]
        if self.compress:  # decode on the compute stream, after the wait above (module docstring)
            encoded = self._gpu[slot]
            for name, view in views.items():
                start = self._bytes[name]
                view.copy_(self._layouts[name].decode(encoded[start : start + self._layouts[name].nbytes]))
        for param, name in self._params[layer]:
            param.data = views[name]

    def release(self, layer: int) -> None:
        """``layer`` has queued all its compute: its buffer may be refilled after that compute."""
        if not self.streamed:
            return
        slot = self._slot_of.pop(layer)
        self._streams.record_on_compute(self._free[slot])  # type: ignore[union-attr]
        for param, name in self._params[layer]:  # the buffer will hold another layer: forget it
            param.data = self._homes[layer][name]

    def _slice(self, flat: torch.Tensor, name: str) -> torch.Tensor:
        offset, shape = self._slots[name]
        return flat[offset : offset + shape.numel()].view(shape)

    def _home(self, layer: int, name: str) -> torch.Tensor:
        """What a streamed parameter holds between uses: its host view, or for the disk share a
        one-element stand-in of the right shape (a meta tensor could not be swapped for real data)."""
        if self.tier[name] is Tier.CPU and not self.compress:
            return self._slice(self.host[layer], name)
        return torch.zeros((), dtype=self.dtype).expand(self._slots[name][1])

"""The engine's flags, shared by ``kvpr generate | bench | serve`` (and the serve benchmark), and
the ``EngineConfig`` they build: every value checked by the config's own ``__post_init__``."""

from __future__ import annotations

import argparse

from kvpr.cli_checks import at_least, positive_float
from kvpr.config import (
    DEFAULT_NUM_CHUNKS,
    RECOMPUTE_AUTO,
    RECOMPUTE_OFF,
    THROUGHPUT_NUM_CHUNKS,
    CacheConfig,
    EngineConfig,
    Offload,
    RuntimeConfig,
    check_codec_names,
    parse_num_chunks,
    parse_recompute,
    parse_resident,
)
from kvpr.errors import KvprError
from kvpr.throughput_config import Placement, ThroughputConfig


def add_engine_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default=None, help="HF directory, .gguf file or built-in name (default: SmolLM2-135M-Instruct)"
    )
    parser.add_argument("--dummy-weights", action="store_true", help="random weights of the model's real configuration")
    parser.add_argument(
        "--offload",
        default="auto",
        help="where the KV cache lives: auto (the GPU while it fits, the overflow on the host; none on a CPU), "
        "none (the device) or cpu (the host, all but --gpu-resident tokens)",
    )
    parser.add_argument(
        "--recompute",
        default=None,
        help="off (default), auto, or a fraction F in [0,1]: recompute l=round(F*s) tokens from X",
    )
    parser.add_argument(
        "--kv-codec",
        default="none",
        help="none (as computed); fp16, int8, int4: the offloaded host tier; kivi2, kivi3, kivi4, kvo: compressed, "
        "on the device or with --offload cpu; h2o, streaming, quest: the baselines, on the device (knobs: --<codec>-*)",
    )
    from kvpr.compress.methods import add_knob_flags

    add_knob_flags(parser)
    parser.add_argument(
        "--x-codec",
        default="none",
        help="how the stored layer inputs X are kept for recomputation: none (model dtype), int8 or int4",
    )
    parser.add_argument(
        "--gpu-resident",
        default="0",
        help="with --offload cpu|auto: keep the K,V of this many tokens on the GPU (the oldest, and the newest "
        "until they are flushed in blocks), or auto (what fits free memory, or --gpu-memory-gib)",
    )
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    parser.add_argument("--dtype", default="auto", help="auto (fp16 on GPU, fp32 on CPU), float32, float16, bfloat16")
    parser.add_argument("--no-overlap", action="store_true", help="run the plain sequential executor (the oracle)")
    parser.add_argument(
        "--num-chunks",
        default="auto",
        help=f"X chunks per layer in the recompute pipeline: auto (default: chosen per step with --recompute auto, "
        f"{DEFAULT_NUM_CHUNKS} with a fixed fraction, {THROUGHPUT_NUM_CHUNKS} in throughput mode) or a count",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="fuse KVO's decode kernels with torch.compile (CUDA; compiles on first use)",
    )
    parser.add_argument(
        "--no-cuda-graph",
        action="store_true",
        help="issue every decode step eagerly (default on CUDA: each step that flushes nothing to the host "
        "is replayed as a CUDA graph, its host-tier copies included)",
    )
    parser.add_argument(
        "--profile", default=None, help="hardware profile JSON to plan with (default: measured and cached)"
    )
    throughput = parser.add_argument_group("throughput mode (FlexGen's setting; on when --percent is given)")
    throughput.add_argument("--mode", choices=["latency", "throughput"], default=None, help="default: latency")
    throughput.add_argument(
        "--percent",
        nargs=6,
        default=None,
        metavar=("WG", "WC", "CG", "CC", "HG", "HC"),
        help="percent of weights, KV cache and activations on GPU and CPU; the rest on disk (as FlexGen)",
    )
    throughput.add_argument("--gpu-batch-size", type=at_least(1), default=4, help="rows of one GPU batch")
    throughput.add_argument("--num-gpu-batches", type=at_least(1), default=1, help="GPU batches per block")
    throughput.add_argument("--offload-dir", default=None, help="directory of the disk tier")
    throughput.add_argument(
        "--pin-weight", action=argparse.BooleanOptionalAction, default=True, help="pin the CPU share of the weights"
    )
    throughput.add_argument(
        "--compress-weight",
        action="store_true",
        help="store the CPU and disk shares of the weights in 4-bit groups of 64 (FlexGen's scheme), "
        "copied encoded and decoded on the GPU per layer; GPU-resident weights stay in the model dtype",
    )
    throughput.add_argument(
        "--kv-partial", action="store_true", help="partial KV recomputation: --recompute auto unless given"
    )
    parser.add_argument(
        "--host-memory-gib",
        type=positive_float,
        default=None,
        help="host memory kvpr may use (default: what the OS reports available now)",
    )
    parser.add_argument(
        "--gpu-memory-gib",
        type=positive_float,
        default=None,
        help="GPU memory kvpr may use, weights included (default: what is free now); emulates a smaller GPU",
    )
    parser.add_argument(
        "--tensor-parallel",
        type=at_least(1),
        default=1,
        help="split each layer's heads and MLP over N ranks (launch N processes with torchrun; rank 0 prints)",
    )


def throughput_config(args: argparse.Namespace) -> ThroughputConfig | None:
    """Throughput mode's placement and block, or None in latency mode."""
    mode = args.mode or ("throughput" if args.percent is not None else "latency")
    if mode == "latency":
        if args.percent is not None:
            raise KvprError("--percent places weights and activations too: it needs --mode throughput")
        if getattr(args, "compress_weight", False):
            raise KvprError("--compress-weight compresses streamed weights: it needs --mode throughput")
        return None
    placement = Placement.parse(args.percent) if args.percent is not None else Placement()
    return ThroughputConfig(
        placement=placement,
        gpu_batch_size=args.gpu_batch_size,
        num_gpu_batches=args.num_gpu_batches,
        offload_dir=args.offload_dir,
        pin_weight=args.pin_weight,
        compress_weight=getattr(args, "compress_weight", False),
    )


def build_engine_config(args: argparse.Namespace) -> EngineConfig:
    """The one function that turns flags into configuration."""
    from kvpr.compress.methods import knob_params

    check_codec_names(args.kv_codec, args.x_codec)  # before the knobs, whose errors name the codec
    throughput = throughput_config(args)
    recompute = args.recompute or (RECOMPUTE_AUTO if args.kv_partial else RECOMPUTE_OFF)
    offload_name = args.offload
    if throughput is not None:  # the placement decides; the cache leaves the GPU unless all of it stays
        if args.offload not in ("none", "auto"):
            raise KvprError("--offload is latency mode's flag: in throughput mode --percent places the cache")
        offload_name = "none" if throughput.placement.cache_gpu >= 100 else "cpu"
        if offload_name == "none" and args.kv_codec != "none":
            raise KvprError(
                f"--kv-codec {args.kv_codec} compresses the CPU and disk tiers of the cache, and --percent "
                f"{throughput.placement} keeps all of it on the GPU: drop it or lower the cache's GPU share"
            )
    try:
        offload = Offload(offload_name)
    except ValueError:
        raise KvprError(f"--offload {args.offload!r}: use auto, none or cpu") from None
    return EngineConfig(
        model=args.model,
        dummy_weights=args.dummy_weights,
        throughput=throughput,
        cache=CacheConfig(
            offload=offload,
            recompute=parse_recompute(recompute),
            kv_codec=args.kv_codec,
            gpu_resident=parse_resident(args.gpu_resident),
            kv_codec_params=knob_params(args, args.kv_codec),
            x_codec=args.x_codec,
        ),
        runtime=RuntimeConfig(
            device=args.device,
            dtype=args.dtype,
            overlap=not args.no_overlap,
            num_chunks=parse_num_chunks(args.num_chunks),
            compile=args.compile,
            cuda_graph=not args.no_cuda_graph,
            profile_path=args.profile,
            host_memory_gib=args.host_memory_gib,
            gpu_memory_gib=args.gpu_memory_gib,
            tensor_parallel=args.tensor_parallel,
        ),
    )

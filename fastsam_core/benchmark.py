"""Timing, FLOP counting and the image-encoder comparison behind `fastsam bench` and `bench/`."""

from __future__ import annotations

import copy
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from fastsam_core.config import FastConfig
from fastsam_core.models.convert import adopt_module, dtype_name, forward_hook_registries
from fastsam_core.models.sam.reference import build_encoder, build_sam
from fastsam_core.numerics import rel_l2
from fastsam_core.patch import optimize, report

__all__ = ["rel_l2"]  # re-exported: tests and tools import it from here too


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_name(device: torch.device | str) -> str:
    """The GPU's name, or the CPU's architecture and thread count."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu {platform.machine()} ({torch.get_num_threads()} threads)"


def env_info(device: torch.device | str) -> dict[str, str]:
    """Device and library versions, for result files and `extra_info`."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    return {"device": device_name(device), "torch": torch.__version__, "triton": triton_version}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(
    fn: Callable[[], object], device: torch.device, warmup: int, runs: int
) -> list[float]:
    """Seconds per call of `fn`, `runs` times after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def encoder_flops(
    variant: str, image_size: int, batch: int = 1, **overrides: object
) -> int:
    """FLOPs of one reference encoder forward, counted by torch.utils.flop_counter on meta."""
    with torch.device("meta"):
        encoder = build_encoder(variant, image_size, **overrides)
        x = torch.empty(batch, 3, image_size, image_size)
    with FlopCounterMode(display=False) as counter:
        encoder(x)
    return counter.get_total_flops()


def meta_flops(module: torch.nn.Module, *input_shape: int) -> int:
    """FLOPs of `module` on one input of `input_shape`, counted by torch.utils.flop_counter on
    a meta-device copy (no memory, no compute; forward hooks not copied)."""
    memo = {id(registry): type(registry)() for registry in forward_hook_registries(module)}
    meta = copy.deepcopy(module, memo).to("meta")
    with FlopCounterMode(display=False) as counter:
        meta(torch.empty(*input_shape, device="meta"))
    return counter.get_total_flops()


def memory_attention_flops(module: torch.nn.Module, queries: int, memory: int,
                           batch: int = 1) -> int:
    """FLOPs of one forward of sam2's `MemoryAttention` (the fast one does the same work):
    `queries` tokens of the current frame attending to themselves and to `memory` tokens
    (memory frames and pointer tokens), for `batch` objects. Each linear costs 2 x in x out
    per token it projects, each attention 4 x queries x keys x its internal width (q k^T and
    the weighted sum of v); LayerNorms, softmax and the rotary embedding are not counted.
    torch.utils.flop_counter does not count SDPA on the CPU, hence this count."""
    def linear(layer: torch.nn.Linear) -> int:
        return 2 * layer.in_features * layer.out_features

    total = 0
    for layer in module.layers:
        for attn, keys in ((layer.self_attn, queries), (layer.cross_attn_image, memory)):
            total += queries * (linear(attn.q_proj) + linear(attn.out_proj))
            total += keys * (linear(attn.k_proj) + linear(attn.v_proj))
            total += 4 * queries * keys * attn.internal_dim
        total += queries * (linear(layer.linear1) + linear(layer.linear2))
    return total * batch


@dataclass
class EncoderBenchResult:
    """Reference vs fast image encoder, measured in one run."""

    device: str
    torch: str
    triton: str
    variant: str
    image_size: int
    batch: int
    dtype: str
    gflop_per_image: float
    reference_ms: float
    fast_ms: float
    speedup: float
    reference_img_s: float
    fast_img_s: float
    reference_tflop_s: float
    fast_tflop_s: float
    fast_error: float  # relative L2 vs the fp32 reference
    reference_error: float  # the reference run in `dtype` vs the fp32 reference (0 for fp32)
    report: str

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


@torch.inference_mode()
def bench_image_encoder(
    variant: str = "vit_b",
    image_size: int = 1024,
    batch: int = 1,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    config: FastConfig | None = None,
    warmup: int = 1,
    runs: int = 3,
    seed: int = 0,
    log: Callable[[str], None] = lambda msg: None,
    **encoder_overrides: object,
) -> EncoderBenchResult:
    """Time the reference encoder (run in `dtype`) and the fast one, and check parity.

    Args:
        variant, image_size, encoder_overrides: the random-weight model (see `build_sam`), or
            variant "tiny": the shipped tiny trained SAM at its own image size.
        batch: images per forward.
        dtype: compute dtype of both (the reference is converted with `.to(dtype)`).
        device: where to run.
        config: FastConfig for the fast encoder; its dtype is replaced by `dtype`.
        warmup, runs: untimed and timed forwards of each; the median is reported.
        log: progress messages.
    """
    device = torch.device(device)
    config = (config or FastConfig()).replace(dtype=dtype)
    if variant == "tiny":
        from fastsam_core.models.tiny import tiny

        sam = tiny("sam").to(device)
        image_size = sam.image_encoder.img_size
        log(f"the shipped tiny trained SAM ({image_size} px) on {device_name(device)}")
        flops = meta_flops(sam.image_encoder, batch, 3, image_size, image_size)
    else:
        log(f"building random-weight SAM {variant} at {image_size} px on {device_name(device)}")
        sam = build_sam(variant, image_size, seed, **encoder_overrides).to(device)
        flops = encoder_flops(variant, image_size, batch, **encoder_overrides)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, image_size, image_size, generator=gen).to(device)

    log("fp32 reference output (parity baseline)")
    expected = sam.image_encoder(x)
    reference = adopt_module(sam.image_encoder, dtype)
    x_ref = x.to(dtype)
    log(f"timing the reference in {dtype_name(dtype)}: {warmup} warm-up + {runs} runs")
    ref_times = time_call(lambda: reference(x_ref), device, warmup, runs)
    reference_error = rel_l2(reference(x_ref).float(), expected)
    reference = None  # free the converted copy before optimize() makes its own

    optimize(sam, config)
    log(f"timing the fast encoder: {warmup} warm-up + {runs} runs")
    fast_times = time_call(lambda: sam.image_encoder(x), device, warmup, runs)
    fast_error = rel_l2(sam.image_encoder(x), expected)

    ref_s, fast_s = statistics.median(ref_times), statistics.median(fast_times)
    return EncoderBenchResult(
        **env_info(device),
        variant=variant,
        image_size=image_size,
        batch=batch,
        dtype=dtype_name(dtype),
        gflop_per_image=flops / batch / 1e9,
        reference_ms=ref_s * 1e3,
        fast_ms=fast_s * 1e3,
        speedup=ref_s / fast_s,
        reference_img_s=batch / ref_s,
        fast_img_s=batch / fast_s,
        reference_tflop_s=flops / ref_s / 1e12,
        fast_tflop_s=flops / fast_s / 1e12,
        fast_error=fast_error,
        reference_error=reference_error,
        report=str(report(sam)),
    )

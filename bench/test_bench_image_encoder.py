"""pytest-benchmark: reference vs fast SAM image encoder, one group per model.

On CUDA: real sizes (vit_b, vit_h at 1024 px), batch 8, bf16; "fast" is the default config
(attention "auto": the Triton kernel where it measured faster), "fast_sdpa" forces SDPA,
"fast_int8" / "fast_int8_mlp" / "fast_24" / "fast_24_mlp" add `FastConfig(quantize=...)`
(int8 or 2:4 on all linears or the MLPs only), and the fast cases record their cold start
(`cold_start_s`: first forward, kernel tuning included, which is a true cold start when
`tuning_cache_entries` is 0, as in bench/run_gpu.sh; `cold_start_tuning_s`: its part spent
measuring kernel candidates). On CPU: a small encoder, so the suite
runs in seconds and never rots (int8 there is an accuracy path, not a fast one). The
reference runs in the same dtype (the model converted with `.to(dtype)`). The quantized
cases also record `speedup_vs_fast` (against "fast", the issue's measure) and `sqnr_db`, the
image embedding's signal-to-noise ratio against the unquantized fast encoder's. FLOPs from
torch.utils.flop_counter. Conventions: bench/common.py.

    pytest bench/test_bench_image_encoder.py --benchmark-only
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import pytest
import torch

import fastsam_core
from bench.common import DEVICE, fail_on_fallbacks, record, repeats
from fastsam_core import FastConfig
from fastsam_core.benchmark import encoder_flops, synchronize
from fastsam_core.models.convert import adopt_module, dtype_name
from fastsam_core.models.sam.reference import build_sam
from fastsam_core.ops import attention
from fastsam_core.ops.quant import FUSION_TUNER, INT8_TUNER, sqnr_db

TUNERS = (attention.TUNER, INT8_TUNER, FUSION_TUNER)  # measured choices a cold start makes
_unquantized: dict[str, torch.Tensor] = {}  # case -> the "fast" case's embedding


@dataclass(frozen=True)
class Case:
    name: str
    variant: str
    image_size: int
    batch: int
    dtype: torch.dtype
    rounds: int
    overrides: dict = field(default_factory=dict)


if DEVICE.type == "cuda":
    CASES = [
        Case("vit_b-1024-bs8", "vit_b", 1024, 8, torch.bfloat16, rounds=10),
        Case("vit_h-1024-bs8", "vit_h", 1024, 8, torch.bfloat16, rounds=5),
    ]
    IMPLS = ["reference", "fast", "fast_sdpa", "fast_int8", "fast_int8_mlp", "fast_24",
             "fast_24_mlp"]
else:
    SMALL = dict(depth=4, embed_dim=128, num_heads=4, global_attn_indexes=(1, 3))
    CASES = [Case("small-256-bs2", "vit_b", 256, 2, torch.float32, rounds=3, overrides=SMALL)]
    IMPLS = ["reference", "fast", "fast_int8"]
QUANTIZED = {"fast_int8": ("int8", "all"), "fast_int8_mlp": ("int8", "mlp"),
             "fast_24": ("2:4", "all"), "fast_24_mlp": ("2:4", "mlp")}


@pytest.fixture(scope="module", params=CASES, ids=[c.name for c in CASES])
def case_model(request):
    case = request.param
    sam = build_sam(case.variant, case.image_size, seed=0, **case.overrides).to(DEVICE)
    x = torch.randn(case.batch, 3, case.image_size, case.image_size, device=DEVICE)
    flops = encoder_flops(case.variant, case.image_size, case.batch, **case.overrides)
    return case, sam, x, flops


@pytest.mark.parametrize("impl", IMPLS)
def test_image_encoder(benchmark, case_model, impl, monkeypatch):
    case, sam, x, flops = case_model
    group = f"image_encoder {case.name}"
    benchmark.group = group
    info = {}
    if impl == "reference":
        encoder = adopt_module(sam.image_encoder, case.dtype)  # naive .to(dtype)
        inputs = x.to(case.dtype)
    else:
        # the first call tunes unless the per-user cache knows the shapes already: say which
        for tuner in TUNERS:
            monkeypatch.setattr(tuner, "choices", {})
        info["tuning_cache_entries"] = sum(tuner.cache_entries() for tuner in TUNERS)
        mode = "sdpa" if impl == "fast_sdpa" else "auto"
        quantize, layers = QUANTIZED.get(impl, (None, "all"))
        fastsam_core.optimize(sam, FastConfig(dtype=case.dtype, attention=mode,
                                              quantize=quantize, quantize_layers=layers))
        encoder, inputs = sam.image_encoder, x

    def run():
        with torch.inference_mode():
            for _ in range(repeats(impl)):
                encoder(inputs)
        synchronize(DEVICE)

    if DEVICE.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    try:
        tuned_before = sum(tuner.tuning_seconds for tuner in TUNERS)
        start = time.perf_counter()
        run()
        info["cold_start_s"] = time.perf_counter() - start
        info["cold_start_tuning_s"] = sum(t.tuning_seconds for t in TUNERS) - tuned_before
        if impl != "reference":
            fail_on_fallbacks(sam, impl)
        benchmark.pedantic(run, rounds=case.rounds, warmup_rounds=1, iterations=1)
        if impl in ("fast", *QUANTIZED):
            with torch.inference_mode():
                embedding = encoder(inputs).float()  # the timed shapes: no new tuning
            if impl == "fast":
                _unquantized[case.name] = embedding
            elif case.name in _unquantized:
                info["sqnr_db"] = sqnr_db(_unquantized[case.name], embedding)
    finally:
        if impl != "reference":
            fastsam_core.restore(sam)
    if DEVICE.type == "cuda":
        info["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    record(benchmark, group, impl, items=case.batch, flops=flops, variant=case.variant,
           image_size=case.image_size, batch=case.batch,
           dtype=dtype_name(case.dtype), **info)

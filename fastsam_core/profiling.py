"""`fastsam profile`: a torch.profiler trace and a markdown summary of one stage.

    python -m fastsam_core profile --model vit_h --stage image_encoder --batch 8

writes, under --out (default `profiles/out`):
  <name>.trace.json.gz  Chrome / Perfetto trace (open in ui.perfetto.dev or chrome://tracing)
  <name>.md             device, versions, commit, step time, img/s, achieved TFLOP/s against
                        the device's ceiling (design.md), time per part of the stage, top ops
                        and kernels by device time.

The profiled steps follow torch.profiler's wait / warmup / active schedule, after one untimed
call (compilation, kernel tuning). Parts of a stage are marked with `record_function`
ranges (`fastsam::...`) from forward hooks: patch embedding, windowed and global blocks,
neck, prompt encoder, mask decoder.
"""

from __future__ import annotations

import gzip
import shutil
import statistics
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile, record_function, schedule
from torch.utils.flop_counter import FlopCounterMode

from fastsam_core.benchmark import encoder_flops, env_info, synchronize, time_call
from fastsam_core.config import FastConfig
from fastsam_core.models.convert import dtype_name
from fastsam_core.models.sam.reference import build_sam
from fastsam_core.patch import optimize, report

STAGES = ("image_encoder", "prompt", "predictor")

# Dense bf16 matmul ceilings of the project's GPUs, from ../shared/design.md section 5 (not
# measured by this project).
CEILING_TFLOP_S = {"H200": 790.0}


@dataclass
class ProfileResult:
    summary: Path
    trace: Path
    step_ms: float


def ceiling_tflop_s(device_name: str) -> float | None:
    return next((v for k, v in CEILING_TFLOP_S.items() if k in device_name), None)


def commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5, cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def mark_parts(model: torch.nn.Module) -> list[Callable[[], None]]:
    """record_function ranges around the parts of a SAM model (forward hooks); returns the
    functions that undo them."""
    undo = []

    def mark(module: torch.nn.Module, name: str) -> None:
        ranges = []

        def enter(*_):
            ranges.append(record_function(name))
            ranges[-1].__enter__()

        def leave(*_):
            ranges.pop().__exit__(None, None, None)

        undo.append(module.register_forward_pre_hook(enter).remove)
        undo.append(module.register_forward_hook(leave).remove)

    encoder = model.image_encoder
    if hasattr(encoder, "patch_embed"):
        mark(encoder.patch_embed, "fastsam::patch_embed")
    for block in getattr(encoder, "blocks", []):
        kind = "windowed" if block.window_size > 0 else "global"
        mark(block, f"fastsam::{kind}_block")
    if hasattr(encoder, "neck_forward"):  # the fast encoder's fused neck is a method
        method = encoder.neck_forward

        def neck_forward(x):
            with record_function("fastsam::neck"):
                return method(x)

        encoder.neck_forward = neck_forward
        undo.append(lambda: delattr(encoder, "neck_forward"))
    elif hasattr(encoder, "neck"):
        mark(encoder.neck, "fastsam::neck")
    mark(model.prompt_encoder, "fastsam::prompt_encoder")
    mark(model.mask_decoder, "fastsam::mask_decoder")
    return undo


def build_step(stage: str, sam: torch.nn.Module, batch: int, image_size: int,
               device: torch.device) -> tuple[Callable[[], object], int]:
    """The function one profiled step calls, and the images (or prompts) it handles."""
    gen = torch.Generator().manual_seed(0)
    if stage == "image_encoder":
        x = torch.randn(batch, 3, image_size, image_size, generator=gen).to(device)
        return (lambda: sam.image_encoder(x)), batch
    if stage == "prompt":
        corners = torch.sort(torch.rand(batch, 2, 2, generator=gen) * image_size, dim=1).values
        boxes = corners.reshape(batch, 4).to(device)
        grid = image_size // 16
        embedding = torch.randn(1, 256, grid, grid, generator=gen).to(device)

        def prompt_step():
            sparse, dense = sam.prompt_encoder(None, boxes, None)
            return sam.mask_decoder(embedding, sam.prompt_encoder.get_dense_pe(), sparse, dense,
                                    True)

        return prompt_step, batch
    if stage == "predictor":
        from segment_anything import SamPredictor

        predictor = SamPredictor(sam)
        rng = np.random.default_rng(0)
        image = rng.integers(0, 256, (image_size * 3 // 4, image_size, 3), dtype=np.uint8)
        point = dict(point_coords=np.array([[image_size / 2, image_size / 3]]),
                     point_labels=np.array([1]))

        def predictor_step():
            predictor.set_image(image)
            return predictor.predict(**point, multimask_output=True)

        return predictor_step, 1
    raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")


def stage_flops(stage: str, sam: torch.nn.Module, variant: str, image_size: int, batch: int,
                step: Callable[[], object]) -> int:
    """FLOPs of one step, counted by torch.utils.flop_counter (encoder: on the meta device)."""
    if stage == "image_encoder":
        return encoder_flops(variant, image_size, batch)
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def profile_stage(
    stage: str = "image_encoder",
    variant: str = "vit_b",
    image_size: int = 1024,
    batch: int = 1,
    device: torch.device | str = "cpu",
    config: FastConfig | None = None,
    out_dir: Path | str = "profiles/out",
    active: int = 3,
    log: Callable[[str], None] = lambda msg: None,
) -> ProfileResult:
    """Profile one stage of a random-weight SAM optimized with `config`; write trace + summary."""
    device = torch.device(device)
    config = config or FastConfig()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    log(f"building random-weight SAM {variant} at {image_size} px")
    sam = build_sam(variant, image_size, seed=0).to(device)
    step, items = build_step(stage, sam, batch, image_size, device)
    with torch.inference_mode():
        flops = stage_flops(stage, sam, variant, image_size, batch, step)
    optimize(sam, config)
    name = f"{stage}-{variant}-{image_size}px-bs{batch}-{device.type}"
    with torch.inference_mode():
        log("first call (compilation and kernel tuning happen here)")
        step()
        times = time_call(step, device, warmup=0, runs=active)
        activities = [ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(ProfilerActivity.CUDA)
        # a compiled encoder's graph cannot take the parts' record_function hooks
        marked = config.compile is None or stage == "prompt"
        unmark = mark_parts(sam) if marked else []
        trace_json = out_dir / f"{name}.trace.json"
        log(f"profiling: schedule wait=1, warmup=1, active={active}")
        try:
            with profile(activities=activities,
                         schedule=schedule(wait=1, warmup=1, active=active),
                         on_trace_ready=lambda p: p.export_chrome_trace(str(trace_json))) as prof:
                for _ in range(2 + active):
                    step()
                    synchronize(device)
                    prof.step()
        finally:
            for undo in unmark:
                undo()
    trace = trace_json.with_suffix(".json.gz")
    with open(trace_json, "rb") as src, gzip.open(trace, "wb") as dst:
        shutil.copyfileobj(src, dst)
    trace_json.unlink()

    step_s = statistics.median(times)
    env = env_info(device)
    lines = summary_lines(prof, device, active, step_s)
    if not marked:
        lines[2:2] = ["(no parts marked: the encoder is compiled, and the record_function "
                      "hooks that mark them would break its graph)", ""]
    options = [f"--model {variant}", f"--stage {stage}", f"--batch {batch}",
               f"--image-size {image_size}", f"--device {device}", f"--active {active}",
               f"--attention {config.attention}", f"--out {out_dir}"]
    if config.dtype is not None:
        options.append(f"--dtype {dtype_name(config.dtype)}")
    if config.compile is not None:
        options.append(f"--compile {config.compile}")
    ceiling = ceiling_tflop_s(env["device"])
    tflop_s = flops / step_s / 1e12
    vs_ceiling = f" ({tflop_s / ceiling:.0%} of {ceiling:g} TFLOP/s)" if ceiling else ""
    header = [
        f"# Profile: {stage}, SAM {variant}, {image_size} px, batch {batch}",
        "",
        f"- device: {env['device']}; torch {env['torch']}; triton {env['triton']}; "
        f"commit {commit()}",
        f"- config: {config}",
        f"- command: `python -m fastsam_core profile {' '.join(options)}`",
        f"- step: {step_s * 1e3:.2f} ms (median of {active}); {items / step_s:.2f} "
        f"{'prompts' if stage == 'prompt' else 'images'}/s; {flops / 1e9:.1f} GFLOP per step "
        f"(torch.utils.flop_counter, reference); {tflop_s:.2f} TFLOP/s{vs_ceiling}",
        f"- trace: {trace.name}",
        "",
        "```",
        str(report(sam)),
        "```",
        "",
    ]
    summary = out_dir / f"{name}.md"
    summary.write_text("\n".join(header + lines) + "\n")
    return ProfileResult(summary=summary, trace=trace, step_ms=step_s * 1e3)


def summary_lines(prof: profile, device: torch.device, active: int, step_s: float) -> list[str]:
    """Markdown tables: time per marked part, top ops / kernels by self device time."""
    on_gpu = device.type == "cuda"
    events = prof.key_averages()

    def total(e) -> float:  # microseconds over the active steps
        return e.device_time_total if on_gpu else e.cpu_time_total

    def self_time(e) -> float:
        return e.self_device_time_total if on_gpu else e.self_cpu_time_total

    clock = "device" if on_gpu else "CPU"
    # % of the profiled steps (profiler overhead included), which the parts add up to; the
    # header's step time is the unprofiled median
    steps = [e for e in events if e.key.startswith("ProfilerStep")]
    step_us = sum(total(e) for e in steps) / active if steps else step_s * 1e6
    lines = [f"## Time per part ({clock} time per step)", "", "| part | calls/step | ms/step "
             "| % of step |", "|---|---|---|---|"]
    for e in sorted((e for e in events if e.key.startswith("fastsam::")), key=total,
                    reverse=True):
        per_step = total(e) / active
        lines.append(f"| {e.key[9:]} | {e.count / active:g} | {per_step / 1e3:.2f} | "
                     f"{per_step / step_us:.0%} |")
    lines += ["", f"## Top ops and kernels by self {clock} time", "",
              "| name | calls/step | ms/step | % of step |", "|---|---|---|---|"]
    ops = [e for e in events if not e.key.startswith(("fastsam::", "ProfilerStep"))]
    for e in sorted(ops, key=self_time, reverse=True)[:15]:
        per_step = self_time(e) / active
        lines.append(f"| `{e.key[:80]}` | {e.count / active:g} | {per_step / 1e3:.3f} | "
                     f"{per_step / step_us:.1%} |")
    return lines

"""`fastsam` command line (also `python -m fastsam_core`)."""

from __future__ import annotations

import argparse
import json
import sys

import torch

from fastsam_core.config import ATTENTION_BACKENDS, COMPILE_MODES, FastConfig

CPU_DEFAULT_IMAGE_SIZE = 512  # vit_b at 512 px: reference + fast in about a minute on 2 cores
SAM2_CONFIGS = {f"{version}_hiera_{size}": f"configs/{version}/{version}_hiera_{size}.yaml"
                for version in ("sam2", "sam2.1") for size in ("t", "s", "b+", "l")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastsam", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    bench = commands.add_parser(
        "bench",
        help="reference vs fast SAM image encoder: time, speedup, parity",
        description="Time the reference and the fast SAM image encoder on a random-weight "
        "model and report speedup and parity error. Defaults: vit_b, batch 1, 1024 px and "
        f"bfloat16 on CUDA; {CPU_DEFAULT_IMAGE_SIZE} px and float32 on a CPU.",
    )
    bench.add_argument("--model", default="vit_b", choices=["vit_b", "vit_l", "vit_h", "tiny"],
                       help="random-weight SAM, or the shipped tiny trained SAM")
    bench.add_argument("--image-size", type=int, default=None,
                       help="pixels (16 px patches; not with --model tiny: an error)")
    bench.add_argument("--batch", type=int, default=1)
    bench.add_argument("--dtype", default=None, help="float32, bfloat16 or float16")
    bench.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ...")
    bench.add_argument("--attention", default="auto", choices=ATTENTION_BACKENDS)
    bench.add_argument("--compile", default=None, choices=COMPILE_MODES)
    bench.add_argument("--warmup", type=int, default=1)
    bench.add_argument("--runs", type=int, default=3)
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--json", default=None, help="also write the result to this file")
    bench.set_defaults(run=_bench)

    gate = commands.add_parser(
        "gate",
        help="run bench/ and fail on a performance regression against this device's baseline",
        description="Run the pytest-benchmark suites and compare them with the baseline "
        "committed for this device in BASELINES/<device>/: absolute medians (pytest-benchmark "
        "--benchmark-compare-fail) and fast/reference speedup ratios. Exit status 1 on a "
        "regression. Extra arguments after -- go to pytest (e.g. -- -k image_encoder).",
    )
    gate.add_argument("paths", nargs="*", default=["bench"], help="bench files or folders")
    gate.add_argument("--save", action="store_true", help="record a new baseline instead")
    gate.add_argument("--baselines", default="bench/baselines")
    gate.add_argument("--abs-tolerance", type=float, default=25.0,
                      help="allowed slowdown of a median, percent (default 25)")
    gate.add_argument("--ratio-tolerance", type=float, default=15.0,
                      help="allowed drop of a speedup ratio, percent (default 15)")
    gate.set_defaults(run=_gate)

    prof = commands.add_parser(
        "profile",
        help="torch.profiler trace and markdown summary of one stage",
        description="Profile one stage of a random-weight SAM optimized with the given "
        "config: writes a gzipped Chrome/Perfetto trace and a markdown summary (step time, "
        "img/s, TFLOP/s against the device ceiling, time per part, top ops and kernels).",
    )
    prof.add_argument("--model", default="vit_b", choices=["vit_b", "vit_l", "vit_h"])
    prof.add_argument("--stage", default="image_encoder",
                      choices=["image_encoder", "prompt", "predictor"])
    prof.add_argument("--batch", type=int, default=1,
                      help="images per step (prompt stage: box prompts per step)")
    prof.add_argument("--image-size", type=int, default=None)
    prof.add_argument("--dtype", default=None)
    prof.add_argument("--device", default=None)
    prof.add_argument("--attention", default="auto", choices=ATTENTION_BACKENDS)
    prof.add_argument("--compile", default=None, choices=COMPILE_MODES)
    prof.add_argument("--active", type=int, default=3, help="profiled steps")
    prof.add_argument("--out", default="profiles/out")
    prof.set_defaults(run=_profile)

    check = commands.add_parser(
        "check",
        help="compare the fast path with the reference on your weights and images",
        description="Load your checkpoint, run the reference (fp32) and the fast path (per "
        "--dtype) on your images with grid-point and box prompts, print mask IoU, score "
        "differences and speedup. Exit status 1 when agreement is below the documented "
        "thresholds (fastsam_core.check.MIN_MEAN_IOU).",
    )
    check.add_argument("images", nargs="+", help="image files (anything Pillow reads)")
    check.add_argument("--model", default="vit_h", choices=["vit_b", "vit_l", "vit_h",
                                                            *SAM2_CONFIGS])
    check.add_argument("--checkpoint", required=True,
                       help="SAM: the state_dict (.pth); SAM 2: sam2's checkpoint (.pt)")
    check.add_argument("--dtype", action="append", default=None,
                       help="float32, bfloat16 or float16; repeat for several (default: the "
                       "device's default, bf16 on CUDA, fp32 on CPU)")
    check.add_argument("--device", default=None)
    check.add_argument("--grid", type=int, default=4, help="grid x grid point prompts")
    check.set_defaults(run=_check)

    amg = commands.add_parser(
        "amg",
        help="segment everything: COCO-RLE JSON and a PNG overlay per image",
        description="Automatic mask generation with FastAutomaticMaskGenerator (the "
        "arguments of segment_anything's SamAutomaticMaskGenerator). Default model: the "
        "shipped tiny SAM (trained on synthetic shapes: for tests and demos, not photos).",
    )
    amg.add_argument("images", nargs="+", help="image files (anything Pillow reads)")
    amg.add_argument("--out", required=True, help="output folder")
    amg.add_argument("--model", default="tiny", choices=["tiny", "vit_b", "vit_l", "vit_h"])
    amg.add_argument("--checkpoint", default=None, help="state_dict for vit_b/l/h")
    amg.add_argument("--device", default=None)
    amg.add_argument("--dtype", default=None)
    amg.add_argument("--points-per-side", type=int, default=32)
    amg.add_argument("--points-per-batch", type=int, default=256)
    amg.add_argument("--pred-iou-thresh", type=float, default=0.88)
    amg.add_argument("--stability-score-thresh", type=float, default=0.95)
    amg.add_argument("--box-nms-thresh", type=float, default=0.7)
    amg.add_argument("--crop-n-layers", type=int, default=0)
    amg.add_argument("--min-mask-region-area", type=int, default=0)
    amg.set_defaults(run=_amg)

    acc = commands.add_parser(
        "accuracy",
        help="accuracy cost of each configuration (dtype, int8, 2:4) on a tiny trained model "
        "or a real-size random one",
        description="Mask IoU against the fp32 reference (all pixels and outside the logit "
        "margin) and per-layer SQNR of quantized linears, per configuration, on generated "
        "scenes, with the shipped tiny trained SAM or SAM 2, or a random-weight SAM at "
        "1024 px.",
    )
    acc.add_argument("--model", choices=["sam", "sam2", "vit_b", "vit_l", "vit_h"],
                     default="sam",
                     help="the tiny trained model to measure on (sam, sam2), or a real-size "
                     "SAM with random weights at 1024 px (vit_*: parity at real shapes; "
                     "its masks mean nothing by themselves)")
    acc.add_argument("--device", default=None,
                     help="cpu or cuda (default: cuda when available); on CUDA the low-"
                     "precision and quantized configurations compute in bf16")
    acc.add_argument("--scenes", type=int, default=8)
    acc.add_argument("--seed", type=int, default=4242)
    acc.add_argument("--out", default=None, help="also write the rows to this JSON file")
    acc.set_defaults(run=_accuracy)

    summary = commands.add_parser("summarize", help="table of a pytest-benchmark JSON file")
    summary.add_argument("result", help="a --benchmark-json or --benchmark-save file")
    summary.set_defaults(run=_summarize)

    argv = sys.argv[1:] if argv is None else list(argv)
    extra = []
    if argv[:1] == ["gate"] and "--" in argv:  # gate hands what follows "--" to pytest
        argv, extra = argv[:argv.index("--")], argv[argv.index("--") + 1:]
    args = parser.parse_args(argv)
    args.extra = extra
    return args.run(args, parser)


def _profile(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from pathlib import Path

    from fastsam_core.profiling import profile_stage

    device, config, image_size = _setup(args, parser)
    if args.stage == "predictor" and args.batch != 1:
        parser.error("--batch: the predictor stage runs one image per step "
                     "(SamPredictor.set_image)")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        parser.error(f"--out {args.out}: not a folder")
    result = profile_stage(args.stage, args.model, image_size, args.batch, device, config,
                           args.out, args.active, log=lambda m: print(f"[fastsam] {m}",
                                                                      flush=True))
    print(result.summary.read_text())
    print(f"wrote {result.summary} and {result.trace}")
    return 0


def _check(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import numpy as np
    from PIL import Image
    from segment_anything import sam_model_registry

    from fastsam_core.check import format_rows, run_check

    device = _device(parser, args.device)
    _checkpoint_file(parser, args.checkpoint)
    try:
        dtypes = [FastConfig(dtype=d).dtype for d in args.dtype or []] or [
            FastConfig().resolve_dtype(device, torch.float32)]
    except (TypeError, ValueError) as err:
        parser.error(f"--dtype: {err}")
    if args.grid < 1:
        parser.error("--grid must be at least 1")
    images = []
    for path in args.images:
        try:
            images.append(np.array(Image.open(path).convert("RGB")))
        except OSError as err:
            parser.error(f"cannot read image {path}: {err}")
    print(f"[fastsam] loading {args.model} from {args.checkpoint}", flush=True)
    if args.model in SAM2_CONFIGS:
        from sam2.build_sam import build_sam2

        sam = _load(parser, args, lambda: build_sam2(SAM2_CONFIGS[args.model], args.checkpoint,
                                                     device=str(device)))
    else:
        sam = _load(parser, args, lambda: sam_model_registry[args.model](
            checkpoint=args.checkpoint)).to(device).eval()
    rows = run_check(sam, images, dtypes, grid=args.grid,
                     log=lambda m: print(f"[fastsam] {m}", flush=True))
    print(f"\n{len(images)} image(s), {args.grid * args.grid} point prompts (3 masks) and 3 "
          f"boxes each, on {device}")
    print(format_rows(rows))
    return 0 if all(r.passed for r in rows) else 1


def _amg(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import json as json_module
    from pathlib import Path

    import numpy as np
    from PIL import Image
    from segment_anything import sam_model_registry
    from tqdm import tqdm

    from fastsam_core.patch import optimize
    from fastsam_core.pipelines import FastAutomaticMaskGenerator

    if args.model != "tiny" and args.checkpoint is None:
        parser.error(f"--model {args.model} needs --checkpoint (no weights can be downloaded)")
    if args.model == "tiny" and args.checkpoint is not None:
        parser.error("--checkpoint: --model tiny runs the shipped tiny SAM, not a checkpoint; "
                     "name the checkpoint's model (--model vit_b, vit_l or vit_h)")
    for name, least in (("points_per_side", 1), ("points_per_batch", 1), ("crop_n_layers", 0),
                        ("min_mask_region_area", 0)):
        if getattr(args, name) < least:
            parser.error(f"--{name.replace('_', '-')} must be at least {least}")
    device = _device(parser, args.device)
    try:
        config = FastConfig(dtype=args.dtype)
    except (TypeError, ValueError) as err:
        parser.error(f"--dtype: {err}")
    if args.checkpoint is not None:
        _checkpoint_file(parser, args.checkpoint)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        parser.error(f"--out {out}: not a folder")
    images = []
    for path in args.images:
        try:
            images.append((Path(path), np.array(Image.open(path).convert("RGB"))))
        except OSError as err:
            parser.error(f"cannot read image {path}: {err}")
    stems = _output_stems([path for path, _ in images])
    inputs = {path.resolve() for path, _ in images}
    for stem in stems:
        for written in (out / f"{stem}.json", out / f"{stem}.png"):
            if written.resolve() in inputs:
                parser.error(f"--out {out}: the output {written.name} would overwrite an "
                             "input image; choose another folder")
    if args.model == "tiny":
        sam = _tiny_sam(parser)
    else:
        sam = _load(parser, args, lambda: sam_model_registry[args.model](
            checkpoint=args.checkpoint))
    sam = optimize(sam.to(device).eval(), config)
    generator = FastAutomaticMaskGenerator(
        sam, points_per_side=args.points_per_side, points_per_batch=args.points_per_batch,
        pred_iou_thresh=args.pred_iou_thresh,
        stability_score_thresh=args.stability_score_thresh, box_nms_thresh=args.box_nms_thresh,
        crop_n_layers=args.crop_n_layers, min_mask_region_area=args.min_mask_region_area,
        output_mode="coco_rle",
    )
    out.mkdir(parents=True, exist_ok=True)
    for (path, image), stem in tqdm(list(zip(images, stems, strict=True)), desc="fastsam amg",
                                    unit="image"):
        annotations = generator.generate(image)  # COCO RLE counts as text (JSON-ready)
        (out / f"{stem}.json").write_text(json_module.dumps(
            {"image": str(path), "height": image.shape[0], "width": image.shape[1],
             "annotations": annotations}))
        Image.fromarray(overlay(image, annotations)).save(out / f"{stem}.png")
        renamed = "" if stem == path.stem else f" (written as {stem}.json / .png)"
        tqdm.write(f"{path}: {len(annotations)} masks{renamed}")
    print(f"wrote {len(images)} JSON and PNG file pairs to {out}")
    return 0


def _output_stems(paths: list) -> list[str]:
    """One output name per input image: its stem, with _2, _3, ... where stems repeat
    (a/scene.png and b/scene.png must not write over each other)."""
    stems: list[str] = []
    for path in paths:
        stem, k = path.stem, 1
        while stem in stems:
            k += 1
            stem = f"{path.stem}_{k}"
        stems.append(stem)
    return stems


def _checkpoint_file(parser: argparse.ArgumentParser, path: str) -> None:
    from pathlib import Path

    if not Path(path).is_file():
        why = "is a folder" if Path(path).is_dir() else "no such file"
        parser.error(f"--checkpoint {path}: {why}")


def _load(parser: argparse.ArgumentParser, args: argparse.Namespace, build):
    """The model `build()` makes from --checkpoint; a checkpoint it cannot load is a parser
    error naming it (not a traceback)."""
    import pickle

    try:
        return build()
    except torch.OutOfMemoryError:
        raise  # the device's, not the checkpoint's
    except (OSError, RuntimeError, KeyError, ValueError, EOFError,
            pickle.UnpicklingError) as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        reason = " ".join(lines[:2] if lines and lines[0].endswith(":") else lines[:1])
        if isinstance(err, KeyError):
            reason = f"no {err} entry"
        elif isinstance(err, pickle.UnpicklingError):  # torch's advice cannot be taken here
            _, _, detail = " ".join(lines).partition("Unpickler error:")
            reason = "not a state_dict torch.load reads" + (f" ({detail.strip()[:120]})"
                                                            if detail.strip() else "")
        parser.error(f"--checkpoint {args.checkpoint}: cannot load it as --model {args.model} "
                     f"({type(err).__name__}: {reason[:300]})")


def _tiny_sam(parser: argparse.ArgumentParser, kind: str = "sam"):
    try:
        from fastsam_core.models.tiny import tiny
    except ImportError:
        parser.error("the tiny models are not part of this installation: use --model vit_h "
                     "--checkpoint PATH")
    return tiny(kind)


def overlay(image, annotations):
    """The image with each mask blended in a random colour (largest first), H x W x 3 uint8."""
    import numpy as np
    from pycocotools import mask as mask_utils

    rng = np.random.default_rng(0)
    canvas = image.astype(np.float32)
    for ann in sorted(annotations, key=lambda a: a["area"], reverse=True):
        rle = dict(ann["segmentation"], counts=ann["segmentation"]["counts"].encode("ascii"))
        mask = mask_utils.decode(rle).astype(bool)
        canvas[mask] = 0.5 * canvas[mask] + 0.5 * rng.integers(0, 256, 3)
    return canvas.astype(np.uint8)


def _accuracy(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import json as json_module

    from fastsam_core.accuracy import as_dicts, configs_for, format_rows, run_accuracy
    from fastsam_core.benchmark import env_info
    from fastsam_core.models.sam.reference import build_sam
    from fastsam_core.models.tiny_data import make_scenes
    from fastsam_core.profiling import commit

    if args.scenes < 1:
        parser.error("--scenes must be at least 1")
    device = _device(parser, args.device)
    _writable_file(parser, "--out", args.out)
    if args.model in ("sam", "sam2"):
        model = _tiny_sam(parser, args.model)
        what = f"tiny trained {'SAM' if args.model == 'sam' else 'SAM 2'}"
    else:
        model = build_sam(args.model, 1024, seed=0)
        what = f"SAM {args.model} with random weights (seed 0)"
    model = model.to(device)
    size = model.image_size if args.model == "sam2" else model.image_encoder.img_size
    scenes = make_scenes(args.scenes, seed=args.seed, height=size, width=size * 5 // 4)
    configs = configs_for(device)
    rows = run_accuracy(model, scenes, configs,
                        log=lambda m: print(f"[fastsam] {m}", flush=True))
    print(f"{what} on {device.type}, {args.scenes} generated scenes (seed {args.seed}), a "
          f"point and a box per object, against the fp32 reference")
    print(format_rows(rows))
    if args.out:
        payload = {**env_info(device), "commit": commit(), "model": what,
                   "configs": {name: repr(config) for name, config in configs.items()},
                   "sqnr_note": "per-layer SQNR is taken with hooks on the int8 linears, so "
                                "int8 MLPs and the norm1s deferred to an int8 qkv run their "
                                "separate passes for it; mask IoU is "
                                "measured on the path each configuration takes",
                   "scenes": args.scenes,
                   "seed": args.seed, "rows": as_dicts(rows)}
        with open(args.out, "w") as f:
            json_module.dump(payload, f, indent=1)
        print(f"wrote {args.out}")
    return 0


def _summarize(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from pathlib import Path

    from fastsam_core.gate import summarize

    try:
        print(summarize(Path(args.result)))
    except (OSError, ValueError) as err:
        parser.error(f"{args.result}: {err.strerror}" if isinstance(err, OSError) and
                     err.strerror else str(err))
    return 0


def _gate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from pathlib import Path

    from fastsam_core.gate import run_gate

    if not args.abs_tolerance >= 0:  # also NaN
        parser.error(f"--abs-tolerance must be at least 0 (percent), got {args.abs_tolerance}")
    if not 0 <= args.ratio_tolerance <= 100:
        parser.error("--ratio-tolerance must be between 0 and 100 (percent), got "
                     f"{args.ratio_tolerance}")
    return run_gate(args.paths, Path(args.baselines), args.save, args.abs_tolerance,
                    args.ratio_tolerance / 100, args.extra)


def _writable_file(parser: argparse.ArgumentParser, option: str, path: str | None) -> None:
    """Fail before the run, not after it, where `path` cannot be written."""
    from pathlib import Path

    if path is None:
        return
    target = Path(path)
    if target.is_dir():
        parser.error(f"{option} {path}: is a folder, not a file")
    if not target.parent.is_dir():
        parser.error(f"{option} {path}: the folder {target.parent} does not exist")


def _device(parser: argparse.ArgumentParser, value: str | None) -> torch.device:
    """--device (default: cuda when available), checked (errors via parser)."""
    from fastsam_core.benchmark import default_device

    try:
        device = torch.device(value) if value else default_device()
    except RuntimeError as err:
        parser.error(f"--device {value}: {err}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    return device


def _setup(args: argparse.Namespace, parser: argparse.ArgumentParser):
    """Device, FastConfig and image size from the shared options (errors via parser)."""
    device = _device(parser, args.device)
    try:
        config = FastConfig(dtype=args.dtype, attention=args.attention, compile=args.compile)
    except (TypeError, ValueError) as err:
        parser.error(f"--dtype: {err}")  # attention and compile are argparse choices
    for name in ("batch", "runs", "active"):
        if getattr(args, name, 1) < 1:
            parser.error(f"--{name} must be at least 1")
    if getattr(args, "warmup", 0) < 0:
        parser.error("--warmup must be at least 0")
    if args.image_size is not None and args.image_size < 16:
        parser.error("--image-size must be at least 16")
    image_size = args.image_size
    if getattr(args, "model", None) == "tiny":
        if image_size is not None:
            parser.error("--image-size: the tiny trained SAM runs only at the size it was "
                         "trained at; leave --image-size out with --model tiny")
    elif image_size is None:
        image_size = 1024 if device.type == "cuda" else CPU_DEFAULT_IMAGE_SIZE
        if device.type != "cuda":
            print(f"[fastsam] CPU default: {image_size} px so the run takes about a minute; "
                  "--image-size 1024 for SAM's real size")
    return device, config, image_size


def _bench(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from fastsam_core.benchmark import bench_image_encoder

    device, config, image_size = _setup(args, parser)
    dtype = config.resolve_dtype(device, torch.float32)
    _writable_file(parser, "--json", args.json)

    result = bench_image_encoder(
        variant=args.model, image_size=image_size, batch=args.batch, dtype=dtype,
        device=device, config=config, warmup=args.warmup, runs=args.runs, seed=args.seed,
        log=lambda msg: print(f"[fastsam] {msg}", flush=True),
    )
    r = result
    weights = "tiny trained weights" if r.variant == "tiny" else "random weights"
    print(f"\nSAM {r.variant} image encoder, {weights}, {r.image_size} px, batch {r.batch}, "
          f"{r.dtype}, {r.device}, torch {r.torch}")
    print(f"FLOPs per image: {r.gflop_per_image:.1f} G (torch.utils.flop_counter)")
    print(f"{'':<10} {'ms/batch':>10} {'img/s':>9} {'TFLOP/s':>9}  rel. L2 error vs fp32 reference")
    print(f"{'reference':<10} {r.reference_ms:>10.1f} {r.reference_img_s:>9.2f} "
          f"{r.reference_tflop_s:>9.3f}  {r.reference_error:.1e}")
    print(f"{'fast':<10} {r.fast_ms:>10.1f} {r.fast_img_s:>9.2f} "
          f"{r.fast_tflop_s:>9.3f}  {r.fast_error:.1e}")
    print(f"speedup: {r.speedup:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result.as_dict(), f, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

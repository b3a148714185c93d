"""`fastsam` command line (also `python -m fastsam_core`)."""

from __future__ import annotations

import argparse
import json
import sys

import torch

from fastsam_core.config import ATTENTION_BACKENDS, COMPILE_MODES, FastConfig

CPU_DEFAULT_IMAGE_SIZE = 512  # vit_b at 512 px: reference + fast in about a minute on 2 cores


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
    bench.add_argument("--model", default="vit_b", choices=["vit_b", "vit_l", "vit_h"])
    bench.add_argument("--image-size", type=int, default=None, help="pixels (16 px patches)")
    bench.add_argument("--batch", type=int, default=1)
    bench.add_argument("--dtype", default=None, help="float32, bfloat16 or float16")
    bench.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ...")
    bench.add_argument("--attention", default="auto", choices=ATTENTION_BACKENDS)
    bench.add_argument("--compile", default=None, choices=COMPILE_MODES)
    bench.add_argument("--warmup", type=int, default=1)
    bench.add_argument("--runs", type=int, default=3)
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--json", default=None, help="also write the result to this file")
    args = parser.parse_args(argv)
    return _bench(args, parser)


def _bench(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from fastsam_core.benchmark import bench_image_encoder, default_device

    try:
        device = torch.device(args.device) if args.device else default_device()
        config = FastConfig(dtype=args.dtype, attention=args.attention, compile=args.compile)
    except (RuntimeError, TypeError, ValueError) as err:
        parser.error(str(err))
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    for name in ("batch", "runs"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if args.image_size is not None and args.image_size < 16:
        parser.error("--image-size must be at least 16")
    dtype = config.resolve_dtype(device, torch.float32)
    image_size = args.image_size
    if image_size is None:
        image_size = 1024 if device.type == "cuda" else CPU_DEFAULT_IMAGE_SIZE
        if device.type != "cuda":
            print(f"[fastsam] CPU default: {image_size} px so the run takes about a minute; "
                  "--image-size 1024 for SAM's real size")

    result = bench_image_encoder(
        variant=args.model, image_size=image_size, batch=args.batch, dtype=dtype,
        device=device, config=config, warmup=args.warmup, runs=args.runs, seed=args.seed,
        log=lambda msg: print(f"[fastsam] {msg}", flush=True),
    )
    r = result
    print(f"\nSAM {r.variant} image encoder, random weights, {r.image_size} px, batch {r.batch}, "
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

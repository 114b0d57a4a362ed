"""Encoder throughput of full-size CLIP ViT-B/16 (random weights).

Measures images/s of ``encode_image`` at the training resolution and
captions/s of ``encode_text`` at 77 tokens, in eval mode without gradients.

    python -m benchmarks.bench_clip                       # CPU, fp32
    python -m benchmarks.bench_clip --device cuda --amp bf16
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from model.clip_model import build_clip
from utils.tokenizer import tokenize

CAPTION = ("A young woman with long black hair is wearing a white short-sleeved shirt, "
           "blue jeans and white sneakers, and carries a black backpack on her shoulder.")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--image-size", type=int, nargs=2, default=(384, 128), metavar=("H", "W"))
    parser.add_argument("--stride", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=2, help="untimed iterations per encoder")
    parser.add_argument("--iters", type=int, default=5, help="timed iterations per encoder")
    parser.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none",
                        help="autocast dtype (weights stay fp32)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    return parser.parse_args(argv)


def time_encoder(fn, inputs: torch.Tensor, warmup: int, iters: int, device: torch.device) -> float:
    """Seconds per call of ``fn(inputs)``, averaged over ``iters`` calls."""
    for _ in range(warmup):
        fn(inputs)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn(inputs)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / iters


def main(argv=None) -> dict[str, float]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build_clip("none", image_size=tuple(args.image_size), stride=args.stride).to(device).eval()
    images = torch.randn(args.batch_size, 3, *args.image_size, device=device)
    caption_ids = tokenize([CAPTION] * args.batch_size).to(device)
    amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]

    def run(encode):
        def call(x):
            with torch.no_grad(), torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                return encode(x)
        return call

    image_s = time_encoder(run(model.encode_image), images, args.warmup, args.iters, device)
    text_s = time_encoder(run(model.encode_text), caption_ids, args.warmup, args.iters, device)
    result = {"images_per_s": args.batch_size / image_s, "captions_per_s": args.batch_size / text_s}

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    print(f"CLIP ViT-B/16, {args.image_size[0]}x{args.image_size[1]} images (grid {model.visual.grid_size}), "
          f"77-token captions, batch {args.batch_size}, {'fp32' if amp_dtype is None else args.amp + ' autocast'}, "
          f"{device} ({where}), torch {torch.__version__}")
    print(f"encode_image: {result['images_per_s']:8.1f} images/s   ({image_s * 1000:.0f} ms/batch)")
    print(f"encode_text:  {result['captions_per_s']:8.1f} captions/s ({text_s * 1000:.0f} ms/batch)")
    return result


if __name__ == "__main__":
    main()

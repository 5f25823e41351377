"""The PyTorch side of `bench/sample_bench.sh`: needle's `sample` op (deterministic DDIM with
classifier-free guidance, `needle_models::diffusion::ddim`) in plain PyTorch, on the very model a
needle `pretrain` wrote (loaded strictly into `train_bench.Model`), so that the two sampling
speeds can be compared on the same machine, in one run.

What is timed is what needle's op times: for each batch, the initial noise to the device, the
caption encoding, `steps` network evaluations on the conditional and unconditional halves
together, and the images back to the host as bytes. The initial noise is torch's here (needle
draws it in Rust per image); its values do not change the work.

    python bench/sample_bench.py --model DIR [--prompts 16] [--seeds 15] [--steps 25]
                                 [--batch 256] [--threads 2] [--device cuda] [--precision bf16]

Prints one JSON line: images, steps, seconds, images_per_second.
"""

import argparse
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_bench import alpha_bar, load_needle_model  # noqa: E402

COLOURS = ["red", "green", "blue", "yellow"]
SHAPES = ["circle", "square", "triangle", "star"]


def tokenize(vocabulary, captions):
    """needle's `Vocabulary::tokenize`: start token 2, word i as i + 3, unknown 1, padding 0."""
    ids = {w: i + 3 for i, w in enumerate(vocabulary["words"])}
    length = max(vocabulary["max_tokens"], 1)
    rows = []
    for caption in captions:
        words = "".join(c if c.isalnum() else " " for c in caption.lower()).split()
        row = ([2] + [ids.get(w, 1) for w in words])[:length]
        rows.append(row + [0] * (length - len(row)))
    return torch.tensor(rows, dtype=torch.int64)


@torch.no_grad()
def ddim(model, tokens, noise, steps, guidance, precision):
    n = noise.shape[0]
    dev = noise.device
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        cond = model.captions(tokens)
        uncond = model.null_caption[None].expand(n, -1)
        both = torch.cat([cond, uncond], 0)
        x = noise
        for i in range(steps):
            t = 1.0 - i / steps
            t_next = 1.0 - (i + 1) / steps
            tt = torch.full((2 * n,), t, device=dev)
            v = model.predict(torch.cat([x, x], 0), tt, both).float()
            v_c, v_u = v[:n], v[n:]
            v = v_u + (v_c - v_u) * guidance
            ab = alpha_bar(torch.tensor(t, dtype=torch.float64)).item()
            ab_next = alpha_bar(torch.tensor(t_next, dtype=torch.float64)).item()
            x0 = (x * math.sqrt(ab) - v * math.sqrt(1.0 - ab)).clamp(-1.0, 1.0)
            eps = (x - x0 * math.sqrt(ab)) / max(math.sqrt(1.0 - ab), 1e-8)
            x = x0 * math.sqrt(ab_next) + eps * math.sqrt(1.0 - ab_next)
    return x.clamp(-1.0, 1.0)


def to_rgb_bytes(images):
    """needle's `to_rgb_bytes`: [-1, 1] to bytes on the host, image by image, rows top to bottom
    (kept as a contiguous uint8 tensor: copying it into a Python bytes object is not work needle
    does)."""
    b = ((images.cpu() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return b.permute(0, 2, 3, 1).contiguous()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="a needle `pretrain` output (exported)")
    ap.add_argument("--prompts", type=int, default=16, help="the first N of colour x shape")
    ap.add_argument("--seeds", type=int, default=15)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--cudnn-benchmark", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.backends.cudnn.benchmark = a.cudnn_benchmark
    dev = torch.device(a.device)
    model, config = load_needle_model(a.model)
    model = model.to(dev).eval()
    size = config["size"]
    prompts = [f"a {c} {s}" for s in SHAPES for c in COLOURS][: a.prompts]
    jobs = [(p, s) for p in prompts for s in range(a.seeds)]

    start = time.perf_counter()
    out = []
    for i in range(0, len(jobs), a.batch):
        chunk = jobs[i:i + a.batch]
        noise = torch.randn(len(chunk), 3, size, size).to(dev)
        tokens = tokenize(config["vocabulary"], [p for p, _ in chunk]).to(dev)
        images = ddim(model, tokens, noise, a.steps, a.guidance, a.precision)
        out.append(to_rgb_bytes(images))
    seconds = time.perf_counter() - start
    print(json.dumps({
        "impl": "pytorch",
        "torch": torch.__version__,
        "device": a.device,
        "precision": a.precision,
        "images": len(jobs),
        "steps": a.steps,
        "batch": a.batch,
        "seconds": round(seconds, 3),
        "images_per_second": round(len(jobs) / seconds, 2),
    }))


if __name__ == "__main__":
    main()

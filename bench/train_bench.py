"""The PyTorch side of `bench/train_bench.sh`: the `pretrain` op's model and training step in
plain PyTorch, so that the two throughputs can be compared on the same machine, in one run.

The network mirrors `needle_models` parameter for parameter (`unet.rs`, `text.rs`,
`diffusion.rs`): a U-Net of residual blocks (GroupNorm, SiLU, 3x3 convolutions, the
conditioning added per channel, zero-initialised second convolution), strided convolutions
down, nearest upsampling up; a one-layer caption transformer pooled over its tokens; time
features through an MLP; v-prediction on the cosine schedule; caption dropout; AdamW; EMA.
The batch is drawn from a tensor of images in memory, as the Rust op does: what is timed is
the training step.

    python bench/train_bench.py --steps 200 --batch 64 --threads 2 [--device cuda] [--precision bf16]
    python bench/train_bench.py --load DIR     loads a needle model output into this module,
                                               strictly: the same names and shapes

Prints one JSON line: steps, batch, seconds, images_per_second, parameters, final loss.
"""

import argparse
import json
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


def groups(ch):
    return next(g for g in (8, 4, 2, 1) if ch % g == 0)


class ResBlock(nn.Module):
    def __init__(self, cin, cout, cond):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups(cin), cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.cond = nn.Linear(cond, cout)
        self.norm2 = nn.GroupNorm(groups(cout), cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x, c):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.cond(c)[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.skip is None else self.skip(x)) + h


class UNet(nn.Module):
    def __init__(self, channels, mult, blocks):
        super().__init__()
        cond = 4 * channels
        widths = [m * channels for m in mult]
        self.input = nn.Conv2d(3, channels, 3, padding=1)
        self.down = nn.ModuleList()
        skips, width = [channels], channels
        for level, w in enumerate(widths):
            blocks_ = nn.ModuleList()
            for _ in range(blocks):
                blocks_.append(ResBlock(width, w, cond))
                width = w
                skips.append(width)
            down = None
            if level + 1 < len(widths):
                down = nn.Conv2d(width, width, 3, stride=2, padding=1)
                skips.append(width)
            self.down.append(nn.ModuleDict({"block": blocks_, **({"downsample": down} if down else {})}))
        self.middle = nn.ModuleList([ResBlock(width, width, cond), ResBlock(width, width, cond)])
        ups = [None] * len(widths)  # indexed by level, as needle names them; run last to first
        for level, w in reversed(list(enumerate(widths))):
            blocks_ = nn.ModuleList()
            for _ in range(blocks + 1):
                blocks_.append(ResBlock(width + skips.pop(), w, cond))
                width = w
            up = nn.Conv2d(width, width, 3, padding=1) if level > 0 else None
            ups[level] = nn.ModuleDict({"block": blocks_, **({"upsample": up} if up else {})})
        self.up = nn.ModuleList(ups)
        self.out_norm = nn.GroupNorm(groups(width), width)
        self.output = nn.Conv2d(width, 3, 3, padding=1)
        nn.init.zeros_(self.output.weight)

    def forward(self, x, c):
        c = F.silu(c)
        h = self.input(x)
        skips = [h]
        for level in self.down:
            for block in level["block"]:
                h = block(h, c)
                skips.append(h)
            if "downsample" in level:
                h = level["downsample"](h)
                skips.append(h)
        for block in self.middle:
            h = block(h, c)
        for level in reversed(self.up):
            for block in level["block"]:
                h = block(torch.cat([h, skips.pop()], 1), c)
            if "upsample" in level:
                h = level["upsample"](F.interpolate(h, scale_factor=2, mode="nearest"))
        return self.output(F.silu(self.out_norm(h)))


class TextEncoder(nn.Module):
    def __init__(self, vocab, max_tokens, width, out):
        super().__init__()
        self.heads = 4 if width % 4 == 0 else 1
        self.tokens = nn.Embedding(vocab, width)
        self.positions = nn.Parameter(torch.randn(max_tokens, width) * 0.02)
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.attn_out = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.mlp1 = nn.Linear(width, 4 * width)
        self.mlp2 = nn.Linear(4 * width, width)
        self.project = nn.Linear(width, out)

    def forward(self, tokens):
        n, length = tokens.shape
        keep = tokens != 0
        x = self.tokens(tokens) + self.positions[:length]
        head = x.shape[-1] // self.heads
        qkv = self.qkv(self.norm1(x)).view(n, length, 3, self.heads, head).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        scores = q @ k.transpose(-2, -1) / math.sqrt(head)
        scores = scores.masked_fill(~keep.view(n, 1, 1, length), float("-inf"))
        att = (scores.softmax(-1) @ v).transpose(1, 2).reshape(n, length, -1)
        x = x + self.attn_out(att)
        x = x + self.mlp2(F.gelu(self.mlp1(self.norm2(x))))
        w = keep.float().unsqueeze(-1)
        return self.project((x * w).sum(1) / w.sum(1))


class Model(nn.Module):
    def __init__(self, channels, mult, blocks, text_width, vocab, max_tokens):
        super().__init__()
        cond = 4 * channels
        self.channels = channels
        self.unet = UNet(channels, mult, blocks)
        self.text = TextEncoder(vocab, max_tokens, text_width, cond)
        self.null_caption = nn.Parameter(torch.zeros(cond))
        self.time1 = nn.Linear(channels, cond)
        self.time2 = nn.Linear(cond, cond)

    def captions(self, tokens, drop=None):
        """Caption vectors; rows where `drop` is true get the "no caption" vector."""
        cap = self.text(tokens)
        return cap if drop is None else torch.where(drop[:, None], self.null_caption[None], cap)

    def predict(self, x, t, cap):
        """The v prediction for noisy images `x` at times `t` given caption vectors."""
        half = self.channels // 2
        freqs = torch.exp(torch.arange(half, device=t.device) * (-math.log(10000.0) / half))
        args = (t * 1000.0)[:, None] * freqs[None]
        cond = self.time2(F.silu(self.time1(torch.cat([args.sin(), args.cos()], -1)))) + cap
        return self.unet(x, cond)

    def forward(self, x, t, tokens, drop):
        return self.predict(x, t, self.captions(tokens, drop))


def load_safetensors(path):
    """A safetensors file as {name: tensor}, read by hand (no extra package needed)."""
    dtypes = {"F32": torch.float32, "F64": torch.float64, "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16}
    with open(path, "rb") as f:
        data = f.read()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    body = data[8 + n:]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        lo, hi = info["data_offsets"]
        t = torch.frombuffer(bytearray(body[lo:hi]), dtype=dtypes[info["dtype"]])
        out[name] = t.reshape(info["shape"])
    return out


def load_needle_model(directory):
    """The model a needle `pretrain` / `quality-tune` output holds, as this PyTorch module."""
    config = json.load(open(f"{directory}/config.json"))
    u = config["unet"]
    v = config["vocabulary"]
    model = Model(u["channels"], u["mult"], u["blocks"], config["text_width"], len(v["words"]) + 3, v["max_tokens"])
    model.load_state_dict(load_safetensors(f"{directory}/model.safetensors"), strict=True)
    return model, config


def alpha_bar(t, s=0.008):
    f = torch.cos((t.clamp(0, 1) + s) / (1 + s) * math.pi / 2) ** 2
    return (f / math.cos(s / (1 + s) * math.pi / 2) ** 2).clamp(0, 1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=20, help="untimed steps first")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--channels", type=int, default=32)
    ap.add_argument("--mult", default="1,2,2")
    ap.add_argument("--blocks", type=int, default=1)
    ap.add_argument("--text-width", type=int, default=64)
    ap.add_argument("--size", type=int, default=16)
    ap.add_argument("--images", type=int, default=20000)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                    help="bf16: the forward and backward under torch.autocast(bfloat16), as needle's `precision = \"bf16\"`")
    ap.add_argument("--cudnn-benchmark", action="store_true", help="torch.backends.cudnn.benchmark = True, as needle sets it on a GPU")
    ap.add_argument("--load", metavar="DIR", help="only load a needle model output strictly into this module and say so")
    a = ap.parse_args()
    if a.load:
        model, config = load_needle_model(a.load)
        n = sum(p.numel() for p in model.parameters())
        print(json.dumps({"loaded": a.load, "parameters": n, "arch": config["arch"], "size": config["size"]}))
        return
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    dev = torch.device(a.device)
    # needle lets cuDNN pick its convolution algorithms by timing them; so may PyTorch.
    torch.backends.cudnn.benchmark = a.cudnn_benchmark

    vocab, max_tokens = 3 + 9, 8  # the haystack's words: "a", 4 colours, 4 shapes
    model = Model(a.channels, [int(m) for m in a.mult.split(",")], a.blocks, a.text_width, vocab, max_tokens).to(dev)
    ema = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    images = torch.rand(a.images, 3, a.size, a.size, device=dev) * 2 - 1
    tokens = torch.randint(3, vocab, (a.images, max_tokens), device=dev)
    tokens[:, 0] = 2
    tokens[:, 4:] = 0

    def step():
        idx = torch.randint(a.images, (a.batch,), device=dev)
        x0 = images[idx]
        mirror = torch.rand(a.batch, 1, 1, 1, device=dev) < 0.5
        x0 = torch.where(mirror, x0.flip(3), x0)
        drop = torch.rand(a.batch, device=dev) < 0.1
        t = torch.rand(a.batch, device=dev)
        noise = torch.randn_like(x0)
        ab = alpha_bar(t).view(-1, 1, 1, 1)
        xt = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
        target = ab.sqrt() * noise - (1 - ab).sqrt() * x0
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=a.precision == "bf16"):
            pred = model(xt, t, tokens[idx], drop)
        loss = F.mse_loss(pred.float(), target)
        opt.zero_grad(set_to_none=False)
        loss.backward()
        opt.step()
        with torch.no_grad():
            for e, p in zip(ema, model.parameters()):
                e.lerp_(p, 0.001)
        return loss

    for _ in range(a.warmup):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(a.steps):
        loss = step()
    final = loss.item()
    if dev.type == "cuda":
        torch.cuda.synchronize()  # the last step's optimizer and EMA too
    seconds = time.perf_counter() - start
    print(json.dumps({
        "impl": "pytorch",
        "torch": torch.__version__,
        "device": a.device,
        "threads": a.threads,
        "steps": a.steps,
        "batch": a.batch,
        "seconds": round(seconds, 3),
        "images_per_second": round(a.steps * a.batch / seconds, 1),
        "parameters": sum(p.numel() for p in model.parameters()),
        "final_loss": round(final, 4),
    }))


if __name__ == "__main__":
    main()

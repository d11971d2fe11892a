"""sftjax's train step vs Hugging Face `LlamaForCausalLM` + torch.compile, in one run.

Both sides train the same model (sftjax's init, exported with hf_export and loaded by transformers),
on the same packed token stream, with the same loss: token-weighted masked cross-entropy, and
examples packed into a row kept apart (HF gets a [B, 1, L, L] causal same-segment mask and
positions restarting per example; sftjax its segment ids). Both take AdamW (b2 0.95) steps
after global-norm clipping to 1.0. The first-step losses, computed from identical weights and
batches before any update, must agree: that checks the two sides compute the same thing.

Run (from the repo root):
  python benchmarks/vs_hf.py --preset tiny --seq_len 128 --batch_size 4 --dtype float32
  python benchmarks/vs_hf.py      # GPU: the ~1.1B Llama-2 shape, seq 2048, batch 8, bf16

Prints one JSON line per side on stdout ({"name": "sftjax" | "hf", "tokens_per_s", ...}), then
one with both and "ratio" = sftjax tokens/s ÷ HF tokens/s. Timing: the median of --steps
steps after --warmup_steps, each ended by a device sync; compile time is reported apart.
"""

import argparse
import dataclasses
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time

# Both frameworks share one accelerator: JAX must not take 75 % of its memory up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import train_throughput  # noqa: E402

from sftjax import metrics, sharding  # noqa: E402
from sftjax.model import hf_export, llama  # noqa: E402

log = train_throughput.log


def hf_batch(batch: dict, device: str) -> dict:
    """numpy batch -> torch tensors, with the packed-row mask HF's attention takes as given."""
    seg = torch.as_tensor(batch["segment_ids"], device=device)
    length = seg.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
    # True = may attend; padding (segment 0) attends to padding, so no row is empty.
    mask = (seg[:, :, None] == seg[:, None, :]) & causal
    as_long = {k: torch.as_tensor(batch[k], device=device).long() for k in batch}
    return {**as_long, "attention_mask": mask[:, None]}


def hf_loss(model, batch: dict) -> torch.Tensor:
    """Σ CE·mask / Σ mask in fp32, as sftjax's loss_sums divided once."""
    logits = model(
        input_ids=batch["tokens"],
        attention_mask=batch["attention_mask"],
        position_ids=batch["positions"],
    ).logits
    ce = torch.nn.functional.cross_entropy(
        logits.float().flatten(0, 1), batch["targets"].flatten(), reduction="none"
    )
    mask = batch["loss_mask"].flatten().float()
    return (ce * mask).sum() / mask.sum().clamp(min=1.0)


def measure_hf(args, export_dir: pathlib.Path, host_batches: list[dict]) -> dict:
    """HF model from sftjax's exported weights; AdamW steps, torch.compile'd forward+loss."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = transformers.LlamaForCausalLM.from_pretrained(
        export_dir, dtype=torch.float32, attn_implementation="sdpa"
    ).to(device)
    model.train()
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=args.lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0
    )
    loss_fn = torch.compile(hf_loss) if args.torch_compile else hf_loss
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")
    batches = [hf_batch(b, device) for b in host_batches]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def step(batch) -> float:
        with autocast:
            loss = loss_fn(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    t0 = time.perf_counter()
    losses = [step(batches[0])]  # the first call compiles
    sync()
    compile_s = time.perf_counter() - t0
    for i in range(1, args.warmup_steps):
        losses.append(step(batches[i % len(batches)]))
    sync()
    times = []
    for i in range(args.steps):
        t0 = time.perf_counter()
        losses.append(step(batches[(max(args.warmup_steps, 1) + i) % len(batches)]))
        sync()
        times.append(time.perf_counter() - t0)
    return dict(times=times, losses=[float(x) for x in losses], compile_s=compile_s, mem={})


def row(name: str, args, cfg, result: dict, peak) -> dict:
    step_s = statistics.median(result["times"])
    tokens_per_s = args.batch_size * args.seq_len / step_s
    util = metrics.mfu(tokens_per_s, metrics.flops_per_token(cfg, args.seq_len), peak)
    return {
        "name": name,
        "step_ms": round(step_s * 1e3, 2),
        "tokens_per_s": round(tokens_per_s, 1),
        "mfu": None if util != util else round(util, 4),
        "compile_s": round(result["compile_s"], 1),
        "loss_first": round(result["losses"][0], 5),
        "loss_last": round(result["losses"][-1], 5),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default=None, help=f"one of {sorted(llama.PRESETS)}")
    for key, value in train_throughput.CUSTOM.items():
        parser.add_argument(f"--{key}", type=int, default=value, help="custom model (no preset)")
    parser.add_argument("--seq_len", type=int, default=2048)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup_steps", type=int, default=3)
    parser.add_argument("--attention", default="auto", help="sftjax: auto, xla, cudnn, splash")
    parser.add_argument("--remat", default="save_dots")
    parser.add_argument("--dtype", default="bfloat16", help="compute dtype of both sides")
    parser.add_argument("--param_dtype", default="float32")
    parser.add_argument("--scan_layers", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--torch_compile", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--min_len", type=int, default=64)
    parser.add_argument("--max_len", type=int, default=768)
    parser.add_argument("--num_batches", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--peak_tflops", type=float, default=0.0)
    parser.add_argument(
        "--init_std", type=float, default=0.02, help="weights' init scale; larger makes the "
        "first losses depend on which tokens attend to which (0.02 leaves them near ln V)"
    )  # fmt: skip
    args = parser.parse_args()

    cfg = train_throughput.model_config(args, args.attention, args.remat)
    cfg = dataclasses.replace(cfg, init_std=args.init_std)
    mesh = sharding.make_mesh()
    rng = np.random.default_rng(args.seed)
    host_batches = [
        train_throughput.packed_batch(
            rng,
            batch=args.batch_size,
            seq_len=args.seq_len,
            vocab=cfg.vocab_size,
            min_len=args.min_len,
            max_len=args.max_len,
        )
        for _ in range(args.num_batches)
    ]
    peak = metrics.peak_flops_per_device(args.peak_tflops)
    log(f"{cfg.num_params / 1e6:.1f}M params, {args.batch_size}x{args.seq_len}, {args.dtype}")

    with tempfile.TemporaryDirectory() as tmp:
        # The same init both sides start from: sftjax's, written as an HF checkpoint.
        hf_export.save_pretrained(llama.create(cfg, mesh, seed=args.seed), pathlib.Path(tmp) / "hf")
        log("sftjax: compiling and timing ...")
        ours = train_throughput.measure(args, cfg, mesh, host_batches)
        jax.clear_caches()
        log("hf: compiling and timing ...")
        theirs = measure_hf(args, pathlib.Path(tmp) / "hf", host_batches)

    a, b = row("sftjax", args, cfg, ours, peak), row("hf", args, cfg, theirs, peak)
    for r in (a, b):
        print(json.dumps(r), flush=True)
    summary = {
        "name": "sftjax_vs_hf",
        "device": jax.devices()[0].device_kind,
        "torch_compile": args.torch_compile,
        "shape": f"{cfg.num_params / 1e9:.3f}B params, {args.batch_size}x{args.seq_len}",
        "ratio": round(a["tokens_per_s"] / b["tokens_per_s"], 3),
        "loss_first_diff": abs(a["loss_first"] - b["loss_first"]),
    }
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()

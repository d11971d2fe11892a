"""Train-step throughput of the real sftjax step on synthetic packed batches.

The step is the one `fit()` runs: `train.jit_steps` (sharded jit over a data x fsdp x tensor
mesh, donated state), AdamW with global-norm clipping, the model's remat policy and scanned
layers. Batches are numpy rows of `seq_len` holding several random examples (lengths
64..768, packed first-fit), `segment_ids`/`positions` restarting per example, `loss_mask` 1 on
the second half of each example. Every configuration starts from the same init seed and sees
the same batches, so their losses are comparable too.

Run (from the repo root):
  python benchmarks/train_throughput.py --preset tiny --seq_len 128 --batch_size 8 --steps 3
  python benchmarks/train_throughput.py            # ~1.1B Llama-2-shaped model, xla vs cudnn
  python benchmarks/train_throughput.py --preset llama2_7b --batch_size 1 --attention cudnn

Prints one JSON line per configuration (attention x remat) on stdout, progress on stderr:
{"name", "device", "attention", "remat", "seq_len", "batch", "params", "step_ms",
 "tokens_per_s", "real_tokens_per_s", "mfu", "ratio_vs_baseline", ...}
step_ms is the median over `--steps` timed steps (each ended with jax.block_until_ready) after
`--warmup_steps` untimed ones; compile time is reported separately. The baseline is the first
configuration measured successfully in the same run; ratio = tokens_per_s / baseline's.
A configuration that fails (out of memory, cuDNN missing) prints {"name", ..., "error"} and the
run goes on. Imports only jax/flax/optax/numpy and sftjax's model, sharding, train, metrics.
"""

import argparse
import gc
import itertools
import json
import math
import pathlib
import statistics
import sys
import time
import types

import jax
import numpy as np
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from sftjax import metrics, sharding, train  # noqa: E402
from sftjax.model import llama  # noqa: E402

# ~1.1B Llama-2-shaped model (TinyLlama-like depth, GQA 16/4) when no --preset is given.
CUSTOM = dict(
    embed_dim=2048, num_layers=22, num_heads=16, num_kv_heads=4, mlp_dim=5504, vocab_size=32000
)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def packed_batch(rng, *, batch: int, seq_len: int, vocab: int, min_len: int, max_len: int):
    """One host batch of rows packed first-fit with random examples; zeros are padding."""
    # Short rows (smoke tests) still get several examples each: at most half a row per example.
    max_len = max(1, min(max_len, seq_len // 2))
    min_len = max(1, min(min_len, max_len // 2))
    rows: list[list[int]] = [[] for _ in range(batch)]
    free = [seq_len] * batch
    misses = 0
    while misses < 16 and max(free) >= min_len:
        n = int(rng.integers(min_len, max_len + 1))
        for r in range(batch):
            if free[r] >= n:
                rows[r].append(n)
                free[r] -= n
                break
        else:
            misses += 1
    out = {
        k: np.zeros((batch, seq_len), np.int32)
        for k in ("tokens", "targets", "loss_mask", "segment_ids", "positions")
    }
    for r, lengths in enumerate(rows):
        start = 0
        for seg, n in enumerate(lengths, start=1):
            ids = rng.integers(3, vocab, size=n + 1, dtype=np.int32)
            span = slice(start, start + n)
            out["tokens"][r, span] = ids[:-1]
            out["targets"][r, span] = ids[1:]
            out["loss_mask"][r, span] = np.arange(n) >= n // 2
            out["segment_ids"][r, span] = seg
            out["positions"][r, span] = np.arange(n)
            start += n
    return out


def model_config(args, attention: str, remat: str) -> llama.LlamaConfig:
    common = dict(
        dtype=args.dtype,
        param_dtype=args.param_dtype,
        remat=remat,
        attention=attention,
        scan_layers=args.scan_layers,
    )
    if args.preset:
        base = llama.PRESETS[args.preset] if args.preset in llama.PRESETS else {}
        max_seq = max(base.get("max_seq_len", 0), args.seq_len)
        return llama.preset(args.preset, max_seq_len=max_seq, **common)
    dims = {k: getattr(args, k) for k in CUSTOM}
    return llama.LlamaConfig(**dims, max_seq_len=args.seq_len, **common)


def optim_namespace(lr: float) -> types.SimpleNamespace:
    """What `train.make_optimizer` reads (configs/base.py defaults, no warmup)."""
    return types.SimpleNamespace(
        lr=lr,
        warmup_ratio=0.0,
        end_lr_ratio=0.0,
        weight_decay=0.0,
        decay_norms_and_embeddings=False,
        b1=0.9,
        b2=0.95,
        eps=1e-8,
        grad_clip_norm=1.0,
    )


def _error_kind(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    if "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text:
        return "OOM"
    return text.splitlines()[0][:400] if text else type(exc).__name__


def measure(args, cfg: llama.LlamaConfig, mesh, host_batches: list[dict]) -> dict:
    """Build the train state, compile the step, warm up, time `args.steps` steps."""
    total_steps = args.warmup_steps + args.steps
    tx, schedule = train.make_optimizer(optim_namespace(args.lr), total_steps)
    t0 = time.perf_counter()
    graphdef, params = nnx.split(llama.create(cfg, mesh, seed=args.seed))
    params = nnx.to_pure_dict(params)
    param_shardings = jax.tree.map(lambda x: x.sharding, params)
    shardings = train.state_shardings_for(param_shardings, params, tx)
    state = train.init_state(params, tx, shardings, args.seed)
    del params
    batch_sharding = sharding.batch_sharding(mesh)
    batches = [train.global_batch(b, batch_sharding) for b in host_batches]
    jax.block_until_ready((state, batches))
    init_s = time.perf_counter() - t0

    step_fn, _ = train.jit_steps(graphdef, tx, schedule, 1, shardings, batch_sharding)
    t0 = time.perf_counter()
    compiled = step_fn.lower(state, batches[0], {}).compile()
    compile_s = time.perf_counter() - t0
    mem = {}
    try:
        analysis = compiled.memory_analysis()
        if analysis is not None:
            mem = {
                "hbm_args_gib": round(analysis.argument_size_in_bytes / 2**30, 2),
                "hbm_temp_gib": round(analysis.temp_size_in_bytes / 2**30, 2),
            }
    except Exception as exc:  # not every backend reports it
        log(f"  memory_analysis unavailable: {_error_kind(exc)}")

    losses = []
    for i in range(args.warmup_steps):
        state, step_metrics = compiled(state, batches[i % len(batches)], {})
        losses.append(step_metrics["loss"])
    jax.block_until_ready(state)
    times = []
    for i in range(args.steps):
        batch = batches[(args.warmup_steps + i) % len(batches)]
        t0 = time.perf_counter()
        state, step_metrics = compiled(state, batch, {})
        jax.block_until_ready((state, step_metrics))
        times.append(time.perf_counter() - t0)
        losses.append(step_metrics["loss"])
    losses = [float(x) for x in jax.device_get(losses)]
    del state, batches, compiled
    return dict(times=times, losses=losses, init_s=init_s, compile_s=compile_s, mem=mem)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default=None, help=f"one of {sorted(llama.PRESETS)}")
    for key, value in CUSTOM.items():
        parser.add_argument(f"--{key}", type=int, default=value, help="custom model (no preset)")
    parser.add_argument("--seq_len", type=int, default=2048)
    parser.add_argument("--batch_size", type=int, default=8, help="global rows per step")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup_steps", type=int, default=3, help="untimed steps after compile")
    parser.add_argument(
        "--attention",
        default=None,
        help="comma list, e.g. xla,cudnn (default: xla,cudnn on GPU, xla elsewhere)",
    )
    parser.add_argument("--remat", default="save_dots", help="comma list of none,full,save_dots")
    parser.add_argument("--dtype", default="bfloat16", help="compute dtype")
    parser.add_argument("--param_dtype", default="float32", help="master weights / Adam moments")
    parser.add_argument("--scan_layers", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--min_len", type=int, default=64, help="shortest synthetic example")
    parser.add_argument("--max_len", type=int, default=768, help="longest synthetic example")
    parser.add_argument("--num_batches", type=int, default=4, help="distinct batches, rotated")
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--peak_tflops", type=float, default=0.0, help="0: by device kind")
    args = parser.parse_args()
    if args.steps < 1:
        parser.error("--steps must be >= 1")

    on_gpu = jax.devices()[0].platform == "gpu"
    attentions = (args.attention or ("xla,cudnn" if on_gpu else "xla")).split(",")
    remats = args.remat.split(",")
    device = jax.devices()[0].device_kind
    mesh = sharding.make_mesh()
    log(f"jax {jax.__version__} on {jax.device_count()} x {device}; mesh {dict(mesh.shape)}")

    vocab = (llama.PRESETS.get(args.preset) or {}).get("vocab_size", args.vocab_size)
    rng = np.random.default_rng(args.seed)
    host_batches = [
        packed_batch(
            rng,
            batch=args.batch_size,
            seq_len=args.seq_len,
            vocab=vocab,
            min_len=args.min_len,
            max_len=args.max_len,
        )
        for _ in range(max(1, min(args.num_batches, args.warmup_steps + args.steps)))
    ]
    # Real (non-padding) tokens of the timed steps, batch by batch as they are rotated.
    real_per_batch = [int((b["segment_ids"] > 0).sum()) for b in host_batches]
    segments = sum(int(b["segment_ids"].max(axis=1).sum()) for b in host_batches)
    rows = len(host_batches) * args.batch_size
    log(
        f"{len(host_batches)} batches of {args.batch_size}x{args.seq_len}: "
        f"{segments / rows:.2f} examples per row, "
        f"real share {sum(real_per_batch) / (rows * args.seq_len):.3f}"
    )

    peak = metrics.peak_flops_per_device(args.peak_tflops)
    baseline = None
    for remat, attention in itertools.product(remats, attentions):
        name = f"{args.preset or 'custom'}-{attention}-{remat}-b{args.batch_size}"
        row = {
            "name": name,
            "device": device,
            "jax": jax.__version__,
            "attention": attention,
            "remat": remat,
            "seq_len": args.seq_len,
            "batch": args.batch_size,
        }
        try:
            cfg = model_config(args, attention, remat)
            row["params"] = cfg.num_params
            log(f"{name}: {cfg.num_params / 1e9:.3f}B params, compiling ...")
            result = measure(args, cfg, mesh, host_batches)
        except Exception as exc:  # report and go on to the next configuration
            row["error"] = _error_kind(exc)
            log(f"{name}: FAILED {type(exc).__name__}: {str(exc)[:2000]}")
            print(json.dumps(row), flush=True)
            gc.collect()
            continue
        gc.collect()
        times = result["times"]
        step_s = statistics.median(times)
        timed_real = [
            real_per_batch[(args.warmup_steps + i) % len(host_batches)] for i in range(args.steps)
        ]
        tokens_per_s = args.batch_size * args.seq_len / step_s
        real_tokens_per_s = statistics.mean(timed_real) / step_s
        util = metrics.mfu(tokens_per_s, metrics.flops_per_token(cfg, args.seq_len), peak)
        if baseline is None:
            baseline = tokens_per_s
        losses = result["losses"]
        row.update(
            step_ms=round(step_s * 1e3, 2),
            tokens_per_s=round(tokens_per_s),
            real_tokens_per_s=round(real_tokens_per_s),
            mfu=None if math.isnan(util) else round(util, 4),
            ratio_vs_baseline=round(tokens_per_s / baseline, 3),
            step_ms_min=round(min(times) * 1e3, 2),
            step_ms_max=round(max(times) * 1e3, 2),
            compile_s=round(result["compile_s"], 1),
            init_s=round(result["init_s"], 1),
            loss_first=round(losses[0], 4),
            loss_last=round(losses[-1], 4),
            finite=all(math.isfinite(x) for x in losses),
            **result["mem"],
        )
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()

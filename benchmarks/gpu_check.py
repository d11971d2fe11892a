"""Numerics on a GPU: cuDNN attention vs XLA, GPU vs CPU logits, bf16 vs fp32 compute.

Run (from the repo root): python benchmarks/gpu_check.py
Prints one JSON line per check ({"check", "ok", numbers..., "tolerance"}) and exits 1 if any
check fails or raises, 0 if all pass. Without a GPU it prints {"skip": ...} and exits 0;
`--allow_cpu` runs the same code on the CPU instead (cuDNN replaced by XLA, CPU compared with
itself): a smoke test of this script, not of the numerics.

a. attention: `attention.attend(implementation="cudnn")` vs `"xla"` on packed rows with segment
   ids and trailing padding (segment 0), B=2 T=1024 N=8 K=4 (GQA) H=128, unit-normal bf16
   inputs. Forward output and the gradients w.r.t. q, k, v of sum(out * c) for a random
   cotangent c. Both are also compared with an fp32 reference (XLA attention on fp32 copies of
   the same inputs, matmul precision "highest"), so a failure shows which side is off.
b. tiny Llama (`preset("tiny", dtype="float32")`) logits on the GPU vs the same params on the CPU,
   both fp32, with jax_default_matmul_precision="highest" (checked); the same comparison at the
   default precision (the GPU may then use TF32 for fp32 matmuls) is reported, not checked.
c. the same tiny Llama with bf16 compute (fp32 params, identical values) vs fp32 compute on the
   GPU: relative error of the logits and argmax agreement over the real (non-padding) tokens.
"""

import argparse
import contextlib
import functools
import json
import pathlib
import sys
import traceback

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from sftjax import sharding  # noqa: E402
from sftjax.model import attention, llama  # noqa: E402

# Tolerances. bf16 keeps 8 significant bits (relative rounding 2^-9 ~ 2e-3 per value).
ATTN_FWD_MAX_ABS = 2e-2  # fast vs xla, on unit-normal inputs (outputs are |x| <~ 4)
ATTN_FWD_REL_L2 = 1e-2
ATTN_GRAD_REL_L2 = 2e-2  # per tensor, fast vs xla
ATTN_GRAD_MAX_REL = 5e-2  # max |fast - xla| / max |xla|, per tensor
CPU_PARITY_REL_L2 = 1e-4  # fp32 vs fp32, precision "highest"
BF16_REL_L2 = 3e-2
BF16_ARGMAX_AGREE = 0.95


def _devices(platform: str) -> list:
    try:
        return jax.devices(platform)
    except RuntimeError:
        return []


def rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def max_abs(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def max_rel(a, b) -> float:
    return max_abs(a, b) / float(np.max(np.abs(np.asarray(b, np.float64))))


def packed_segments(rng, batch: int, length: int, *, min_len: int, max_len: int, pad: tuple):
    """[B, L] int32 segment ids 1, 2, ... of random lengths, then trailing padding (0)."""
    seg = np.zeros((batch, length), np.int32)
    for r in range(batch):
        end = length - int(rng.integers(*pad))
        start, s = 0, 1
        while start < end:
            n = min(int(rng.integers(min_len, max_len + 1)), end - start)
            seg[r, start : start + n] = s
            start, s = start + n, s + 1
    return seg


def positions_for(seg: np.ndarray) -> np.ndarray:
    """Positions restarting at 0 for each segment; 0 on padding."""
    pos = np.zeros_like(seg)
    for r in range(seg.shape[0]):
        for s in np.unique(seg[r]):
            if s > 0:
                idx = np.flatnonzero(seg[r] == s)
                pos[r, idx] = np.arange(idx.size)
    return pos


def check_attention(device, fast_impl: str, seed: int) -> dict:
    b, t, n, k, h = 2, 1024, 8, 4, 128
    rng = np.random.default_rng(seed)
    seg_np = packed_segments(rng, b, t, min_len=64, max_len=400, pad=(64, 200))
    keys = jax.random.split(jax.random.key(seed), 4)
    with jax.default_device(device):
        q = jax.random.normal(keys[0], (b, t, n, h), jnp.bfloat16)
        kk = jax.random.normal(keys[1], (b, t, k, h), jnp.bfloat16)
        v = jax.random.normal(keys[2], (b, t, k, h), jnp.bfloat16)
        ct = jax.random.normal(keys[3], (b, t, n, h), jnp.float32)
        seg = jnp.asarray(seg_np)

    def make(impl, upcast=False):
        def loss(q, k, v):
            if upcast:
                q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
            out = attention.attend(q, k, v, seg, implementation=impl)
            return jnp.sum(out.astype(jnp.float32) * ct), out

        def fwd_bwd(q, k, v):
            (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
            return out, grads

        return jax.jit(fwd_bwd)

    out_fast, g_fast = make(fast_impl)(q, kk, v)
    out_xla, g_xla = make("xla")(q, kk, v)
    with matmul_precision("highest"):
        out_ref, g_ref = make("xla", upcast=True)(q, kk, v)
    out_fast, g_fast, out_xla, g_xla, out_ref, g_ref = jax.device_get(
        (out_fast, g_fast, out_xla, g_xla, out_ref, g_ref)
    )
    f32 = functools.partial(np.asarray, dtype=np.float32)
    row = {
        "check": "a_attention_cudnn_vs_xla",
        "device": device.device_kind,
        "fast_impl": fast_impl,
        "shape": f"B{b} T{t} N{n} K{k} H{h} bf16",
        "padding_tokens": int((seg_np == 0).sum()),
        "segments": int(seg_np.max(axis=1).sum()),
        "fwd_max_abs": max_abs(f32(out_fast), f32(out_xla)),
        "fwd_rel_l2": rel_l2(f32(out_fast), f32(out_xla)),
        "fwd_rel_l2_fast_vs_f32ref": rel_l2(f32(out_fast), out_ref),
        "fwd_rel_l2_xla_vs_f32ref": rel_l2(f32(out_xla), out_ref),
        "fwd_max_abs_padding_rows": max_abs(f32(out_fast)[seg_np == 0], f32(out_xla)[seg_np == 0]),
    }
    grad_ok = True
    for name, gf, gx, gr in zip("qkv", g_fast, g_xla, g_ref, strict=True):
        gf, gx = f32(gf), f32(gx)
        row[f"d{name}_rel_l2"] = rel_l2(gf, gx)
        row[f"d{name}_max_rel"] = max_rel(gf, gx)
        row[f"d{name}_rel_l2_fast_vs_f32ref"] = rel_l2(gf, gr)
        row[f"d{name}_rel_l2_xla_vs_f32ref"] = rel_l2(gx, gr)
        grad_ok &= row[f"d{name}_rel_l2"] < ATTN_GRAD_REL_L2
        grad_ok &= row[f"d{name}_max_rel"] < ATTN_GRAD_MAX_REL
        grad_ok &= bool(np.isfinite(gf).all())
    row["ok"] = bool(
        row["fwd_max_abs"] < ATTN_FWD_MAX_ABS
        and row["fwd_rel_l2"] < ATTN_FWD_REL_L2
        and np.isfinite(f32(out_fast)).all()
        and grad_ok
    )
    row["tolerance"] = {
        "fwd_max_abs": ATTN_FWD_MAX_ABS,
        "fwd_rel_l2": ATTN_FWD_REL_L2,
        "grad_rel_l2": ATTN_GRAD_REL_L2,
        "grad_max_rel": ATTN_GRAD_MAX_REL,
    }
    return row


def tiny_inputs(seed: int, vocab: int, batch: int = 2, length: int = 256):
    rng = np.random.default_rng(seed)
    seg = packed_segments(rng, batch, length, min_len=20, max_len=120, pad=(10, 40))
    tokens = np.where(seg > 0, rng.integers(3, vocab, size=seg.shape), 0).astype(np.int32)
    return tokens, positions_for(seg), seg


def tiny_model(dtype: str, device, seed: int):
    """(forward(params, tokens, positions, segment_ids), params) of preset tiny on `device`."""
    cfg = llama.preset("tiny", dtype=dtype, param_dtype="float32")
    model = llama.create(cfg, sharding.make_mesh(devices=[device]), seed=seed)
    graphdef, state = nnx.split(model)
    params = nnx.to_pure_dict(state)

    def forward(params, tokens, positions, segment_ids):
        return nnx.merge(graphdef, params)(tokens, positions, segment_ids).astype(jnp.float32)

    return forward, params, cfg


@contextlib.contextmanager
def matmul_precision(precision: str | None):
    """jax.config.update("jax_default_matmul_precision", ...) for the block, then restore."""
    previous = getattr(jax.config, "jax_default_matmul_precision", None)
    jax.config.update("jax_default_matmul_precision", precision)
    try:
        yield
    finally:
        jax.config.update("jax_default_matmul_precision", previous)


def _logits(forward, params, inputs, device, precision: str | None):
    """Logits on `device` under a fresh jit (so the precision setting is traced in)."""
    with matmul_precision(precision):
        p = jax.device_put(params, device)
        args = [jax.device_put(x, device) for x in inputs]
        return np.asarray(jax.device_get(jax.jit(forward)(p, *args)))


def check_cpu_parity(device, cpu, seed: int) -> dict:
    forward, params, cfg = tiny_model("float32", device, seed)
    inputs = tiny_inputs(seed, cfg.vocab_size)
    real = inputs[2] > 0
    row = {"check": "b_tiny_fp32_gpu_vs_cpu", "device": device.device_kind}
    for precision in ("highest", None):
        label = precision or "default"
        on_dev = _logits(forward, params, inputs, device, precision)
        on_cpu = _logits(forward, params, inputs, cpu, precision)
        row[f"rel_l2_{label}"] = rel_l2(on_dev, on_cpu)
        row[f"max_rel_{label}"] = max_rel(on_dev, on_cpu)
        row[f"rel_l2_real_tokens_{label}"] = rel_l2(on_dev[real], on_cpu[real])
        row[f"finite_{label}"] = bool(np.isfinite(on_dev).all())
    row["checked"] = 'jax_default_matmul_precision="highest" (default precision: reported only)'
    row["ok"] = bool(row["rel_l2_highest"] < CPU_PARITY_REL_L2 and row["finite_highest"])
    row["tolerance"] = {"rel_l2_highest": CPU_PARITY_REL_L2}
    return row


def check_bf16(device, seed: int) -> dict:
    fwd32, params32, cfg = tiny_model("float32", device, seed)
    fwd16, params16, _ = tiny_model("bfloat16", device, seed)
    same_params = all(
        np.array_equal(a, b)
        for a, b in zip(
            jax.tree.leaves(jax.device_get(params32)),
            jax.tree.leaves(jax.device_get(params16)),
            strict=True,
        )
    )
    inputs = tiny_inputs(seed + 1, cfg.vocab_size)
    real = inputs[2] > 0
    ref = _logits(fwd32, params32, inputs, device, "highest")
    low = _logits(fwd16, params32, inputs, device, None)
    agree = float((ref.argmax(-1) == low.argmax(-1))[real].mean())
    top2 = np.sort(ref[real], axis=-1)[:, -2:]
    row = {
        "check": "c_tiny_bf16_vs_fp32_compute",
        "device": device.device_kind,
        "same_params": same_params,
        "rel_l2": rel_l2(low[real], ref[real]),
        "max_rel": max_rel(low[real], ref[real]),
        "argmax_agreement": agree,
        "real_tokens": int(real.sum()),
        "median_top2_gap_fp32": float(np.median(top2[:, 1] - top2[:, 0])),
        "logit_std_fp32": float(ref[real].std()),
        "finite": bool(np.isfinite(low).all()),
    }
    row["ok"] = bool(
        same_params and row["finite"] and row["rel_l2"] < BF16_REL_L2 and agree >= BF16_ARGMAX_AGREE
    )
    row["tolerance"] = {"rel_l2": BF16_REL_L2, "argmax_agreement_min": BF16_ARGMAX_AGREE}
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--allow_cpu", action="store_true", help="smoke-test on the CPU")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    gpus = _devices("gpu")
    cpus = _devices("cpu")
    if gpus:
        device, fast_impl = gpus[0], "cudnn"
    elif args.allow_cpu:
        device, fast_impl = cpus[0], "xla"
    else:
        print(json.dumps({"skip": "no GPU: nothing checked", "jax": jax.__version__}))
        return 0
    print(
        json.dumps(
            {"check": "env", "jax": jax.__version__, "device": device.device_kind, "ok": True}
        ),
        flush=True,
    )

    checks = [
        ("a_attention_cudnn_vs_xla", lambda: check_attention(device, fast_impl, args.seed)),
        ("b_tiny_fp32_gpu_vs_cpu", lambda: check_cpu_parity(device, cpus[0], args.seed)),
        ("c_tiny_bf16_vs_fp32_compute", lambda: check_bf16(device, args.seed)),
    ]
    failed = 0
    for name, run in checks:
        try:
            row = run()
        except Exception as exc:
            traceback.print_exc(file=sys.stderr)
            row = {"check": name, "ok": False, "error": f"{type(exc).__name__}: {exc}"[:600]}
        failed += not row["ok"]
        print(json.dumps(row), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

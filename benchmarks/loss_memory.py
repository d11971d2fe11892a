"""Temporaries of the real train step with the loss in one chunk vs LOSS_CHUNK_TOKENS chunks.

Two ways, both compiled from abstract arrays (nothing is allocated or run):
- default: a 2-layer d-256 model with a big vocabulary (--vocab, Llama-2's 32000 unless given;
  Llama-3 has 128256, Qwen3 151936) at 8 x 2048 tokens on one device of this host, compiled
  by XLA here, so the [B, L, V] logits dominate the step;
- --config=configs/llama3_8b.py --topology=v5p:2x2x1: a shipped config on a TPU slice, compiled
  by the TPU compiler as sftjax.plan does (run with JAX_PLATFORMS=cpu; each compile takes
  minutes at 8B), to see whether the logits reach the peak of the real step.

Run (from the repo root):
  python benchmarks/loss_memory.py --vocab=128256
  JAX_PLATFORMS=cpu python benchmarks/loss_memory.py --config=configs/llama3_8b.py \
      --topology=v5p:2x2x1 --chunks=4096,512
Prints one JSON line per chunk size: temporaries in GiB, the ratio to the first chunk size,
and the size of one chip's whole [B, L, V] fp32 logits (rows per chip and pass x L x V x 4).
"""

import argparse
import importlib.util
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import train_throughput  # noqa: E402

from sftjax import config as config_lib  # noqa: E402
from sftjax import plan, sharding, train  # noqa: E402
from sftjax.model import llama  # noqa: E402

GIB = 2**30
ROWS, LENGTH = 8, 2048


def small_model_temporaries(vocab: int) -> tuple[float, int, int]:
    """(temporaries GiB, rows, vocab) of the 2-layer model's step on one local device."""
    cfg = llama.LlamaConfig(
        vocab_size=vocab, embed_dim=256, mlp_dim=688, num_layers=2, num_heads=4,
        num_kv_heads=4, max_seq_len=LENGTH, scan_layers=True, remat="full",
    )  # fmt: skip
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    tx, schedule = train.make_optimizer(train_throughput.optim_namespace(1e-5), 10)
    graphdef, abstract = nnx.split(llama.abstract(cfg, mesh))
    param_shardings = nnx.to_pure_dict(sharding.state_shardings(abstract, mesh))
    params = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        nnx.to_pure_dict(abstract),
        param_shardings,
    )
    shardings = train.state_shardings_for(param_shardings, params, tx)
    state = jax.eval_shape(
        lambda: train.TrainState(jnp.int32(0), params, tx.init(params), jax.random.PRNGKey(0))
    )
    state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state, shardings
    )
    rows = sharding.batch_sharding(mesh)
    batch = {
        k: jax.ShapeDtypeStruct((ROWS, LENGTH), jnp.int32, sharding=rows) for k in train.BATCH_KEYS
    }
    step, _ = train.jit_steps(graphdef, tx, schedule, 1, shardings, rows)
    with jax.set_mesh(mesh):
        memory = step.lower(state, batch, {}).compile().memory_analysis()
    return memory.temp_size_in_bytes / GIB, ROWS, vocab


def config_temporaries(path: str, topology: str) -> tuple[float, int, int]:
    """(temporaries GiB, rows per chip and pass, vocab) of a config's step on a TPU slice."""
    spec = importlib.util.spec_from_file_location("config_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = plan.without_placeholder_weights(module.get_config(), report=lambda _: None)
    target = plan.parse_topology(topology)
    result = plan.compile_plan(config, target, "as configured")
    rows = config.train.batch_size // config.train.microbatches // target.chips
    return result.temporaries_gib, rows, config_lib.model_config(config.model).vocab_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=32000, help="default mode's vocabulary")
    parser.add_argument("--config", help="a configs/*.py file (with --topology)")
    parser.add_argument("--topology", help="TPU slice for --config, e.g. v5p:2x2x1")
    parser.add_argument("--chunks", help="loss chunk sizes in tokens, e.g. 4096,512")
    args = parser.parse_args()
    if bool(args.config) != bool(args.topology):
        parser.error("--config and --topology go together")
    length = LENGTH
    if args.config:
        spec = importlib.util.spec_from_file_location("config_length", args.config)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        length = module.get_config().data.seq_len
    default = train.LOSS_CHUNK_TOKENS
    chunks = [int(c) for c in args.chunks.split(",")] if args.chunks else [length, default]
    first = None
    for chunk in chunks:
        train.LOSS_CHUNK_TOKENS = chunk  # read when the step is traced
        if args.config:
            gib, rows, vocab = config_temporaries(args.config, args.topology)
            shape = f"{args.config} on {args.topology}"
        else:
            gib, rows, vocab = small_model_temporaries(args.vocab)
            shape = f"d-256 model, {ROWS}x{LENGTH}"
        first = first or gib
        logits = rows * length * vocab * 4 / GIB
        result = {
            "loss_chunk_tokens": chunk,
            "shape": shape,
            "vocab": vocab,
            "temporaries_gib": round(gib, 2),
            "ratio_vs_first": round(gib / first, 3),
            "whole_fp32_logits_gib_per_chip": round(logits, 2),
        }
        print(json.dumps(result), flush=True)
    train.LOSS_CHUNK_TOKENS = default


if __name__ == "__main__":
    main()

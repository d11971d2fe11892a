"""Temporaries of the real train step with the loss in one chunk vs LOSS_CHUNK_TOKENS chunks.

The model is small but the vocabulary is Llama-2's, so the [B, L, V] logits dominate, as they
do per chip at 7B. Compiled by XLA on this host from abstract arrays; nothing is allocated.

Run (from the repo root): python benchmarks/loss_memory.py
Prints one JSON line per chunk size with temporaries in GiB and the ratio to one chunk.
"""

import json
import pathlib
import sys

import jax
import jax.numpy as jnp
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import train_throughput  # noqa: E402

from sftjax import sharding, train  # noqa: E402
from sftjax.model import llama  # noqa: E402

ROWS, LENGTH = 8, 2048


def main() -> None:
    cfg = llama.LlamaConfig(
        vocab_size=32000, embed_dim=256, mlp_dim=688, num_layers=2, num_heads=4,
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
    chunked, whole = train.LOSS_CHUNK_TOKENS, None
    for chunk in (LENGTH, chunked):
        train.LOSS_CHUNK_TOKENS = chunk
        step, _ = train.jit_steps(graphdef, tx, schedule, 1, shardings, rows)
        with jax.set_mesh(mesh):
            memory = step.lower(state, batch, {}).compile().memory_analysis()
        gib = memory.temp_size_in_bytes / 2**30
        whole = whole or gib
        shape = f"{ROWS}x{LENGTH}, vocab {cfg.vocab_size}"
        print(json.dumps({"loss_chunk_tokens": chunk, "shape": shape, "temporaries_gib":
                          round(gib, 2), "ratio_vs_one_chunk": round(gib / whole, 3)}))  # fmt: skip
    train.LOSS_CHUNK_TOKENS = chunked


if __name__ == "__main__":
    main()

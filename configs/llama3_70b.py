"""Llama-3.1-70B / Llama-3.3-70B supervised fine-tuning: configs/base.py plus the usual recipe.

Same shapes as Llama-2-70B (configs/llama2_70b.py) but for the 128k vocabulary (70.6B
parameters): fp32 weights + Adam are 12 B/param = 847 GB, 26 GB per chip over 32 chips before
any activation. Rows are 4096 tokens and a step holds 64 of them (262k tokens, 2 rows per
chip on a v5p-64: larger models take larger batches).
`python -m sftjax.plan` (TPU compiler, per chip, as shipped, splash attention):
  v5p-64 (32 chips, 8 hosts): params 8.2 + Adam 16.4 GiB; arguments 24.7 + temporaries 39.2 =
    63.9 of 95.7 GiB, 67 %. Not planned on a v5p-32 (16 chips): the arguments alone double to
    49 GiB, and Llama-2-70B did not fit there (101.2 GiB, configs/llama2_70b.py).
  v6e-64 (64 chips, 31.25 GiB each, one row per chip): 12.3 + 23.4 = 35.8 GiB, 114 %: does
    NOT fit. Twice the chips with half the rows each took temporaries from 39.2 to 23.4 GiB,
    not to 19.6: ~7.6 GiB do not shrink with the chips (one layer's gathered weights, and the
    embedding and head, 1.05B parameters, with their gradients, by the shapes).
  v6e-128 (128 chips) needs 128 rows: with --config.train.batch_size=128
    --config.eval.batch_size=128 (524k tokens per step), 6.2 + 18.4 = 24.6 GiB, 79 %.
GPUs: not planned here; by the same arithmetic >= 32 × 80 GB.
Launch with launch/tpu_pod.sh or launch/slurm.sbatch, which run on every host:
  python -m sftjax.main --multihost --config=configs/llama3_70b.py --workdir=/shared/runs/70b \
    --config.model.hf_path=/data/Llama-3.3-70B-Instruct \
    --config.data.tokenizer=/data/Llama-3.3-70B-Instruct \
    --config.data.train_files=/data/sft/train.jsonl

Owns only the overrides below; every key and its meaning is in base.py. Recipe values that base
already holds are restated on purpose, so this file stays the 70B recipe if base's defaults move.
Memory figures come from sftjax.plan (the TPU compiler's plan), not from a run on a TPU.
"""

import importlib.util
import pathlib

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    # configs/ is not a package and config_flags loads files by path, so base.py is loaded by
    # path as well, relative to this file so that any working directory works.
    spec = importlib.util.spec_from_file_location(
        "sftjax_configs_base", pathlib.Path(__file__).resolve().parent / "base.py"
    )
    base = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(base)
    c = base.get_config()

    c.model.hf_path = "/path/to/Llama-3.1-70B"  # placeholder: HF directory with safetensors
    c.model.preset = "llama3_70b"  # the architecture when hf_path is "" (random init)
    c.model.param_dtype = "float32"  # fp32 master weights and Adam moments
    c.model.dtype = "bfloat16"  # bf16 matmuls and activations
    c.model.scan_layers = True  # one layer compiled, scanned 80 times: unrolled won't compile fast
    c.model.remat = "full"  # keep only each layer's input; memory goes to weights and Adam
    c.model.attention = "auto"  # splash on TPU, cuDNN on NVIDIA GPUs, XLA elsewhere
    c.data.tokenizer = "/path/to/Llama-3.1-70B"  # placeholder: the model's own tokenizer
    c.data.train_files = "/path/to/train.jsonl"  # placeholder: JSONL rows (alpaca or chat)
    c.data.seq_len = 4096  # tokens per packed row: Llama-3 was pretrained on 8192-token rows
    c.data.num_epochs = 3  # Alpaca-style upper bound; early stopping usually ends sooner
    c.train.batch_size = 64  # 64 rows × 4096 tokens ≈ 262k tokens per step (see docstring)
    c.optim.lr = 1e-5  # half the 8B LR: common practice for the largest size
    c.optim.warmup_ratio = 0.03  # Alpaca: 3% linear warmup, then cosine to 0
    c.optim.weight_decay = 0.0  # Alpaca/FastChat use none
    c.eval.every_steps = 100  # validation loss every ~26M training tokens, as the 8B configs
    c.eval.patience = 3  # stop after 3 evaluations (300 steps) without improvement
    c.eval.min_delta = 0.0  # any improvement resets patience
    c.mesh.fsdp = -1  # FSDP over every device; needs >= 32 v5p chips (see docstring)
    return c

"""Qwen3-8B supervised fine-tuning: configs/base.py plus the usual full fine-tuning recipe.

Sized like configs/llama3_8b.py, for a v5p-8 (4 chips, one host): 8.2B parameters (its 152k
vocabulary holds 1.24B of them in the embedding and the head, which are not tied), 36 layers,
4096-token rows and full remat (see llama3_8b.py for why).
`python -m sftjax.plan` (TPU compiler, per chip, as shipped, splash attention):
  v5p-8 (4 chips): params 7.6 + Adam 15.3 GiB; arguments 22.9 + temporaries 39.2 = 62.1 of
    95.7 GiB, 65 % (the whole [8, 4096, 151936] fp32 logits would be 18.6 GiB per chip).
  v6e-16 (16 chips, several hosts: --multihost): 5.7 + 11.8 = 17.5 of 31.25 GiB, 56 %.
  v6e-8 (8 chips, one host): 11.4 + 20.4 = 31.9 GiB, 102 %: does NOT fit.
GPUs: not planned here (no GPU compiler); 62 GiB per chip would be 83 % of an 80 GB GPU on
four, so one 8 × 80 GB host is the safe choice.
The paths are placeholders; override them on the command line:
  python -m sftjax.main --config=configs/qwen3_8b.py --workdir=runs/qwen3_8b \
    --config.model.hf_path=/data/Qwen3-8B-Base --config.data.tokenizer=/data/Qwen3-8B-Base \
    --config.data.train_files=/data/sft/train.jsonl

Owns only the overrides below; every key and its meaning is in base.py. Recipe values that base
already holds are restated on purpose, so this file stays the 8B recipe if base's defaults move.
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

    c.model.hf_path = "/path/to/Qwen3-8B-Base"  # placeholder: HF directory with safetensors
    c.model.preset = "qwen3_8b"  # the architecture when hf_path is "" (random init)
    c.model.param_dtype = "float32"  # fp32 master weights and Adam moments
    c.model.dtype = "bfloat16"  # bf16 matmuls and activations
    c.model.scan_layers = True  # one layer compiled, scanned 36 times: fast compiles
    c.model.remat = "full"  # keep only each layer's input: fits a v5p-8 (see docstring)
    c.model.attention = "auto"  # splash on TPU, cuDNN on NVIDIA GPUs, XLA elsewhere
    c.data.tokenizer = "/path/to/Qwen3-8B-Base"  # placeholder: the model's own tokenizer
    c.data.train_files = "/path/to/train.jsonl"  # placeholder: JSONL rows (alpaca or chat)
    c.data.seq_len = 4096  # tokens per packed row (the model's context is 32k-40k)
    c.data.num_epochs = 3  # Alpaca-style upper bound; early stopping usually ends sooner
    c.train.batch_size = 32  # 32 rows × 4096 tokens ≈ 131k tokens per step, as llama3_8b.py
    c.optim.lr = 1e-5  # half the Llama 7B/8B LR: Qwen's SFT recipes use 1e-5 at 7B-8B
    c.optim.warmup_ratio = 0.03  # 3% linear warmup, then cosine to 0
    c.optim.weight_decay = 0.0  # none, as the other configs
    c.eval.every_steps = 200  # validation loss every ~26M training tokens
    c.eval.patience = 3  # stop after 3 evaluations (600 steps) without improvement
    c.eval.min_delta = 0.0  # any improvement resets patience
    c.mesh.fsdp = -1  # FSDP over every device: 12 B/param ÷ 4 chips ≈ 25 GB/chip of state
    return c

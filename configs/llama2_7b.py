"""Llama-2-7B supervised fine-tuning: configs/base.py plus the published SFT recipe.

Sized for 8 chips: one 8×H100 host, or a v5p-16 slice (8 chips, 2 hosts: add --multihost; a
v5p-8 has only 4 chips). `python -m sftjax.plan` (TPU compiler, per chip, as shipped, splash
attention): v5p 8 chips 9.4 GiB arguments + 56.3 temporaries = 65.7 of 95.7 GiB, fits (XLA
attention: 72.4 temporaries); v5p 4 chips does not (temporaries 116.7 GiB) but fits with
--config.train.microbatches=4 (70.5 GiB; microbatches=2 is 93.7, too tight). GPUs: not planned
here (no GPU compiler); the v5p figures suggest 8 × 80 GB. The paths are placeholders; override
them on the command line:
  python -m sftjax.main --config=configs/llama2_7b.py --workdir=runs/7b \
    --config.model.hf_path=/data/Llama-2-7b-hf --config.data.tokenizer=/data/Llama-2-7b-hf \
    --config.data.train_files=/data/sft/train.jsonl

Owns only the overrides below; every key and its meaning is in base.py. Recipe values that base
already holds are restated on purpose, so this file stays the 7B recipe if base's defaults move.
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

    c.model.hf_path = "/path/to/Llama-2-7b-hf"  # placeholder: HF directory with safetensors
    c.model.preset = "llama2_7b"  # the architecture when hf_path is "" (random init)
    c.model.param_dtype = "float32"  # fp32 master weights and Adam moments
    c.model.dtype = "bfloat16"  # bf16 matmuls and activations
    c.model.scan_layers = True  # one layer compiled, scanned 32 times: fast compiles
    c.model.remat = "save_dots"  # keeps weight-matmul outputs: most of the 56 GiB temporaries
    c.model.attention = "auto"  # splash on TPU, cuDNN on NVIDIA GPUs, XLA elsewhere
    c.data.tokenizer = "/path/to/Llama-2-7b-hf"  # placeholder: the model's own tokenizer
    c.data.train_files = "/path/to/train.jsonl"  # placeholder: JSONL rows (alpaca or chat)
    c.data.seq_len = 2048  # tokens per packed row; 4096 (full context) doubles activations
    c.data.num_epochs = 3  # Alpaca-style upper bound; early stopping usually ends sooner
    c.train.batch_size = 64  # 64 rows × 2048 tokens ≈ 131k tokens per optimizer step
    c.optim.lr = 2e-5  # peak LR of the Llama-2 paper's SFT and of Alpaca
    c.optim.warmup_ratio = 0.03  # Alpaca: 3% linear warmup, then cosine to 0
    c.optim.weight_decay = 0.0  # Alpaca/FastChat use none (the Llama-2 paper used 0.1)
    c.eval.every_steps = 200  # validation loss every ~26M training tokens
    c.eval.patience = 3  # stop after 3 evaluations (600 steps) without improvement
    c.eval.min_delta = 0.0  # any improvement resets patience
    c.mesh.fsdp = -1  # FSDP over every device: 12 B/param ÷ 8 chips ≈ 10 GB/chip of state
    return c

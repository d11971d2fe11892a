"""Llama-3.1-8B supervised fine-tuning: configs/base.py plus the usual full fine-tuning recipe.

Sized for a v5p-8 (4 chips, one host, Google's smallest v5p slice). Against Llama-2-7B
(configs/llama2_7b.py) it has 8.0B parameters (the 128k vocabulary puts 1.05B in the embedding
and the head), 4096-token rows and full remat: recomputing each layer's forward costs ~1/3
more FLOPs, fewer chip-hours than twice the chips without it (arithmetic, not a measured speed).
`python -m sftjax.plan` (TPU compiler, per chip, as shipped, splash attention):
  v5p-8 (4 chips): params 7.5 + Adam 15.0 GiB; arguments 22.4 + temporaries 39.3 = 61.8 of
    95.7 GiB, 65 %. The whole [8 rows, 4096, 128256] fp32 logits would be 15.7 GiB per chip;
    the loss takes 512 tokens of each row at a time (2.0 GiB; sftjax/train.py). With one
    4096-token chunk the temporaries are 46.0 GiB, with 128-token chunks 38.8.
  v6e-8 (8 chips, 31.25 GiB each): 11.2 + 20.4 = 31.6 GiB, 101 %: does NOT fit.
  v6e-16 (16 chips, several hosts: --multihost): 5.6 + 10.8 = 16.4 GiB, 53 %.
GPUs: not planned here (no GPU compiler); 62 GiB per chip would be 83 % of an 80 GB GPU on
four, so one 8 × 80 GB host is the safe choice.
The paths are placeholders; override them on the command line:
  python -m sftjax.main --config=configs/llama3_8b.py --workdir=runs/llama3_8b \
    --config.model.hf_path=/data/Llama-3.1-8B --config.data.tokenizer=/data/Llama-3.1-8B \
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

    c.model.hf_path = "/path/to/Llama-3.1-8B"  # placeholder: HF directory with safetensors
    c.model.preset = "llama3_8b"  # the architecture when hf_path is "" (random init)
    c.model.param_dtype = "float32"  # fp32 master weights and Adam moments
    c.model.dtype = "bfloat16"  # bf16 matmuls and activations
    c.model.scan_layers = True  # one layer compiled, scanned 32 times: fast compiles
    c.model.remat = "full"  # keep only each layer's input: fits a v5p-8 (see docstring)
    c.model.attention = "auto"  # splash on TPU, cuDNN on NVIDIA GPUs, XLA elsewhere
    c.data.tokenizer = "/path/to/Llama-3.1-8B"  # placeholder: the model's own tokenizer
    c.data.train_files = "/path/to/train.jsonl"  # placeholder: JSONL rows (alpaca or chat)
    c.data.seq_len = 4096  # tokens per packed row: Llama-3 was pretrained on 8192-token rows
    c.data.num_epochs = 3  # Alpaca-style upper bound; early stopping usually ends sooner
    c.train.batch_size = 32  # 32 rows × 4096 tokens ≈ 131k tokens per step, as the Llama-2 ones
    c.optim.lr = 2e-5  # the 7B/8B full fine-tuning LR (Llama-2 paper's SFT, Alpaca)
    c.optim.warmup_ratio = 0.03  # Alpaca: 3% linear warmup, then cosine to 0
    c.optim.weight_decay = 0.0  # Alpaca/FastChat use none
    c.eval.every_steps = 200  # validation loss every ~26M training tokens
    c.eval.patience = 3  # stop after 3 evaluations (600 steps) without improvement
    c.eval.min_delta = 0.0  # any improvement resets patience
    c.mesh.fsdp = -1  # FSDP over every device: 12 B/param ÷ 4 chips ≈ 24 GB/chip of state
    return c

"""Llama-3.1-8B LoRA fine-tuning: configs/base.py plus a common LoRA recipe, on ONE chip.

Full fine-tuning of 8B needs 4 v5p chips (configs/llama3_8b.py); here only rank-16 adapters
train (42M parameters, fp32 with their Adam moments: 0.5 GiB) beside a frozen bf16 base (15.0
GiB). Same data recipe as llama3_8b.py (4096-token rows, 32 per step), 2 rows per pass.
`python -m sftjax.plan` (TPU compiler, per chip, as shipped):
  --topology=v5p:1x1x1 (one v5p chip): arguments 15.4 GiB (trainable 0.16 + Adam 0.31 + frozen
    base 15.0) + temporaries 9.5 = 24.9 of 95.7 GiB, 26 %.
  --topology=v6e:1x1 (a v6e-1, one Trillium chip, 31.25 GiB): 15.4 + 9.7 = 25.2 GiB, 80 %.
Google's smallest v5p slice is a v5p-8 (4 chips); "one chip" is the per-chip question.
The paths are placeholders; override them on the command line:
  python -m sftjax.main --config=configs/llama3_8b_lora.py --workdir=runs/llama3_8b_lora \
    --config.model.hf_path=/data/Llama-3.1-8B --config.data.tokenizer=/data/Llama-3.1-8B \
    --config.data.train_files=/data/sft/train.jsonl

Owns only the overrides below; every key and its meaning is in base.py. Memory figures come
from sftjax.plan (the TPU compiler's plan), not from a run on a TPU.
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
    c.model.param_dtype = "float32"  # fp32 adapters and Adam moments: 0.5 GiB in all
    c.model.base_dtype = "bfloat16"  # frozen base: 16 GB in bf16 (32 GB in fp32)
    c.model.remat = "full"  # keep only each layer's input: memory goes to the frozen base
    c.model.lora.rank = 16  # 42M trainable parameters, 0.5% of 8B
    c.model.lora.alpha = 32.0  # alpha = 2 x rank, the usual pairing: update scale 2
    c.model.lora.targets = "all"  # every projection: QLoRA (2023) found it needed to match full FT
    c.model.lora.dropout = 0.05  # alpaca-lora's and PEFT examples' value
    c.data.tokenizer = "/path/to/Llama-3.1-8B"  # placeholder: the model's own tokenizer
    c.data.train_files = "/path/to/train.jsonl"  # placeholder: JSONL rows (alpaca or chat)
    c.data.seq_len = 4096  # tokens per packed row, as the full fine-tuning config
    c.data.num_epochs = 3  # Alpaca-style upper bound; early stopping usually ends sooner
    c.train.batch_size = 32  # as llama3_8b.py: same steps and evaluations as full FT
    c.train.microbatches = 16  # 2 rows × 4096 tokens per pass on one chip (see docstring)
    c.optim.lr = 2e-4  # QLoRA's LR for 7B/13B adapters: ~10x full fine-tuning's
    c.optim.warmup_ratio = 0.03  # 3% linear warmup, then cosine to 0 (base's end_lr_ratio)
    c.optim.weight_decay = 0.0  # none on the adapters (PEFT's and alpaca-lora's default)
    c.eval.every_steps = 200  # validation loss every ~26M training tokens
    c.mesh.fsdp = -1  # one chip: 1; on more devices the base is sharded over all of them
    return c

"""The built-in demo: a ~0.8M-parameter Llama learns ten toy instruction tasks on a laptop CPU.

Run it with `bash scripts/demo.sh` (or `python -m sftjax.demo`): it writes the data and trains
the tokenizer under a fresh workdir (runs/demo-<time>/) and points the data paths below there.
To rerun only the training on that data:
    python -m sftjax.main --config=configs/tiny.py --workdir=runs/again \
      --config.data.train_files=runs/demo-<time>/data/train.jsonl \
      --config.data.validation_files=runs/demo-<time>/data/validation.jsonl \
      --config.data.tokenizer=runs/demo-<time>/tokenizer
Same code path as the 7B config: templates, exact masks, packing, sharded step, evaluation,
early stopping, checkpoints.
"""

import importlib.util
import pathlib


def get_config():
    spec = importlib.util.spec_from_file_location(
        "base", pathlib.Path(__file__).with_name("base.py")
    )
    base = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(base)
    c = base.get_config()
    c.data.train_files = "runs/demo/data/train.jsonl"  # sftjax.demo sets its own paths
    c.data.validation_files = "runs/demo/data/validation.jsonl"  # instructions unseen in training
    c.data.tokenizer = "runs/demo/tokenizer"  # byte-level BPE trained by sftjax.demo
    c.data.seq_len = 64  # toy rows are ~26 tokens: ~2.3 examples per packed row, 93% real
    c.data.num_epochs = 40  # more than needed: early stopping ends the run (~22 epochs)
    c.model.preset = "demo"  # d 128, 3 layers, 4 heads, vocab 512
    c.model.dtype = "float32"  # CPUs have no fast bf16 matmul
    c.model.scan_layers = False  # 3 layers compile fast unrolled; scanning cost 30 ms a step
    c.model.remat = "none"  # tiny activations: recomputing them only costs time
    c.optim.lr = 2e-3  # small models take large steps
    c.optim.warmup_ratio = 0.01  # ~40 steps of warmup
    c.train.batch_size = 8  # rows of 64 tokens per step: small steps learn most per token here
    c.train.log_every_steps = 50  # metrics cadence
    c.eval.every_steps = 100  # validation loss over all 200 validation rows (~2/3 epoch)
    c.eval.batch_size = 32  # rows per validation step
    c.eval.patience = 3  # evaluations without improvement before stopping
    c.eval.min_delta = 0.002  # ignore improvements smaller than this
    c.eval.prompts = (
        "Reverse the order of these words: river cloud stone",
        "What is the capital of Japan?",
        "Sort these numbers from smallest to largest: 42, 7, 19",
    )  # answered at every evaluation
    c.eval.max_new_tokens = 24  # toy answers are short
    c.checkpoint.export_dtype = "float32"  # keep the tiny export exact
    return c

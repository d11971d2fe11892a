"""Small real training setups: a tiny Llama, packed batches, a demo corpus and its config."""

import importlib.util
import pathlib
import sys
import time

import jax
import numpy as np
from flax import nnx

from sftjax import demo_data, sharding, train
from sftjax.data import batches, flat
from sftjax.data.tokenize import Example
from sftjax.model import llama

ROOT = pathlib.Path(__file__).resolve().parents[1]


def random_examples(n: int, vocab: int, seed: int = 0) -> list[Example]:
    """Learnable examples of 5..40 tokens (id[i+1] = f(id[i])), second half trainable."""
    rng = np.random.default_rng(seed)
    examples = []
    for _ in range(n):
        ids = [int(rng.integers(3, vocab))]
        for _ in range(int(rng.integers(5, 40))):
            ids.append((ids[-1] * 5 + 1) % (vocab - 3) + 3)
        ids = np.asarray(ids, np.int32)
        trainable = (np.arange(len(ids)) >= len(ids) // 2).astype(np.int32)
        examples.append(Example(ids[:-1], ids[1:], trainable[1:]))
    return examples


def packed_batches(examples, *, batch_size: int, seq_len: int, steps: int) -> list[dict]:
    dataset = batches.train_dataset(
        flat.from_examples(examples),
        batch_size=batch_size,
        seq_len=seq_len,
        seed=0,
        num_epochs=50,
        process_index=0,
        process_count=1,
    )
    return [dataset[i] for i in range(steps)]


def optim_config(lr: float = 3e-3):
    optim = base_config().optim
    optim.lr, optim.warmup_ratio = lr, 0.0
    return optim


def tiny_trainer(mesh, *, microbatches: int = 1, seed: int = 0, total_steps: int = 10, **model):
    """(state, step_fn, eval_fn, batch_sharding) for a tiny fp32 Llama on `mesh`."""
    cfg = llama.preset("tiny", dtype="float32", vocab_size=64, **model)
    tx, schedule = train.make_optimizer(optim_config(), total_steps)
    model_ = llama.create(cfg, mesh, seed=seed)
    graphdef, params = nnx.split(model_)
    params = nnx.to_pure_dict(params)
    param_shardings = jax.tree.map(lambda x: x.sharding, params)
    shardings = train.state_shardings_for(param_shardings, params, tx)
    state = train.init_state(params, tx, shardings, seed)
    batch_sharding = sharding.batch_sharding(mesh)
    step_fn, eval_fn = train.jit_steps(
        graphdef, tx, schedule, microbatches, shardings, batch_sharding
    )
    return state, step_fn, eval_fn, batch_sharding


def base_config(name: str = "base"):
    """configs/<name>.py's get_config() (configs/ is not a package: loaded by path)."""
    spec = importlib.util.spec_from_file_location(f"{name}_config", ROOT / f"configs/{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def demo_corpus(directory: pathlib.Path, *, n_train: int = 400, n_val: int = 60):
    """Write train/validation JSONL and a trained tokenizer; return (train, val, tok_dir, vocab)."""
    train_rows, val_rows, _ = demo_data.make_splits(0, n_train, n_val, 0)
    texts = [r["instruction"] + "\n" + r["response"] for r in train_rows]
    tok_dir = directory / "tokenizer"
    vocab = demo_data.train_tokenizer(texts, tok_dir, vocab_size=320)
    return (
        demo_data.write_jsonl(train_rows, directory / "train.jsonl"),
        demo_data.write_jsonl(val_rows, directory / "val.jsonl"),
        tok_dir,
        vocab,
    )


def short_run(train, validation, tokenizer, vocab: int = 0, **extra) -> dict:
    """Config overrides of a 16-step tiny run: eval and checkpoint every 4 steps, all kept."""
    values = {
        "data.train_files": str(train),
        "data.validation_files": str(validation),
        "data.tokenizer": str(tokenizer),
        "data.seq_len": 128,
        "data.num_epochs": 20,
        "model.vocab_size": vocab,
        "model.dtype": "float32",
        "train.batch_size": 8,
        "train.num_steps": 16,
        "train.log_every_steps": 1,
        "eval.every_steps": 4,
        "eval.batch_size": 8,
        "eval.patience": 100,
        "optim.lr": 3e-3,
        "optim.warmup_ratio": 0.0,
        "checkpoint.max_to_keep": 10,
        "checkpoint.export_hf": False,
    }
    return {**values, **extra}


def config_with(values: dict):
    """configs/base.py with `{"section.key": value}` overrides applied."""
    config = base_config()
    for dotted, value in values.items():
        *sections, key = dotted.split(".")
        node = config
        for section in sections:
            node = node[section]
        node[key] = value
    return config


def main_command(workdir, values: dict, *flags: str) -> list[str]:
    """`python -m sftjax.main` on configs/base.py with `values` as --config.* overrides."""
    return [
        sys.executable,
        "-m",
        "sftjax.main",
        f"--config={ROOT / 'configs/base.py'}",
        f"--workdir={workdir}",
        *flags,
        *(f"--config.{k}={v}" for k, v in values.items()),
    ]


def train_losses(workdir) -> dict[int, float]:
    """{step: train loss} from a workdir's metrics.jsonl (local or gs://)."""
    from sftjax import metrics

    records = metrics.read_records(workdir / "metrics.jsonl")
    return {r["step"]: r["loss"] for r in records if r["split"] == "train"}


def wait_for_step(workdir, step: int, processes, timeout: float = 240) -> None:
    """Until metrics.jsonl shows `step` trained; fails if a process ended first."""
    processes = processes if isinstance(processes, list) else [processes]
    deadline = time.time() + timeout
    while time.time() < deadline:
        for p in processes:
            assert p.poll() is None, p.communicate()[0]
        if (workdir / "metrics.jsonl").exists() and max(train_losses(workdir) or [0]) >= step:
            return
        time.sleep(0.05)
    raise TimeoutError(f"step {step} not reached")


def with_random_b(adapters: dict, seed: int, scale: float = 0.3) -> dict:
    """`adapters` with every B drawn from N(0, scale²) in its own sharding (A stays as drawn):
    a zero B would make any LoRA comparison unable to fail."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(adapters)
    key = jax.random.key(seed)
    leaves = []
    for i, (path, x) in enumerate(flat):
        if path[-1].key == "b":
            x = jax.device_put(
                scale * jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype), x.sharding
            )
        leaves.append(x)
    return jax.tree.unflatten(treedef, leaves)

"""Honest throughput numbers and where metrics go: metrics.jsonl, TensorBoard, a loss plot.

Owns the FLOPs formula behind MFU and the writers. It does not decide when to log (train.py).
Only process 0 writes; other processes get a writer that does nothing.
"""

import json
import logging
import math
import os
import pathlib
import tempfile

import jax

from sftjax import paths
from sftjax.model import llama, lora

log = logging.getLogger("sftjax")

# Dense bf16 peak TFLOP/s per chip by `device_kind` prefix (vendor data sheets, no sparsity).
PEAK_TFLOPS = {
    "NVIDIA H200": 989.0,
    "NVIDIA H100": 989.0,
    "NVIDIA A100": 312.0,
    "TPU v4": 275.0,
    "TPU v5 lite": 197.0,
    "TPU v5e": 197.0,
    "TPU v5p": 459.0,
    "TPU v5": 459.0,
    "TPU v6 lite": 918.0,
    "TPU v6e": 918.0,
}


def flops_per_token(cfg: llama.LlamaConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6·N_matmul + 6·layers·heads·head_dim·seq_len (causal attention).

    6·N counts forward (2·N) and backward (4·N) multiply-adds of every weight matrix that a
    token goes through (the embedding lookup is a gather, so it is excluded unless tied and
    used as the output head). Attention scores and the weighted sum are 2 matmuls of
    seq_len·head_dim per head: 4·seq_len·H·N forward, ×3 with backward = 12·L·N·H·seq_len;
    causal masking halves the useful part, giving 6·L·N·H·seq_len. With packing we still
    count the full row (the kernel computes it); this is the conventional MFU numerator.
    Under LoRA the frozen weights need no weight gradient: 4·N (forward, input gradient) for
    them plus 6 per adapter parameter, so a LoRA step is not credited with work it skips.
    """
    matmul_params = cfg.num_params - cfg.vocab_size * cfg.embed_dim * (not cfg.tie_embeddings)
    attention = 6 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq_len
    if cfg.lora_rank:
        return 4.0 * matmul_params + 6.0 * lora.num_params(cfg) + attention
    return 6.0 * matmul_params + attention


def peak_flops_per_device(override_tflops: float = 0.0) -> float | None:
    """Peak bf16 FLOP/s of one local device, or None where unknown (CPU)."""
    if override_tflops > 0:
        return override_tflops * 1e12
    kind = jax.devices()[0].device_kind
    for prefix, tflops in PEAK_TFLOPS.items():
        if kind.startswith(prefix):
            return tflops * 1e12
    return None


def mfu(tokens_per_s: float, flops_token: float, peak_per_device: float | None) -> float:
    """Model FLOPs utilisation over all devices; NaN where the peak is unknown (logged as null)."""
    if not peak_per_device:
        return math.nan
    return tokens_per_s * flops_token / (peak_per_device * jax.device_count())


class MetricsWriter:
    """Appends {"step", "split", ...} records to metrics.jsonl and TensorBoard (process 0 only).

    Object storage cannot append, so for a remote workdir (gs://) the files live in a local
    directory and `sync()` copies them up (the loop calls it after every checkpoint save).
    """

    def __init__(self, workdir, *, resume_step: int = 0):
        self.enabled = jax.process_index() == 0
        self.workdir = paths.resolve(workdir)
        self._remote = paths.is_remote(self.workdir)
        self._tb = None
        if not self.enabled:
            return
        local = tempfile.mkdtemp(prefix="sftjax-metrics-") if self._remote else self.workdir
        self.local_dir = pathlib.Path(local)
        self.local_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.local_dir / "metrics.jsonl"
        if self._remote and (self.workdir / "metrics.jsonl").exists():
            (self.workdir / "metrics.jsonl").copy(paths.Path(self.path), overwrite=True)
        _drop_records_after(self.path, resume_step)
        from tensorboardX import SummaryWriter

        self._tb = SummaryWriter(str(self.local_dir / "tensorboard"), purge_step=resume_step + 1)

    def write(self, step: int, split: str, values: dict) -> None:
        if not self.enabled:
            return
        record = {"step": step, "split": split, **values}
        with self.path.open("a") as f:
            f.write(json_line(record))
        for key, value in values.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                self._tb.add_scalar(f"{split}/{key}", value, step)
            elif isinstance(value, str):
                self._tb.add_text(f"{split}/{key}", value, step)
        self._tb.flush()

    def plot(self, best_step: int | None) -> None:
        """loss.png beside metrics.jsonl: train vs validation, the best step marked."""
        if self.enabled:
            plot_losses(self.path, self.local_dir / "loss.png", best_step)
            self.sync()

    def sync(self) -> None:
        """Copy the local files to a remote workdir (no-op for a local one)."""
        if self.enabled and self._remote:
            self._tb.flush()
            paths.upload_tree(self.local_dir, self.workdir)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self.sync()
            self._tb = None


def json_line(record: dict) -> str:
    """One JSONL line; non-finite floats become null (JSON has no NaN, e.g. MFU on a CPU)."""
    clean = {
        k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()
    }
    return json.dumps(clean, allow_nan=False) + "\n"


def _parse_lines(path: pathlib.Path) -> tuple[list[dict], list[str], bool]:
    """(records, broken lines as "path:line: why", whether the last line is torn).

    A last line without its newline that does not parse is what a crash mid-write leaves.
    """
    lines = paths.resolve(path).read_bytes().decode("utf-8", errors="replace").split("\n")
    records, broken, torn = [], [], False
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise ValueError("not a record with an integer step")
        except ValueError as e:
            if number == len(lines):
                torn = True
            else:
                broken.append(f"{path}:{number}: unreadable line ({e})")
            continue
        records.append(record)
    return records, broken, torn


def _drop_records_after(path: pathlib.Path, step: int) -> None:
    """On resume, forget what a killed run logged past its last checkpoint (it is redone).

    Lines a crash left broken are dropped with a warning: metrics are a log, not state. The
    rewrite goes to a temporary file that replaces the old one, so a crash here loses nothing.
    """
    if not path.exists():
        return
    records, broken, torn = _parse_lines(path)
    for problem in broken:
        log.warning("metrics: dropped %s", problem)
    if torn:
        log.warning("metrics: dropped the torn last line of %s (a crash mid-write)", path)
    kept = [r for r in records if r["step"] <= step]
    if len(kept) == len(records) and not broken and not torn:
        return
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with tmp.open("w", encoding="utf-8") as f:
        f.write("".join(json_line(r) for r in kept))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_records(path: pathlib.Path) -> list[dict]:
    """All records of a metrics.jsonl; a torn last line (a crash mid-write) is left out."""
    records, broken, _ = _parse_lines(paths.resolve(path))
    if broken:
        raise ValueError("; ".join(broken))
    return records


def plot_losses(metrics_path: pathlib.Path, out_png: pathlib.Path, best_step: int | None) -> None:
    """Train vs validation loss with the best step marked (matplotlib, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_records(metrics_path)
    train = [(r["step"], r["loss"]) for r in records if r["split"] == "train" and "loss" in r]
    val = [(r["step"], r["loss"]) for r in records if r["split"] == "eval" and "loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train, strict=True), label="train", alpha=0.7)
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="validation")
    if best_step is not None:
        ax.axvline(best_step, color="green", linestyle="--", label=f"best step {best_step}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (token-weighted cross-entropy)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)

"""The README's main command, end to end, as a user runs it: one CPU device, no shared data,
no PyTorch (the runtime install has none)."""

import json
import os
import subprocess
import sys

from train_fixtures import ROOT, base_config

from sftjax import metrics

# The floor for held-out exact match (chance is ~17 %: first letters, small counts).
ACCURACY_FLOOR = 0.40
# `python -m sftjax.demo` where `import torch` fails, as it does in the runtime install.
WITHOUT_TORCH = (
    "import runpy, sys; sys.modules['torch'] = None; runpy.run_module('sftjax.demo', "
    "run_name='__main__', alter_sys=True)"
)


def test_demo_learns_to_follow_unseen_instructions(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "0"  # measure the demo users get, at full speed
    workdir = tmp_path / "demo"
    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_TORCH, f"--workdir={workdir}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    print(done.stdout)
    # Nothing about the demo's own data or a PyTorch it does not use: its split has no leaks.
    assert "PyTorch was not found" not in done.stderr and "leak into" not in done.stderr
    assert "leakage: 0 of 200 validation rows" in done.stderr

    results = json.loads((workdir / "demo_results.json").read_text())
    evals = [r for r in metrics.read_records(workdir / "metrics.jsonl") if r["split"] == "eval"]
    # Overfitting became visible and stopped it: the last `patience` evaluations did not beat
    # the best before them by more than min_delta. The restored best is the lowest loss saved,
    # which may be one of those (an improvement too small to reset patience).
    assert results["stop_reason"] == "early_stopping"
    tiny = base_config("tiny")
    losses = [r["loss"] for r in evals]
    patience, min_delta = tiny.eval.patience, tiny.eval.min_delta
    assert len(losses) > patience
    assert min(losses[-patience:]) >= min(losses[:-patience]) - min_delta
    assert min(r["loss"] for r in evals) < 0.5 * evals[0]["loss"]  # validation loss fell
    assert results["best_val_loss"] == min(r["loss"] for r in evals)
    test_rows = (workdir / "demo_rows/test.jsonl").read_text().splitlines()
    tasks = [json.loads(line)["task"] for line in test_rows]
    assert len(set(tasks)) == 10 and min(tasks.count(t) for t in set(tasks)) >= 20
    assert results["accuracy"]["overall"] >= ACCURACY_FLOOR, results["accuracy"]
    assert "held-out exact match" in done.stdout and (workdir / "hf_export/config.json").exists()


def test_demo_refuses_a_key_out_of_range_before_writing_anything(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "sftjax.demo", f"--workdir={tmp_path / 'demo'}"]
        + ["--config.train.batch_size=0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.strip().splitlines() == [
        "error: invalid config: config.train.batch_size=0: must be an integer >= 1"
    ]
    assert not (tmp_path / "demo").exists()

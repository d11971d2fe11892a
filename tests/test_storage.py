"""gs:// end to end against a local GCS emulator: workdir, data, tokenizer, model and export.

Owns: a run whose every path is a `gs://` URL trains, survives kill -9 and resumes to the same
losses as the same run on local disk; its export in the bucket is byte-identical to the local
one and loads in transformers after a copy; no local directory named `gs:` ever appears.
The emulator (gcp-storage-emulator, test extra) listens on 127.0.0.1 only (tests/gcs_fixtures.py).
"""

import shutil
import signal
import subprocess
import time

import jax
import numpy as np
import pytest
from gcs_fixtures import BUCKET, running_emulator
from multihost_fixtures import device_env
from train_fixtures import ROOT, demo_corpus, main_command, short_run, train_losses

from sftjax import paths, sharding
from sftjax.model import hf_export, llama


@pytest.fixture(scope="module")
def emulator():
    """A GCS emulator on 127.0.0.1; this process and its children talk to it alone."""
    with running_emulator() as env:
        yield env


@pytest.fixture(scope="module")
def sources(emulator, tmp_path_factory):
    """Local corpus + tiny HF model, and the same files uploaded under gs://BUCKET/inputs."""
    local = tmp_path_factory.mktemp("inputs")
    train, val, tok_dir, vocab = demo_corpus(local, n_train=200, n_val=40)
    cfg = llama.preset("tiny", vocab_size=vocab, dtype="float32")
    model = llama.create(cfg, sharding.make_mesh(devices=jax.devices()[:1]), seed=3)
    hf_export.save_pretrained(model, local / "model", dtype="float32")
    remote = paths.resolve(f"gs://{BUCKET}/inputs")
    paths.upload_tree(local, remote)
    return local, remote


def run_command(workdir, data_root) -> list[str]:
    values = short_run(
        f"{data_root}/train*.jsonl",
        f"{data_root}/val.jsonl",
        f"{data_root}/tokenizer",
        **{"model.hf_path": f"{data_root}/model", "checkpoint.export_hf": True},
        **{"checkpoint.export_dtype": "float32", "checkpoint.max_to_keep": 2},
    )
    return main_command(workdir, values)


def losses(workdir) -> list[float]:
    train = train_losses(paths.resolve(workdir))
    assert sorted(train) == list(range(1, 17))
    return [train[s] for s in range(1, 17)]


@pytest.mark.slow
def test_gs_workdir_data_model_and_export_survive_kill_and_match_local(sources, tmp_path):
    local_inputs, remote_inputs = sources
    env = device_env(8)
    local_run = tmp_path / "local"
    done = subprocess.run(
        run_command(local_run, local_inputs), env=env, cwd=tmp_path, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]

    remote_run = paths.resolve(f"gs://{BUCKET}/runs/one")
    first = subprocess.Popen(
        run_command(remote_run, remote_inputs),
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.time() + 300
    while not (remote_run / "checkpoints" / "8").exists():  # metrics sync with checkpoints
        assert first.poll() is None, first.communicate()[0][-3000:]
        assert time.time() < deadline, "no checkpoint at step 8 in the bucket"
        time.sleep(0.2)
    first.send_signal(signal.SIGKILL)
    first.wait()

    second = subprocess.run(
        run_command(remote_run, remote_inputs),
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from step" in second.stderr
    np.testing.assert_array_equal(losses(remote_run), losses(local_run))
    assert not any(p.name.startswith("gs:") for p in tmp_path.iterdir())
    assert not (ROOT / "gs:").exists()
    for name in ("loss.png", "tensorboard"):
        assert (remote_run / name).exists(), name

    # The export in the bucket is the local run's export, byte for byte, and loads after a copy.
    copied = tmp_path / "copied_export"
    copied.mkdir()
    for item in (remote_run / "hf_export").iterdir():
        item.copy(paths.Path(copied / item.name))
    local_export = local_run / "hf_export"
    assert sorted(p.name for p in copied.iterdir()) == sorted(
        p.name for p in local_export.iterdir()
    )
    for item in local_export.iterdir():
        assert (copied / item.name).read_bytes() == item.read_bytes(), item.name
    import torch
    import transformers

    hf = transformers.LlamaForCausalLM.from_pretrained(copied)
    with torch.no_grad():
        logits = hf(torch.arange(1, 9)[None]).logits
    assert torch.isfinite(logits).all()
    shutil.rmtree(copied)

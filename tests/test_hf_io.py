"""HF safetensors in/out: parity with transformers' PyTorch Llama, round trips, bad inputs."""

import json
import logging
import pathlib

import jax
import numpy as np
import pytest
import safetensors.numpy
from hf_fixtures import hf_logits, make_hf_llama, our_logits, relative_error

from sftjax import sharding
from sftjax.model import hf_export, hf_io

torch = pytest.importorskip("torch", reason="torch (CPU) is in the test extra for HF parity")
transformers = pytest.importorskip("transformers")

TOKENS = np.random.default_rng(0).integers(0, 96, size=(2, 24))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> pathlib.Path:
    directory = tmp_path_factory.mktemp("hf_tiny")
    make_hf_llama(directory)
    return directory


@pytest.fixture(scope="module")
def hf_model(hf_dir):
    return transformers.LlamaForCausalLM.from_pretrained(hf_dir).float().eval()


@pytest.mark.parametrize("scan_layers", [False, True])
def test_load_matches_hf_logits(hf_dir, hf_model, scan_layers):
    model = hf_io.load_pretrained(hf_dir, dtype="float32", scan_layers=scan_layers)
    error = relative_error(our_logits(model, TOKENS), hf_logits(hf_model, TOKENS))
    print(f"max relative logit error vs HF (scan_layers={scan_layers}): {error:.2e}")
    assert error < 1e-4


def test_scanned_and_unscanned_give_identical_logits(hf_dir):
    plain = hf_io.load_pretrained(hf_dir, dtype="float32", scan_layers=False)
    scanned = hf_io.load_pretrained(hf_dir, dtype="float32", scan_layers=True)
    np.testing.assert_allclose(our_logits(scanned, TOKENS), our_logits(plain, TOKENS), atol=1e-5)


def test_tied_embeddings_match_hf(tmp_path):
    hf_model = make_hf_llama(tmp_path, tie=True, seed=1)
    model = hf_io.load_pretrained(tmp_path, dtype="float32")
    assert model.cfg.tie_embeddings and not hasattr(model, "lm_head")
    assert relative_error(our_logits(model, TOKENS), hf_logits(hf_model, TOKENS)) < 1e-4


@pytest.mark.parametrize("scan_layers", [False, True])
def test_save_then_hf_loads_same_logits(hf_dir, tmp_path, scan_layers):
    model = hf_io.load_pretrained(hf_dir, dtype="float32", scan_layers=scan_layers)
    out = hf_export.save_pretrained(model, tmp_path / "export")
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
    ]
    reloaded = transformers.LlamaForCausalLM.from_pretrained(out).float().eval()
    assert relative_error(hf_logits(reloaded, TOKENS), our_logits(model, TOKENS)) < 1e-4
    # and back into ours, bit for bit
    again = hf_io.load_pretrained(out, dtype="float32", scan_layers=not scan_layers)
    np.testing.assert_allclose(our_logits(again, TOKENS), our_logits(model, TOKENS), atol=1e-5)


def test_sharded_export_with_index_and_tokenizer(hf_dir, hf_model, tmp_path):
    model = hf_io.load_pretrained(hf_dir, dtype="float32")
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    (tok_dir / "tokenizer_config.json").write_text("{}")
    out = hf_export.save_pretrained(
        model, tmp_path / "export", max_shard_bytes=40_000, tokenizer_dir=tok_dir, dtype="bfloat16"
    )
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and all((out / f).exists() for f in files)
    assert files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert (out / "tokenizer_config.json").exists()
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    reloaded = transformers.LlamaForCausalLM.from_pretrained(out).float().eval()
    # bf16 storage: agreement to bf16 precision only
    assert relative_error(hf_logits(reloaded, TOKENS), hf_logits(hf_model, TOKENS)) < 3e-2


def test_load_places_params_in_mesh_sharding(hf_dir, hf_model, caplog):
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    hf_io.load_pretrained(hf_dir, mesh=mesh, dtype="float32", scan_layers=True)
    # A second load (LoRA's export reads the base again) reuses every compiled stacking.
    with jax.log_compiles(True), caplog.at_level(logging.WARNING):
        model = hf_io.load_pretrained(hf_dir, mesh=mesh, dtype="float32", scan_layers=True)
    assert not [r.getMessage() for r in caplog.records if "Compiling" in r.getMessage()]
    gate = model.layers.mlp.gate[...]
    assert gate.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    assert gate.addressable_shards[0].data.shape == (2, 32, 48)  # [L, D/fsdp, F/tensor]
    single = hf_io.load_pretrained(hf_dir, dtype="float32", scan_layers=True)
    np.testing.assert_allclose(our_logits(model, TOKENS), our_logits(single, TOKENS), atol=1e-5)


def test_interrupted_export_leaves_previous_export_intact(hf_dir, tmp_path, monkeypatch):
    model = hf_io.load_pretrained(hf_dir, dtype="float32")
    out = hf_export.save_pretrained(model, tmp_path / "export")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    calls = []

    def dies_on_second_shard(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated kill during export")
        real_save(tensors, filename, metadata=metadata)

    real_save = safetensors.numpy.save_file
    monkeypatch.setattr(safetensors.numpy, "save_file", dies_on_second_shard)
    with pytest.raises(KeyboardInterrupt):
        hf_export.save_pretrained(model, out, overwrite=True, max_shard_bytes=40_000)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    with pytest.raises(FileExistsError):
        hf_export.save_pretrained(model, out)


def test_missing_directory():
    with pytest.raises(hf_io.CheckpointError, match="no such directory"):
        hf_io.load_pretrained("/nonexistent/llama")


def test_pickle_only_directory_is_refused(hf_dir, tmp_path):
    (tmp_path / "config.json").write_text((hf_dir / "config.json").read_text())
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(hf_io.CheckpointError, match="pickle.*save_pretrained"):
        hf_io.load_pretrained(tmp_path)


def _copy_with(hf_dir, tmp_path, edit_tensors=None, edit_config=None) -> pathlib.Path:
    tensors = safetensors.numpy.load_file(hf_dir / "model.safetensors")
    config = json.loads((hf_dir / "config.json").read_text())
    if edit_tensors:
        edit_tensors(tensors)
    if edit_config:
        edit_config(config)
    safetensors.numpy.save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


def test_missing_tensor_is_named(hf_dir, tmp_path):
    bad = _copy_with(
        hf_dir, tmp_path, edit_tensors=lambda t: t.pop("model.layers.1.mlp.up_proj.weight")
    )
    with pytest.raises(
        hf_io.CheckpointError, match=r"missing tensor model\.layers\.1\.mlp\.up_proj"
    ):
        hf_io.load_pretrained(bad)


def test_wrong_shape_names_tensor_and_both_shapes(hf_dir, tmp_path):
    bad = _copy_with(hf_dir, tmp_path, edit_config=lambda c: c.update(intermediate_size=80))
    with pytest.raises(hf_io.CheckpointError, match=r"gate_proj.*\(96, 64\).*\(64, 80\)"):
        hf_io.load_pretrained(bad)


def test_unexpected_tensor_is_refused(hf_dir, tmp_path):
    def add_bias(t):
        t["model.layers.0.self_attn.q_proj.bias"] = np.zeros(64, np.float32)

    bad = _copy_with(hf_dir, tmp_path, edit_tensors=add_bias)
    with pytest.raises(hf_io.CheckpointError, match="q_proj.bias"):
        hf_io.load_pretrained(bad)

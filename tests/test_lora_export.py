"""LoRA exports in Hugging Face's own loaders: PEFT reads the adapter directory, transformers the
merged model, and both compute the logits sftjax computes (fp32, max abs difference <= 1e-4).

B is random and non-zero throughout: with PEFT's zero init the adapters would be invisible and
a transposed or misnamed tensor could not fail these tests (each checks that it would show).
"""

import json

import jax
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx
from hf_fixtures import hf_logits, make_hf_llama, our_logits, relative_error
from train_fixtures import config_with, demo_corpus, short_run, with_random_b

from sftjax import base_model, loop, sharding
from sftjax import config as config_lib
from sftjax.model import hf_export, hf_io, llama, merge

torch = pytest.importorskip("torch", reason="torch (CPU) is in the test extra for HF parity")
transformers = pytest.importorskip("transformers", reason="transformers loads the merged export")
peft = pytest.importorskip("peft", reason="peft is in the test extra for the LoRA round trip")

TOL = 1e-4  # fp32 on both sides
# The parity tests' odd shapes: GQA (4 query heads over 2 kv heads), and head_dim 24, which
# is not hidden_size / heads (16), so heads x head_dim (96) differs from the embedding (64).
# Weights of std 0.05 (HF's default 0.02) make logits of order 1, so 1e-4 is a tight bound.
ODD_SHAPES = dict(head_dim=24, initializer_range=0.05)
TOKENS = np.random.default_rng(0).integers(0, 96, size=(2, 24))
RANK, ALPHA = 3, 5.0


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("hf_lora_base")
    make_hf_llama(directory, **ODD_SHAPES)
    return directory


def lora_values(hf_dir, **extra) -> dict:
    """Config overrides of an fp32 LoRA run on the HF model at `hf_dir`."""
    return {
        "model.hf_path": str(hf_dir),
        "model.lora.rank": RANK,
        "model.lora.alpha": ALPHA,
        "model.base_dtype": "float32",
        "model.param_dtype": "float32",
        "model.dtype": "float32",
        "model.remat": "none",
        "model.attention": "xla",
        **extra,
    }


def lora_model(hf_dir, mesh, seed: int = 0, **extra) -> llama.Llama:
    """The base read from `hf_dir` by the run's own path (base_model.initial_params) with fresh
    adapters beside it, B made non-zero."""
    config = config_with(lora_values(hf_dir, **extra))
    cfg = config_lib.model_config(config.model)
    rules = config_lib.sharding_rules(config)
    adapters, base = base_model.initial_params(config, cfg, mesh, rules)
    graphdef, _, _ = nnx.split(llama.abstract(cfg, mesh, rules), nnx.LoRAParam, ...)
    return nnx.merge(graphdef, with_random_b(adapters, seed), base)


def load_peft(base_dir, adapter_dir):
    base = transformers.LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    return peft.PeftModel.from_pretrained(base, adapter_dir).eval()


def assert_peft_holds_exactly(peft_model, adapter_dir, modules: set[str]) -> None:
    """PEFT put every tensor of the file in place (a missing key is only a warning there) and
    adapted exactly the `modules` the adapter config names."""
    written = safetensors.numpy.load_file(adapter_dir / "adapter_model.safetensors")
    loaded = peft.get_peft_model_state_dict(peft_model)
    assert sorted(loaded) == sorted(written)
    for name, value in written.items():
        np.testing.assert_array_equal(loaded[name].numpy(), value, err_msg=name)
    adapted = {
        name.rsplit(".", 1)[-1]
        for name, module in peft_model.named_modules()
        if isinstance(module, peft.tuners.lora.LoraLayer)
    }
    assert adapted == modules


def max_diff(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max())


@pytest.mark.parametrize(
    "scan_layers, targets, mesh_axes",
    [
        (False, "all", dict(data=1, fsdp=1, tensor=1)),
        (True, "all", dict(data=2, fsdp=2, tensor=2)),  # adapters sharded, gathered on export
        (True, "q,v", dict(data=1, fsdp=1, tensor=1)),  # PEFT's target_modules
    ],
)
def test_peft_loads_adapter_with_our_logits(hf_dir, tmp_path, scan_layers, targets, mesh_axes):
    devices = jax.devices()[: np.prod(list(mesh_axes.values()))]
    mesh = sharding.make_mesh(**mesh_axes, devices=devices)
    model = lora_model(
        hf_dir, mesh, **{"model.scan_layers": scan_layers, "model.lora.targets": targets}
    )
    ours = our_logits(model, TOKENS)
    adapter_dir = hf_export.save_adapter(
        model, tmp_path / "adapter", base_model_name_or_path=str(hf_dir)
    )

    settings = json.loads((adapter_dir / "adapter_config.json").read_text())
    modules = {"q": {"q_proj", "v_proj"}}.get(
        targets[0], {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    )
    assert (settings["r"], settings["lora_alpha"]) == (RANK, ALPHA)
    assert set(settings["target_modules"]) == modules
    assert settings["base_model_name_or_path"] == str(hf_dir)

    peft_model = load_peft(hf_dir, adapter_dir)
    assert_peft_holds_exactly(peft_model, adapter_dir, modules)
    theirs = hf_logits(peft_model, TOKENS)
    with peft_model.disable_adapter():
        base_only = hf_logits(peft_model, TOKENS)
    diff, effect = max_diff(ours, theirs), max_diff(theirs, base_only)
    where = f"{scan_layers=}, {targets=}, {mesh_axes}"
    print(f"PEFT vs sftjax ({where}): {diff:.2e} (adapters move logits {effect:.2e})")
    assert effect > 100 * TOL  # the adapters move the logits far more than the tolerance
    assert diff <= TOL


@pytest.mark.parametrize(
    "scan_layers, targets",
    [(False, "all"), (True, "all"), (True, "q,v")],
)
def test_merged_export_equals_adapters_and_peft_merge(hf_dir, tmp_path, scan_layers, targets):
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    model = lora_model(
        hf_dir, mesh, seed=1, **{"model.scan_layers": scan_layers, "model.lora.targets": targets}
    )
    ours = our_logits(model, TOKENS)
    merged_dir = hf_export.save_pretrained(
        merge.merge_lora(model), tmp_path / "merged", dtype="float32"
    )
    merged = transformers.LlamaForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    diff = max_diff(hf_logits(merged, TOKENS), ours)
    print(f"merged export in transformers vs sftjax LoRA ({scan_layers=}): {diff:.2e}")
    assert diff <= TOL

    # PEFT's own merge of our adapter gives the weights we wrote, tensor by tensor.
    adapter_dir = hf_export.save_adapter(model, tmp_path / "adapter")
    peft_merged = load_peft(hf_dir, adapter_dir).merge_and_unload().state_dict()
    written = safetensors.numpy.load_file(merged_dir / "model.safetensors")
    base = safetensors.numpy.load_file(hf_dir / "model.safetensors")
    assert sorted(written) == sorted(base)
    worst, changed = 0.0, 0
    for name, value in written.items():
        worst = max(worst, max_diff(peft_merged[name].numpy(), value))
        changed += not np.allclose(value, base[name], atol=1e-3)
    print(f"PEFT merge_and_unload vs our merged weights ({scan_layers=}): {worst:.2e}")
    assert worst <= 1e-6
    # every targeted projection of both layers moved; nothing else
    assert changed == 2 * len(model.cfg.lora_targets)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return demo_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.mark.slow  # 15 s on a 2-core box: 4 LoRA steps through fit, then both exports in torch
def test_fit_exports_adapter_and_merged_model_with_our_logits(corpus, tmp_path):
    """The base is fp32 on disk and held in bf16 while training (base_dtype's default): the
    merged export is the stored base + adapters, as PEFT computes it, not the bf16 copy's."""
    train_file, val_file, tok_dir, vocab = corpus
    base_dir = tmp_path / "base"
    make_hf_llama(base_dir, vocab_size=vocab, max_position_embeddings=128, **ODD_SHAPES)
    lora = {"model.lora.rank": 4, "model.lora.targets": "q,k,v,o,up"}
    values = short_run(
        train_file,
        val_file,
        tok_dir,
        **lora_values(base_dir, **lora, **{"model.base_dtype": "bfloat16"}),
        **{
            "train.num_steps": 4,
            "checkpoint.export_hf": True,
            "checkpoint.export_dtype": "float32",
        },
    )
    result = loop.fit(config_with(values), tmp_path / "run")
    assert result.stop_reason == "completed" and result.model.cfg.lora_rank == 4
    tokens = np.random.default_rng(1).integers(0, vocab, size=(2, 24))
    ours = our_logits(result.model, tokens)

    adapter_dir = tmp_path / "run" / "peft_adapter"
    settings = json.loads((adapter_dir / "adapter_config.json").read_text())
    modules = {"q_proj", "k_proj", "v_proj", "o_proj", "up_proj"}
    assert settings["base_model_name_or_path"] == str(base_dir)
    assert (settings["r"], settings["lora_alpha"]) == (4, ALPHA)
    assert set(settings["target_modules"]) == modules
    peft_model = load_peft(base_dir, adapter_dir)
    assert_peft_holds_exactly(peft_model, adapter_dir, modules)
    peft_logits = hf_logits(peft_model, tokens)

    merged = transformers.LlamaForCausalLM.from_pretrained(
        result.export_dir, dtype=torch.float32
    ).eval()
    merged_error = relative_error(hf_logits(merged, tokens), peft_logits)
    # Training moved B off zero: the trained model is not the base.
    base_logits = our_logits(hf_io.load_pretrained(base_dir, dtype="float32"), tokens)
    effect = max_diff(ours, base_logits)
    # What training computed (on the bf16 copy of the base) is PEFT's function up to bf16.
    bf16_error = relative_error(ours, peft_logits)
    print(f"fit: merged vs PEFT {merged_error:.2e} rel; ours (bf16 base) {bf16_error:.2e} rel")
    assert effect > 100 * TOL
    assert merged_error <= 1e-5 < bf16_error < 3e-2

"""The families people fine-tune (Llama-3.x rope scalings, Qwen2, Qwen3, Mistral) against
transformers' own classes: logits near position 0 and past 8k, packed rows, the export reloaded
by AutoModelForCausalLM, the LoRA adapter in PEFT, sliding windows, and what stays refused.

Every checkpoint is a tiny random one built by transformers' own config class (fp32).
"""

import dataclasses
import json
import shutil

import jax
import numpy as np
import pytest
from flax import nnx
from hf_fixtures import FAMILIES, hf_logits_at, make_hf_family, our_logits, relative_error
from train_fixtures import config_with, with_random_b

from sftjax import base_model, sharding
from sftjax import config as config_lib
from sftjax.model import attention, hf_export, hf_io, llama, merge, rope

torch = pytest.importorskip("torch", reason="torch (CPU) is in the test extra for HF parity")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

TOKENS = np.random.default_rng(0).integers(0, 96, size=(2, 12))
NEAR_0 = np.broadcast_to(np.arange(12), TOKENS.shape)
# Past llama3's 8192 and yarn's 4096. RoPE sees only distances, so row 0 spreads its tokens
# 1000 positions apart: distances up to 11000 cross the boundary where the scalings act.
BEYOND_8K = np.stack([9000 + 1000 * np.arange(12), 40000 + np.arange(12)])
SPLIT = 5  # packed rows: examples TOKENS[:, :5] and TOKENS[:, 5:], positions restarting


@pytest.fixture(scope="module", autouse=True)
def quick_compiles():
    """XLA without most optimisations: faster compiles on CPU, still real computation."""
    previous = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", previous)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """name -> (name, HF directory, the transformers model, ours loaded through hf_io), each
    built once. Half the families load with scanned layers and full remat."""
    cache = {}

    def build(name: str):
        if name not in cache:
            directory = tmp_path_factory.mktemp(name)
            hf_model = make_hf_family(directory, name)
            scanned = name in ("linear", "qwen3", "mistral")
            layout = dict(scan_layers=scanned, remat="full" if scanned else "none")
            model = hf_io.load_pretrained(directory, dtype="float32", **layout)
            cache[name] = name, directory, hf_model, model
        return cache[name]

    return build


@pytest.fixture(params=list(FAMILIES))
def family(request, built):
    return built(request.param)


def test_logits_match_transformers_near_0_beyond_8k_and_packed(family):
    name, _, hf_model, model = family
    near = relative_error(our_logits(model, TOKENS, NEAR_0), hf_logits_at(hf_model, TOKENS, NEAR_0))
    far = relative_error(
        our_logits(model, TOKENS, BEYOND_8K), hf_logits_at(hf_model, TOKENS, BEYOND_8K)
    )
    # Packed: each row holds two examples, positions restart, segment ids 1 and 2.
    positions = np.concatenate([NEAR_0[:, :SPLIT], NEAR_0[:, : 12 - SPLIT]], axis=1)
    segments = np.where(np.arange(12) < SPLIT, 1, 2)[None].repeat(2, 0)
    packed = our_logits(model, TOKENS, positions, segments)
    alone = np.concatenate(
        [
            hf_logits_at(hf_model, TOKENS[:, :SPLIT], NEAR_0[:, :SPLIT]),
            hf_logits_at(hf_model, TOKENS[:, SPLIT:], NEAR_0[:, : 12 - SPLIT]),
        ],
        axis=1,
    )
    packed_error = relative_error(packed, alone)
    print(
        f"{name}: vs transformers near 0 {near:.1e}, beyond 8k {far:.1e}, packed {packed_error:.1e}"
    )
    assert near <= 1e-4 and packed_error <= 1e-4
    assert far <= 1e-3


def test_family_fields_are_read(family):
    name, _, hf_model, model = family
    cfg = model.cfg
    expected = {
        "llama3": ("llama", False, False, "llama3", None),
        "linear": ("llama", False, False, "linear", None),
        "yarn": ("qwen2", True, False, "yarn", None),
        "qwen2": ("qwen2", True, False, None, None),
        "qwen3": ("qwen3", False, True, None, None),
        "mistral": ("mistral", False, False, None, 5),
    }[name]
    kind = cfg.rope_dict and cfg.rope_dict["rope_type"]
    assert (cfg.model_type, cfg.qkv_bias, cfg.qk_norm, kind, cfg.sliding_window) == expected
    assert cfg.num_params == llama.count_params(model) == hf_model.num_parameters()


@pytest.mark.parametrize("name", ["llama3", "mistral"])
def test_without_the_scaling_or_window_the_parity_would_fail(built, name):
    """The parity test can fail: the same weights without llama3's scaling (or Mistral's
    window) are far from transformers."""
    _, directory, hf_model, _ = built(name)
    plain = hf_io.load_pretrained(
        directory, dtype="float32", rope_scaling=None, sliding_window=None
    )
    positions = BEYOND_8K if name == "llama3" else NEAR_0
    reference = hf_logits_at(hf_model, TOKENS, positions)
    assert relative_error(our_logits(plain, TOKENS, positions), reference) > 1e-2


@pytest.mark.parametrize(
    "scaling",
    [
        None,
        dict(rope_type="linear", factor=4.0),
        dict(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=8192,
        ),
        dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=32768),
        dict(
            rope_type="yarn",
            factor=40.0,
            original_max_position_embeddings=4096,
            beta_fast=16,
            mscale=1.0,
            mscale_all_dim=0.5,
            truncate=False,
        ),
    ],
    ids=["default", "linear", "llama3", "yarn", "yarn-mscale"],
)
def test_rope_tables_equal_transformers_at_real_sizes(scaling):
    """Inverse frequencies and cos/sin scale at Llama-3/Qwen sizes (head_dim 128, 64)."""
    from transformers import modeling_rope_utils

    for head_dim, theta in ((128, 500000.0), (128, 1000000.0), (64, 10000.0)):
        hf = transformers.LlamaConfig(
            hidden_size=head_dim * 4,
            num_attention_heads=4,
            max_position_embeddings=131072,
            rope_parameters={"rope_type": "default", **(scaling or {}), "rope_theta": theta},
        )
        if scaling is None:
            compute = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding
            theirs, their_scale = compute.compute_default_rope_parameters(hf)
        else:
            compute = modeling_rope_utils.ROPE_INIT_FUNCTIONS[scaling["rope_type"]]
            theirs, their_scale = compute(hf)
        ours, scale = rope.inverse_frequencies(head_dim, theta, scaling)
        assert scale == pytest.approx(their_scale, rel=1e-12)
        # equal but for one ulp in a few entries (torch's fp32 pow rounds otherwise there)
        np.testing.assert_allclose(ours, theirs.numpy(), rtol=2.5e-7, atol=0)


def test_export_reloads_in_automodel_with_the_same_logits(family, tmp_path):
    name, _, hf_model, model = family
    out = hf_export.save_pretrained(model, tmp_path / "export")
    written = json.loads((out / "config.json").read_text())
    assert written["model_type"] == model.cfg.model_type
    assert written["architectures"] == [hf_io.ARCHITECTURES[model.cfg.model_type]]
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).float().eval()
    assert type(reloaded).__name__ == written["architectures"][0]
    error = relative_error(
        hf_logits_at(reloaded, TOKENS, NEAR_0), our_logits(model, TOKENS, NEAR_0)
    )
    # The same function as the original, rope scaling and window included, far out too.
    same = relative_error(
        hf_logits_at(reloaded, TOKENS, BEYOND_8K), hf_logits_at(hf_model, TOKENS, BEYOND_8K)
    )
    print(f"{name}: export reloaded by AutoModelForCausalLM {error:.1e} (vs the original {same})")
    assert error <= 1e-5 and same == 0.0
    layout = dict(scan_layers=model.cfg.scan_layers, remat=model.cfg.remat)
    assert hf_io.read_config(out, dtype="float32", **layout) == model.cfg


@pytest.mark.parametrize("name", ["llama3", "qwen2", "qwen3"])  # mistral names them as llama
def test_lora_adapter_in_peft_and_merged_export(name, tmp_path):
    """The adapter loads in PEFT with our logits; the merged export (biases, q/k norms carried
    through) reloads in transformers with them too."""
    base_dir = tmp_path / "base"
    make_hf_family(base_dir, name, seed=1)
    config = config_with(
        {
            "model.hf_path": str(base_dir),
            "model.lora.rank": 3,
            "model.lora.alpha": 5.0,
            "model.lora.targets": "all",
            "model.base_dtype": "float32",
            "model.dtype": "float32",
            "model.remat": "none",
            "model.attention": "xla",
        }
    )
    cfg = config_lib.model_config(config.model)
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    adapters, frozen = base_model.initial_params(config, cfg, mesh, sharding.DEFAULT_RULES)
    graphdef, _, _ = nnx.split(llama.abstract(cfg, mesh), nnx.LoRAParam, ...)
    model = nnx.merge(graphdef, with_random_b(adapters, seed=0), frozen)
    ours = our_logits(model, TOKENS, NEAR_0)

    adapter_dir = hf_export.save_adapter(model, tmp_path / "adapter")
    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft_model = peft.PeftModel.from_pretrained(base, adapter_dir).eval()
    theirs = hf_logits_at(peft_model, TOKENS, NEAR_0)
    with peft_model.disable_adapter():
        effect = relative_error(hf_logits_at(peft_model, TOKENS, NEAR_0), theirs)
    peft_error = relative_error(ours, theirs)

    merged_dir = hf_export.save_pretrained(merge.merge_lora(model), tmp_path / "merged")
    merged = transformers.AutoModelForCausalLM.from_pretrained(merged_dir).float().eval()
    merged_error = relative_error(hf_logits_at(merged, TOKENS, NEAR_0), ours)
    print(
        f"{name}: PEFT {peft_error:.1e}, merged export {merged_error:.1e} (LoRA moves {effect:.1e})"
    )
    assert effect > 1e-2  # the adapters move the logits far more than the tolerances
    assert peft_error <= 1e-4 and merged_error <= 1e-5


def test_sliding_window_exact_in_cached_decoding(tmp_path):
    """Greedy decoding with a KV cache under Mistral's window 5 (prompt + output 14 tokens)
    equals transformers' generate."""
    from sftjax import generate

    hf_model = make_hf_family(tmp_path, "mistral", seed=2, initializer_range=0.2)
    model = hf_io.load_pretrained(tmp_path, dtype="float32")
    prompts = [[1, 50, 7, 33], [1, 9, 81, 4, 70, 12]]
    ours = generate.generate(model, prompts, max_new_tokens=8, eos_id=-1)
    for prompt, got in zip(prompts, ours, strict=True):
        with torch.no_grad():
            out = hf_model.generate(
                torch.tensor([prompt]), do_sample=False, max_new_tokens=8, pad_token_id=0
            )
        assert got == out[0, len(prompt) :].tolist()


def test_window_at_least_the_sequence_changes_nothing(built):
    _, directory, _, _ = built("mistral")
    wide = hf_io.load_pretrained(directory, dtype="float32", sliding_window=12)
    none = hf_io.load_pretrained(directory, dtype="float32", sliding_window=None)
    np.testing.assert_array_equal(
        our_logits(wide, TOKENS, NEAR_0), our_logits(none, TOKENS, NEAR_0)
    )


def test_fused_kernels_apply_the_window_like_the_reference():
    """Splash (interpreted on CPU) with its local mask, and jax's cuDNN call's arguments (run by
    jax's own XLA implementation), give the reference's output on packed rows."""
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (1, 128, 2, 16))
    k, v = (jax.random.normal(key, (1, 128, 1, 16)) for key in keys[1:])
    segments = np.repeat(np.array([[1, 1, 2, 3, 3, 3, 0, 0]]), 16, axis=1)
    reference = attention.attend_xla(q, k, v, segments, window=5)
    splash = attention.attend_splash(q, k, v, segments, window=5, interpret=True)
    cudnn_args = attention.attend_cudnn(q, k, v, segments, window=5, implementation="xla")
    np.testing.assert_allclose(splash, reference, atol=2e-5)
    np.testing.assert_allclose(cudnn_args, reference, atol=2e-5)
    assert not np.allclose(reference, attention.attend_xla(q, k, v, segments), atol=1e-2)


def _llama3_hf(spelling: str) -> dict:
    rope = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0)
    rope.update(original_max_position_embeddings=8192)
    base = dict(
        model_type="llama",
        vocab_size=96,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=131072,
    )
    if spelling == "4.x":  # top-level theta, `type` the old name of rope_type
        return dict(base, rope_theta=500000.0, rope_scaling=dict(rope, type="llama3"))
    return dict(base, rope_parameters=dict(rope, rope_type="llama3", rope_theta=500000.0))


def test_both_rope_spellings_read_alike(tmp_path):
    """A Llama-3.1 config.json as transformers 4.x wrote it and as 5.x writes it."""
    old, new = (hf_io.config_from_hf(_llama3_hf(s)) for s in ("4.x", "5.x"))
    assert old == new and new.rope_theta == 500000.0
    assert new.rope_dict == dict(
        rope_type="llama3",
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=8192,
    )
    written = hf_io.config_to_hf(new, dtype="float32", bos_token_id=1, eos_token_id=2)
    assert written["rope_scaling"]["rope_type"] == "llama3" and written["rope_theta"] == 500000.0
    assert written["rope_parameters"]["rope_theta"] == 500000.0
    assert hf_io.config_from_hf(written) == new
    # 4.x qwen2: windowed only with use_sliding_window, and only layers >= max_window_layers
    qwen = dict(_llama3_hf("4.x"), model_type="qwen2", rope_scaling=None, sliding_window=4096)
    assert hf_io.config_from_hf(dict(qwen, use_sliding_window=False)).sliding_window is None
    every = dict(qwen, use_sliding_window=True, max_window_layers=0)
    assert hf_io.config_from_hf(every).sliding_window == 4096
    assert hf_io.config_from_hf(dict(every, max_window_layers=2)).sliding_window is None
    # Mistral v0.2+: sliding_window null is plain causal attention
    mistral = dict(qwen, model_type="mistral", sliding_window=None)
    assert hf_io.config_from_hf(mistral).sliding_window is None
    assert hf_io.config_from_hf(dict(mistral, sliding_window=4096)).sliding_window == 4096


REFUSED = {
    "gemma": dict(model_type="gemma"),
    "phi3": dict(model_type="phi3"),
    "mixtral": dict(model_type="mixtral"),
    "qwen2_moe": dict(model_type="qwen2_moe"),
    "dynamic": dict(rope_scaling=dict(rope_type="dynamic", factor=2.0)),
    "longrope": dict(rope_scaling=dict(rope_type="longrope", factor=2.0)),
    "unknown rope key": dict(rope_scaling=dict(rope_type="linear", factor=2.0, beta=1)),
    "attention_bias": dict(attention_bias=True),
    "mlp_bias": dict(mlp_bias=True),
    "partial rotary": dict(partial_rotary_factor=0.5),
    "gelu": dict(hidden_act="gelu"),
    "some layers windowed": dict(
        model_type="qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=1
    ),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_unsupported_families_and_flags_are_refused_in_one_line(name):
    hf = {**_llama3_hf("4.x"), "rope_scaling": None, **REFUSED[name]}
    with pytest.raises(hf_io.CheckpointError) as refusal:
        hf_io.config_from_hf(hf)
    message = str(refusal.value)
    print(f"{name}: {message}")
    assert "\n" not in message and len(message) < 300


def test_export_keeps_the_base_eos_list(built, tmp_path):
    _, directory, _, model = built("llama3")
    base = tmp_path / "base"
    shutil.copytree(directory, base)
    settings = {"eos_token_id": [90, 91, 92], "temperature": 0.6, "do_sample": True}
    (base / "generation_config.json").write_text(json.dumps(settings))
    out = hf_export.save_pretrained(model, tmp_path / "out", eos_token_id=93, base_dir=base)
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [90, 91, 92, 93] and generation["temperature"] == 0.6
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == [90, 91, 92, 93]
    loaded = transformers.GenerationConfig.from_pretrained(out)
    assert loaded.eos_token_id == [90, 91, 92, 93]
    assert hf_export.eos_token_ids(base, 91) == [90, 91, 92]
    assert hf_export.eos_token_ids(None, 2) == 2  # one id stays an int


def test_biases_and_qk_norms_are_not_weight_decayed():
    """AdamW's decay mask leaves biases and the q/k norms alone, as it does other norms."""
    from sftjax import train

    cfg = llama.LlamaConfig(
        vocab_size=96,
        embed_dim=64,
        mlp_dim=96,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        max_seq_len=64,
        model_type="qwen2",
        qkv_bias=True,
        scan_layers=True,
    )
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    attention_mask = train._decay_mask(nnx.to_pure_dict(nnx.state(llama.abstract(cfg, mesh))))
    attention_mask = attention_mask["layers"]["attention"]
    assert {k for k, decays in attention_mask.items() if decays} == {"q", "k", "v", "o"}
    qwen3 = llama.abstract(
        dataclasses.replace(cfg, model_type="qwen3", qkv_bias=False, qk_norm=True), mesh
    )
    qwen3_mask = train._decay_mask(nnx.to_pure_dict(nnx.state(qwen3)))["layers"]["attention"]
    assert not qwen3_mask["q_norm"]["weight"] and not qwen3_mask["k_norm"]["weight"]


def test_config_rope_scaling_sets_a_preset_and_must_agree_with_a_checkpoint(built):
    llama3 = _llama3_hf("5.x")["rope_parameters"]
    scaling = {k: v for k, v in llama3.items() if k != "rope_theta"}
    preset = config_lib.model_config(config_with({"model.rope_scaling": scaling}).model)
    assert preset.rope_dict == scaling and preset.model_type == "llama"
    _, directory, _, model = built("llama3")
    same = config_with({"model.hf_path": str(directory), "model.rope_scaling": scaling})
    assert config_lib.model_config(same.model).rope_dict == model.cfg.rope_dict
    other = dict(scaling, factor=4.0)
    with pytest.raises(ValueError, match="model.rope_scaling=.* but .*config.json has"):
        config_lib.model_config(
            config_with({"model.hf_path": str(directory), "model.rope_scaling": other}).model
        )

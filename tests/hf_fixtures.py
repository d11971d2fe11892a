"""Tiny random Hugging Face Llamas (torch, fp32) for parity tests; nothing is downloaded."""

import functools
import pathlib

import numpy as np


def make_hf_llama(directory: pathlib.Path, *, tie: bool = False, seed: int = 0, **overrides):
    """Save a random tiny `LlamaForCausalLM` (GQA 4/2, 2 layers) to `directory`; return it."""
    import torch
    import transformers

    torch.manual_seed(seed)
    fields = dict(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        rope_theta=5000.0,
        tie_word_embeddings=tie,
    )
    fields.update(overrides)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**fields)).float().eval()
    with torch.no_grad():  # norms default to ones; randomise so a transposed norm would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    model.save_pretrained(directory, safe_serialization=True)
    return model


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    """HF logits for unpacked rows [B, L] (positions 0..L-1, no padding)."""
    import torch

    with torch.no_grad():
        return model(torch.as_tensor(tokens, dtype=torch.long)).logits.float().numpy()


def relative_error(ours: np.ndarray, reference: np.ndarray) -> float:
    """max |ours - reference| / max |reference|."""
    return float(np.abs(np.asarray(ours) - reference).max() / np.abs(reference).max())


def our_logits(model, tokens, positions=None, segment_ids=None) -> np.ndarray:
    """Our logits under the model's own mesh; defaults: one unpadded example per row."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    tokens = jnp.asarray(tokens, jnp.int32)
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    if segment_ids is None:
        segment_ids = jnp.ones_like(tokens)
    mesh = jax.tree.leaves(nnx.state(model))[0].sharding.mesh
    with jax.set_mesh(mesh):
        out = _forward()(model, tokens, positions, segment_ids)
    return np.asarray(out, dtype=np.float32)


@functools.cache
def _forward():
    """One jitted forward for all tests, so repeated calls reuse compilations."""
    from flax import nnx

    return nnx.jit(
        lambda model, tokens, positions, segment_ids: model(tokens, positions, segment_ids)
    )


# The families of tests/test_families.py: (transformers config class name, its extra fields).
FAMILIES = {
    "llama3": (
        "LlamaConfig",
        dict(
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=500000.0,
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=8192,
            ),
            max_position_embeddings=131072,
        ),
    ),
    "linear": (
        "LlamaConfig",
        dict(rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=4.0)),
    ),
    "yarn": (
        "Qwen2Config",
        dict(
            rope_parameters=dict(
                rope_type="yarn",
                rope_theta=1000000.0,
                factor=4.0,
                original_max_position_embeddings=4096,
            ),
            max_position_embeddings=16384,
        ),
    ),
    "qwen2": ("Qwen2Config", dict(rope_parameters=dict(rope_type="default", rope_theta=1e6))),
    # head_dim 24 is not hidden / heads (16): q/k norms over 24, o_proj in from 4 x 24
    "qwen3": ("Qwen3Config", dict(head_dim=24)),
    "mistral": ("MistralConfig", dict(sliding_window=5)),  # smaller than the test rows
}


def make_hf_family(directory: pathlib.Path, family: str, *, seed: int = 0, **overrides):
    """Save a random tiny model of `family` (FAMILIES) built by transformers' own config class,
    norms and biases randomised (zeros and ones would hide a misplaced one); return it."""
    import torch
    import transformers

    class_name, fields = FAMILIES[family]
    torch.manual_seed(seed)
    fields = {
        "vocab_size": 96,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
        "rms_norm_eps": 1e-5,
        "initializer_range": 0.05,  # logits of order 1, so relative errors mean something
        **fields,
        **overrides,
    }
    hf_config = getattr(transformers, class_name)(**fields)
    model = transformers.AutoModelForCausalLM.from_config(hf_config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    model.save_pretrained(directory, safe_serialization=True)
    return model


def hf_logits_at(model, tokens: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """HF logits of unpadded rows [B, L] at explicit position ids."""
    import torch

    with torch.no_grad():
        out = model(
            torch.as_tensor(tokens, dtype=torch.long),
            position_ids=torch.as_tensor(np.ascontiguousarray(positions), dtype=torch.long),
        )
    return out.logits.float().numpy()

"""sftjax: supervised instruction fine-tuning of Llama-architecture models in JAX/Flax NNX."""

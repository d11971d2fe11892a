"""sftjax: supervised instruction fine-tuning of Llama-architecture models in JAX/Flax NNX.

Importing it hides one message of transformers: "PyTorch was not found. Models won't be
available...". sftjax uses transformers for tokenizers and config files only, never for its
PyTorch models, so without PyTorch (the runtime install has none) nothing it does is missing.
Every other transformers message still shows.
"""

import logging


def _not_the_pytorch_notice(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("PyTorch was not found.")


logging.getLogger("transformers").addFilter(_not_the_pytorch_notice)

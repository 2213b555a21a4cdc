"""Silence the library chatter a learner cannot act on (hub progress bars, import warnings)."""

import logging
import os
import warnings


def quiet() -> None:
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for name in (
        "transformers",
        "torchao",
        "torch._dynamo",
        "torch.utils._pytree",
        "huggingface_hub",
    ):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*TypedStorage is deprecated.*")
    # notebook 01 runs the deprecated torch.ao quantization on purpose, and says so
    warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass

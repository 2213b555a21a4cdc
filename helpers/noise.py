"""Silence the library chatter a learner cannot act on (hub progress bars, import warnings).

Each silenced message is named below with the reason it cannot be acted on; anything else a
library logs at warning level or above still shows. `quiet()` also sets $COURSE_QUIET, which
child processes inherit: `helpers/__init__.py` calls `quiet()` again in any process that starts
with it set (e.g. the tensor-parallel ranks, spawned fresh by torch.multiprocessing), before
torch or torchao is imported there.
"""

import contextlib
import logging
import os
import sys
import warnings

QUIET_ENV = "COURSE_QUIET"

# logger name → fragments of messages that logger emits which no learner can act on
_UNACTIONABLE = {
    # torchao's wheel ships optional kernels built for another Python (_C_mxfp8 is cpython-310) or
    # only for Hopper GPUs (_C_cutlass_90a). On other machines it logs "Failed to load …" at import
    # and carries on without them; the notebooks say which backends ran, so the lines add nothing.
    "torchao": ("Failed to load",),
    # torchao registers its Enum options with torch's pytree, which torch ≥ 2.11 deprecates for
    # Enums; a warning per enum per process that only torchao's maintainers can fix.
    "torch.utils._pytree": ("register_constant() on Enum subclasses is deprecated",),
}


class _DropMessages(logging.Filter):
    """Drop records whose message contains one of `fragments`; pass everything else."""

    def __init__(self, fragments: tuple[str, ...]):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(fragment in message for fragment in self.fragments)


def quiet() -> None:
    os.environ[QUIET_ENV] = "1"  # inherited by child processes (see the module docstring)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # also read by transformers
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # read when transformers is imported
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for name, fragments in _UNACTIONABLE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages(fragments))
    for name in ("transformers", "torch._dynamo", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*TypedStorage is deprecated.*")
    # notebook 01 runs the deprecated torch.ao quantization on purpose, and says so
    warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
    if "transformers" in sys.modules:  # else the environment above applies when it is imported
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()


@contextlib.contextmanager
def quiet_native_stderr():
    """`torch.profiler`'s C++ side (torch 2.13's kineto) prints a line to file descriptor 2 when
    a profile starts and stops: nothing a learner can act on, so fd 2 goes to /dev/null while the
    profile runs (Python's own errors still raise and show)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)

"""helpers.noise drops only the messages it names, in this process and in its children."""

import os
import subprocess
import sys

from helpers import REPO_ROOT

LOG_BOTH = """
import logging
logging.getLogger("torchao").warning("Failed to load /x/torchao/_C_mxfp8.so: cannot")
logging.getLogger("torchao").warning("a real torchao problem")
logging.getLogger("torch.utils._pytree").warning(
    "<enum 'K'> ... Calling register_constant() on Enum subclasses is deprecated"
)
logging.getLogger("torch.utils._pytree").warning("another pytree warning")
"""


def _stderr_of(code: str, **env) -> str:
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True,
        env={**os.environ, **env},
    )  # fmt: skip
    return done.stderr


def test_quiet_drops_only_the_named_messages():
    stderr = _stderr_of("from helpers import noise; noise.quiet()\n" + LOG_BOTH)
    assert "Failed to load" not in stderr and "register_constant" not in stderr
    assert "a real torchao problem" in stderr and "another pytree warning" in stderr


def test_a_child_of_a_quiet_process_is_quiet_once_it_imports_helpers():
    code = "import os; from helpers import noise; noise.quiet(); print(os.environ['COURSE_QUIET'])"
    assert (
        subprocess.run(
            [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        == "1"
    )
    # a fresh process started with what quiet() left in the environment (as spawned ranks are)
    stderr = _stderr_of("import helpers\n" + LOG_BOTH, COURSE_QUIET="1")
    assert "Failed to load" not in stderr and "a real torchao problem" in stderr
    loud = _stderr_of("import helpers\n" + LOG_BOTH, COURSE_QUIET="0")
    assert "Failed to load" in loud

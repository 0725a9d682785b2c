"""`keep_freed_memory`: glibc keeps large blocks on the heap (faster CPU forwards), and can be turned off."""

import os
import subprocess
import sys

import pytest

CHECK = """
from cliptune.utils.memory import keep_freed_memory
print(keep_freed_memory())
"""


def _run(env_value: str | None) -> str:
    env = {"PATH": "/usr/bin:/bin"} | ({"CLIPTUNE_MALLOC": env_value} if env_value is not None else {})
    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    return subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, check=True).stdout


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_tuned_by_default_and_off_on_request():
    assert _run(None).strip() == "True"
    assert _run("system").strip() == "False"

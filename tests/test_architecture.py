"""Architecture rules from DESIGN.md that code review alone would not keep: the server side never imports torch
(model code runs only in the engine's worker, behind `assistant.engine`), and `--help` stays light."""

import re
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.parametrize(
    "modules",
    [
        ["assistant.transport.server", "assistant.transport.websocket", "assistant.transport.mqtt"],
        ["assistant.transport.wyoming", "assistant.transport.wyoming_services"],
        ["assistant.realtime.session", "assistant.realtime.protocol", "assistant.realtime.events"],
        ["assistant.cli", "assistant.config", "assistant.engine.api", "assistant.backends.base"],
    ],
)
def test_modules_do_not_import_torch(modules):
    code = "import sys\n" + "".join(f"import {m}\n" for m in modules) + "print('torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False", f"{modules} pulled in torch"


def test_the_realtime_core_is_sans_io():
    """The session core and everything it imports from the project name no event loop, socket, clock or torch: time
    comes in as an argument (`now_s`), and work goes out as commands."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "assistant"
    forbidden = {"asyncio", "socket", "time", "torch", "threading", "concurrent", "websockets", "aiomqtt"}
    core = list((root / "realtime").glob("*.py"))
    core += [root / "audio" / "vad.py", root / "audio" / "resample.py", root / "engine" / "api.py", root / "schema.py"]
    core += [root / "audio" / "wake_word.py"]
    core += [root / "audio" / "speech_text.py", root / "audio" / "g711.py"]  # what spoken answers say, and how
    for path in core:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        bad = {n for n in names if n.split(".")[0] in forbidden}
        assert not bad, f"{path.relative_to(root.parent)} imports {sorted(bad)}"


def test_no_file_in_the_checkout_carries_merge_conflict_markers():
    """A half-resolved merge must not land: docs are not parsed by anything else that would catch it."""
    root = Path(__file__).resolve().parent.parent
    tracked = subprocess.run(["git", "ls-files"], cwd=root, capture_output=True, text=True, check=True).stdout.split()
    markers = re.compile(r"^(<{7}|>{7}) ", re.MULTILINE)
    bad = []
    for name in tracked:
        path = root / name
        if path.suffix in {".py", ".md", ".toml", ".js", ".html", ".css", ".json", ".cjs", ".sh", ".txt", ".ini"}:
            if path.is_file() and markers.search(path.read_text(encoding="utf-8", errors="replace")):
                bad.append(name)
    assert not bad, f"merge conflict markers left in {bad}"

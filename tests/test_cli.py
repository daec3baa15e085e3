"""The command line lists its subcommands and rejects bad configuration with exit code 2."""

import subprocess
import sys

import pytest


def run(*args):
    return subprocess.run([sys.executable, "-m", "assistant", *args], capture_output=True, text=True, timeout=120)


def test_help_lists_subcommands():
    r = run("--help")
    assert r.returncode == 0
    for cmd in ("serve", "ask", "prepare"):
        assert cmd in r.stdout


def test_bad_config_exits_2_naming_the_key(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text("[server]\nport = 70000\n")
    r = run("--config", str(f), "serve")
    assert r.returncode == 2
    assert "server.port" in r.stderr


def test_cuda_requested_without_cuda_is_a_clear_error(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    f = tmp_path / "cuda.toml"
    f.write_text('[model]\ndevice = "cuda"\n')
    r = run("--config", str(f), "ask", "--text", "hi")
    assert r.returncode == 2
    assert "'model.device' is 'cuda'" in r.stderr and "Traceback" not in r.stderr

"""The command line lists its subcommands and rejects bad configuration with exit code 2."""

import os
import signal
import subprocess
import sys

import pytest


def run(*args):
    return subprocess.run([sys.executable, "-m", "assistant", *args], capture_output=True, text=True, timeout=120)


def test_help_lists_subcommands():
    r = run("--help")
    assert r.returncode == 0
    for cmd in ("serve", "ask", "tls-cert", "prepare"):
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


def test_config_is_accepted_before_and_after_the_command(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text("[server]\nport = 99999\n")
    for argv in (["--config", str(f), "serve"], ["serve", "--config", str(f)]):
        r = run(*argv)
        assert r.returncode == 2 and "server.port" in r.stderr, (argv, r.stderr)  # the file was read either way


def test_a_bad_mqtt_url_fails_at_start_naming_the_key():
    r = run("serve", "--port", "0", "--mqtt", "tcp://broker:1883")
    assert r.returncode == 2 and "mqtt.url" in r.stderr and "mqtt://HOST" in r.stderr


def test_a_bad_wyoming_uri_fails_at_start_naming_the_key():
    r = run("serve", "--port", "0", "--wyoming", "tcp://0.0.0.0")
    assert r.returncode == 2 and "wyoming.uri" in r.stderr and "tcp://HOST:PORT" in r.stderr


def test_sigterm_while_the_model_loads_exits_cleanly_and_says_why(tmp_path):
    """The checkpoint's config.json is a FIFO nobody writes: the load blocks in the worker until the signal."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    os.mkfifo(ckpt / "config.json")
    proc = subprocess.Popen(
        [sys.executable, "-m", "assistant", "serve", "--port", "0", "--model", str(ckpt)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for line in proc.stdout:
            if line.startswith("Loading the"):
                break
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "stopped (signal) while loading the model" in err and "Traceback" not in err

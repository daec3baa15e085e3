"""Configuration loading: defaults match the documented file, overlays apply, bad keys/values fail by name."""

import dataclasses
import tomllib

import pytest

from assistant.config import DEFAULT_CONFIG_PATH, Config, ConfigError, load_config


def test_default_toml_documents_every_key_with_the_dataclass_default():
    data = tomllib.loads(DEFAULT_CONFIG_PATH.read_text())
    cfg = Config()
    for section in dataclasses.fields(cfg):
        sub = getattr(cfg, section.name)
        assert section.name in data, f"section [{section.name}] missing from default.toml"
        for f in dataclasses.fields(sub):
            assert f.name in data[section.name], f"{section.name}.{f.name} missing from default.toml"
            value = getattr(sub, f.name)
            assert data[section.name][f.name] == (list(value) if isinstance(value, tuple) else value), f.name
    text = DEFAULT_CONFIG_PATH.read_text()
    for line in text.splitlines():
        if "=" in line and not line.lstrip().startswith("#") and not line.startswith("system_prompt"):
            assert "#" in line, f"undocumented key line: {line}"


def test_overlay_file_and_overrides(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("[server]\nport = 9000\n[vad]\naggressiveness = 3\n")
    cfg = load_config(f, {"server.host": "0.0.0.0", "server.port": None})
    assert cfg.server.port == 9000 and cfg.vad.aggressiveness == 3 and cfg.server.host == "0.0.0.0"
    assert cfg.vad.frame_ms == 30


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("[server]\nprot = 1\n", "unknown config key 'server.prot'"),
        ("[nosuch]\nx = 1\n", "unknown config key 'nosuch'"),
        ("[vad]\naggressiveness = 7\n", "'vad.aggressiveness': expected a value in [0, 3], got 7"),
        ("[vad]\nframe_ms = 25\n", "'vad.frame_ms': expected one of 10, 20, 30, got 25"),
        ('[model]\nbackend = "gpt"\n', "'model.backend': expected one of 'embedded', 'qwen-audio'"),
        ('[server]\nport = "80"\n', "'server.port': expected int, got '80'"),
        ("[generation]\ngreedy = 1\n", "'generation.greedy': expected bool"),
        ('[model]\nbackend = "qwen-audio"\n', "needs a checkpoint directory"),
        ("[server\n", "not valid TOML"),
        ("[generation]\ntemperature = nan\n", "'generation.temperature': expected a finite number, got nan"),
        ("[vad]\nthreshold = inf\n", "'vad.threshold': expected a finite number, got inf"),
        ("[vad]\nsilence_duration_ms = " + "9" * 5000 + "\n", "is not valid TOML"),
        ('[mqtt]\nurl = "broker:1883"\n', "'mqtt.url': expected mqtt://HOST[:PORT]"),
        ('[wyoming]\nuri = "0.0.0.0:10700"\n', "'wyoming.uri': expected tcp://HOST:PORT"),
        ('[wyoming]\nuri = "tcp://host"\n', "'wyoming.uri': expected tcp://HOST:PORT"),
        ("[wyoming]\nmax_conversations = 0\n", "'wyoming.max_conversations': expected a value in [1, "),
    ],
)
def test_bad_config_names_the_key(tmp_path, text, fragment):
    f = tmp_path / "c.toml"
    f.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(f)
    assert fragment in str(e.value)


def test_missing_file_says_so(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")


@pytest.mark.parametrize(
    ("cores", "voice_threads", "speaking", "expected"),
    [
        (2, 1, False, 2),
        (2, 1, True, 2),  # one core of two set aside would idle most of the time (measured)
        (1, 1, True, 1),
        (4, 1, True, 3),
        (8, 2, True, 6),
        (8, 4, True, 8),  # the voice's share is too large to set aside
        (8, 64, True, 8),  # never zero threads
    ],
)
def test_the_thread_budget_sets_the_voice_threads_aside_on_larger_machines(
    monkeypatch, cores, voice_threads, speaking, expected
):
    import os

    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    cfg = load_config(overrides={"voice.threads": voice_threads})
    assert cfg.engine_threads(speaking=speaking) == expected
    assert cfg.replace(**{"engine.threads": 3}).engine_threads(speaking=speaking) == 3

"""Loading never holds a model twice: weights are read shard by shard into modules built on the meta device.
Measured in a fresh subprocess (peak RSS) on a ~0.25 B-parameter checkpoint in 4 shards, loaded as float32."""

import json
import subprocess
import sys

import numpy as np
import pytest

from tests.qwen_checkpoint import config_for, shapes_for, write_checkpoint

LOAD_TIMEOUT_S = 600

MEASURE = r"""
import json, sys, torch
from assistant.weights.checkpoint import load_weights
from assistant.models.qwen_audio_encoder import AudioEncoderConfig, QwenAudioEncoder
from assistant.models.qwen_lm import QWenConfig, QWenLM
cfg = json.load(open(sys.argv[1] + "/config.json"))
with torch.device("meta"):
    lm, enc = QWenLM(QWenConfig.from_json(cfg)), QwenAudioEncoder(AudioEncoderConfig.from_json(cfg["audio"]))
import os
before = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024  # current RSS, KiB
load_weights(sys.argv[1], {"": lm, "transformer.audio.": enc}, torch.float32, torch.device("cpu"))
# VmHWM is this address space's peak; ru_maxrss would also count the parent's RSS inherited across fork+exec.
peak = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
size = sum(t.numel() * t.element_size() for m in (lm, enc) for t in [*m.parameters(), *m.buffers()])
print(json.dumps({"model_kib": size / 1024, "grown_kib": peak - before}))
"""


@pytest.mark.slow  # writes a ~0.5 GB checkpoint
def test_float32_load_peaks_well_under_twice_the_model(tmp_path):
    overrides = {"hidden_size": 768, "num_attention_heads": 6, "kv_channels": 128, "intermediate_size": 4096}
    overrides["audio"] = {"n_state": 256, "n_head": 4, "n_layer": 2, "output_dim": 768}
    # Values do not matter here: every weight is bf16 1.0 (0x3F80), which writes fast.
    weights = {k: np.full(s, 0x3F80, dtype=np.uint16) for k, s in shapes_for(config_for("tiny", overrides)).items()}
    d = write_checkpoint(tmp_path, overrides=overrides, shards=4, weights=weights)
    r = subprocess.run([sys.executable, "-c", MEASURE, str(d)], capture_output=True, text=True, timeout=LOAD_TIMEOUT_S)
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout)
    assert m["model_kib"] > 900 * 1024  # ~0.95 GiB of float32 weights
    grown_mib, model_mib = m["grown_kib"] / 1024, m["model_kib"] / 1024
    print(f"float32 model {model_mib:.0f} MiB, peak RSS growth while loading {grown_mib:.0f} MiB")
    assert m["grown_kib"] < 1.5 * m["model_kib"], m

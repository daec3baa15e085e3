"""Checkpoint loading: the recipe writer is bit-exact with the golden checkpoint, sharded == single file, and every
loading error (missing / unexpected key, shape mismatch, missing file, bad index) names the problem."""

import hashlib
import json
import shutil

import numpy as np
import pytest
import torch

from assistant.backends.qwen_audio import QwenAudioBackend
from assistant.weights.checkpoint import CheckpointError
from tests.qwen_checkpoint import TINY_SHA256, config_for, make_weights, write_checkpoint


@pytest.fixture(scope="module")
def weights():
    return make_weights(config_for("tiny"))


def load(path):
    return QwenAudioBackend.from_checkpoint(path, device="cpu")


def test_recipe_writer_is_bit_exact(tiny_qwen_dir):
    digest = hashlib.sha256((tiny_qwen_dir / "model.safetensors").read_bytes()).hexdigest()
    assert digest == TINY_SHA256


def test_sharded_checkpoint_equals_single_file(tmp_path, tiny_qwen_dir, weights):
    sharded = write_checkpoint(tmp_path / "sharded", shards=3, weights=weights)
    assert len(list(sharded.glob("model-*-of-00003.safetensors"))) == 3
    a, b = load(tiny_qwen_dir), load(sharded)
    sa = {**a.lm.state_dict(), **{"audio." + k: v for k, v in a.encoder.state_dict().items()}}
    sb = {**b.lm.state_dict(), **{"audio." + k: v for k, v in b.encoder.state_dict().items()}}
    assert sa.keys() == sb.keys() and len(sa) == 59
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    assert not any(t.is_meta for t in sb.values())
    assert sb["lm_head.weight"].dtype == torch.float32


def test_missing_key_is_listed(tmp_path, weights):
    w = {k: v for k, v in weights.items() if k != "transformer.h.1.mlp.w2.weight"}
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): transformer\.h\.1\.mlp\.w2\.weight"):
        load(write_checkpoint(tmp_path, weights=w))


def test_unexpected_key_is_listed(tmp_path, weights):
    w = {**weights, "transformer.h.9.attn.c_attn.bias": np.zeros(96, dtype=np.uint16)}
    with pytest.raises(CheckpointError, match=r"unexpected keys \(1\): transformer\.h\.9\.attn\.c_attn\.bias"):
        load(write_checkpoint(tmp_path, weights=w))


def test_shape_mismatch_is_listed(tmp_path, weights):
    w = {**weights, "transformer.audio.proj.bias": np.zeros(31, dtype=np.uint16)}
    with pytest.raises(CheckpointError, match=r"shape mismatches \(1\): transformer\.audio\.proj\.bias: checkpoint "):
        load(write_checkpoint(tmp_path, weights=w))


def test_config_from_another_model_lists_all_shapes(tmp_path, weights):
    d = write_checkpoint(tmp_path, weights=weights)
    cfg = json.loads((d / "config.json").read_text())
    cfg["num_hidden_layers"] = 3
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"missing keys \(8\): transformer\.h\.2\."):
        load(d)


def test_missing_files(tmp_path, weights):
    d = write_checkpoint(tmp_path / "ok", weights=weights)
    no_cfg = tmp_path / "no_cfg"
    shutil.copytree(d, no_cfg)
    (no_cfg / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json, it does not exist"):
        load(no_cfg)
    no_weights = tmp_path / "no_weights"
    shutil.copytree(d, no_weights)
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="expected model.safetensors or model.safetensors.index.json"):
        load(no_weights)
    with pytest.raises(CheckpointError, match="is not one"):
        load(tmp_path / "does_not_exist")


def test_bad_index(tmp_path, weights):
    d = write_checkpoint(tmp_path / "sharded", shards=2, weights=weights)
    index = d / "model.safetensors.index.json"
    good = json.loads(index.read_text())

    (d / "model-00002-of-00002.safetensors").rename(d / "elsewhere.safetensors")
    with pytest.raises(CheckpointError, match="shard files that are missing: model-00002-of-00002.safetensors"):
        load(d)
    (d / "elsewhere.safetensors").rename(d / "model-00002-of-00002.safetensors")

    index.write_text("{not json")
    with pytest.raises(CheckpointError, match="is not valid JSON"):
        load(d)
    index.write_text(json.dumps({"metadata": {}}))
    with pytest.raises(CheckpointError, match="expected a non-empty 'weight_map'"):
        load(d)
    wrong = dict(good["weight_map"])
    wrong["lm_head.weight"] = (
        "model-00002-of-00002.safetensors"
        if wrong["lm_head.weight"].startswith("model-00001")
        else "model-00001-of-00002.safetensors"
    )
    index.write_text(json.dumps({"weight_map": wrong}))
    with pytest.raises(CheckpointError, match=r"keys the index lists but the shard lacks \(1\): lm_head\.weight"):
        load(d)


def test_not_a_qwen_audio_config(tmp_path, weights):
    d = write_checkpoint(tmp_path, weights=weights)
    cfg = json.loads((d / "config.json").read_text())
    del cfg["audio"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="no 'audio' section"):
        load(d)

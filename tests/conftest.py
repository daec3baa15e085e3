"""Shared pytest fixtures. Each engineer appends their own fixtures in a clearly delimited block."""

# ---- engineer A (Qwen-Audio backend): tiny random Qwen-Audio-Chat checkpoints -------------------------------------
import pytest


@pytest.fixture(scope="session")
def tiny_qwen_dir(tmp_path_factory):
    """The golden `tiny` checkpoint (official layout, bit-exact with ../shared/qwen_audio_golden), written once."""
    from tests.qwen_checkpoint import write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("tiny_qwen"), case="tiny")


@pytest.fixture(scope="session")
def tiny_ntk_qwen_dir(tmp_path_factory):
    """The golden `tiny-ntk` checkpoint: same weights, seq_length 64 (dynamic NTK and logn active past 64)."""
    from tests.qwen_checkpoint import write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("tiny_ntk_qwen"), case="tiny-ntk")


# ---- end of engineer A block ---------------------------------------------------------------------------------------

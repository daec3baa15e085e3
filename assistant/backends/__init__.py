"""Model backends behind one interface (`base.py`): `qwen-audio` (official checkpoints) and `embedded` (default)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from assistant.backends.base import Backend
    from assistant.config import Config


class DeviceUnavailable(ValueError):
    """`model.device = "cuda"` was asked for but this torch build or machine has no usable CUDA device."""


def check_device(device: str) -> None:
    if device != "cuda":
        return
    import torch

    if not torch.cuda.is_available():
        raise DeviceUnavailable(
            f"config key 'model.device' is 'cuda', but torch {torch.__version__} sees no CUDA device "
            f"(CUDA build: {torch.version.cuda or 'no'}); install a CUDA build of torch into .venv (README, "
            "'GPU users') or set model.device = \"auto\""
        )


def load_backend(cfg: Config) -> Backend:
    """Build the configured backend (loads weights; for `embedded`, prepares the cache on first use)."""
    check_device(cfg.model.device)
    if cfg.model.backend == "qwen-audio":
        from assistant.backends.qwen_audio import QwenAudioBackend

        return QwenAudioBackend.from_config(cfg)
    from assistant.backends.embedded import EmbeddedBackend

    return EmbeddedBackend.from_config(cfg)

"""Model backends behind one interface (`base.py`): `qwen-audio` (official checkpoints) and `embedded` (default)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from assistant.backends.base import Backend
    from assistant.config import Config


def load_backend(cfg: Config) -> Backend:
    """Build the configured backend (loads weights; for `embedded`, prepares the cache on first use)."""
    from assistant.models.device import resolve_device

    resolve_device(cfg.model.device)  # a missing CUDA fails now, before any weights are prepared or read
    if cfg.model.backend == "qwen-audio":
        from assistant.backends.qwen_audio import QwenAudioBackend

        return QwenAudioBackend.from_config(cfg)
    from assistant.backends.embedded import EmbeddedBackend

    return EmbeddedBackend.from_config(cfg)

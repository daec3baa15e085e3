"""Model backends behind one interface (`base.py`): `qwen-audio` (official checkpoints), `embedded` (default) and
`openai` (answers stream from OpenAI-compatible servers such as vLLM; `ChatBackend`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from assistant.backends.base import Backend, ChatBackend
    from assistant.config import Config


def load_backend(cfg: Config) -> Backend | ChatBackend:
    """Build the configured backend (loads weights; for `embedded`, prepares the cache on first use)."""
    from assistant.models.device import resolve_device

    resolve_device(cfg.model.device)  # a missing CUDA fails now, before any weights are prepared or read
    if cfg.model.backend == "qwen-audio":
        from assistant.backends.qwen_audio import QwenAudioBackend

        return QwenAudioBackend.from_config(cfg)
    if cfg.model.backend == "openai":
        from assistant.backends.openai_chat import OpenAIBackend

        return OpenAIBackend.from_config(cfg)
    from assistant.backends.embedded import EmbeddedBackend

    return EmbeddedBackend.from_config(cfg)

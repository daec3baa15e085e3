"""Self-hosted real-time voice assistant server on the Qwen-Audio architecture."""

__version__ = "0.1.0"

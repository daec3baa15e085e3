"""Audio front end: file loading, streaming resampling, VAD segmentation and the Qwen-Audio log-mel.

`MODEL_RATE_HZ` is the one sample rate every model and the VAD take (16 kHz mono); everything else derives from it.
"""

MODEL_RATE_HZ = 16000

"""The Qwen-Audio audio encoder: a Whisper-large-v2 style encoder + average pooling + projection to the LLM width.

Facts (QWEN_AUDIO.md §2): conv1 (k3, p1) -> GELU -> conv2 (k3, s2, p1) -> GELU -> + positional_embedding[:T] (a
persistent buffer loaded from the checkpoint) -> pre-LN blocks with bidirectional attention (q and k each scaled by
head_dim**-0.25, `key` without bias) -> AvgPool1d(2, 2) -> ln_post -> proj; the kept rows are wrapped in
`audio_bos_eos_token.weight[0]` / `[1]`. Parameter names follow the official state dict under `transformer.audio.`.

Batching is exact: each audio sees only its own first 2*T_i mel frames (later frames are zeroed before conv1, as the
zero padding of conv1 would when it is alone), frames >= T_i are zeroed after the positional embedding and are never
attended to, so an audio's embedding does not depend on its neighbours (the reference's cross-audio leak is not
reproduced on purpose).

    enc = QwenAudioEncoder(AudioEncoderConfig.from_json(config["audio"]))
    spans = enc.encode(mel [B, 80, 3000], mel_lens [B])   # list of [span_i, output_dim] tensors
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from assistant.models.layers import multi_head_attention


@dataclass(frozen=True)
class AudioEncoderConfig:
    n_mels: int
    n_ctx: int
    n_state: int
    n_head: int
    n_layer: int
    output_dim: int

    @classmethod
    def from_json(cls, a: dict) -> AudioEncoderConfig:
        need = ["n_mels", "n_ctx", "n_state", "n_head", "n_layer", "output_dim"]
        missing = [k for k in need if k not in a]
        if missing:
            raise ValueError(f"config.json 'audio': expected keys {missing}; is this a Qwen-Audio checkpoint?")
        if not a.get("avg_pool", True) or not a.get("add_audio_bos_eos_token", True):
            raise ValueError("config.json 'audio': only avg_pool=true and add_audio_bos_eos_token=true are supported")
        return cls(**{k: int(a[k]) for k in need})


def encoder_frames(mel_len: int) -> int:
    """T after conv2 (stride 2, padding 1, kernel 3) for `mel_len` mel frames: ceil(mel_len / 2)."""
    return (mel_len + 1) // 2


def span_tokens(mel_len: int) -> int:
    """Audio tokens + bos + eos for `mel_len` mel frames: (T - 2) // 2 + 1 + 2."""
    return (encoder_frames(mel_len) - 2) // 2 + 1 + 2


class LayerNorm(nn.LayerNorm):
    """LayerNorm in float32 whatever the model dtype, cast back."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


class SelfAttention(nn.Module):
    def __init__(self, n_state: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.query = nn.Linear(n_state, n_state)
        self.key = nn.Linear(n_state, n_state, bias=False)
        self.value = nn.Linear(n_state, n_state)
        self.out = nn.Linear(n_state, n_state)

    def forward(self, x: torch.Tensor, key_ok: torch.Tensor | None) -> torch.Tensor:
        scale = (x.shape[-1] // self.n_head) ** -0.25  # on q and k each, as the reference does
        mask = None if key_ok is None else key_ok[:, None, None, :]  # [B, 1, 1, T], True = attend
        a = multi_head_attention(self.query(x) * scale, self.key(x) * scale, self.value(x), self.n_head, mask, 1.0)
        return self.out(a)  # [B, T, S]


class EncoderBlock(nn.Module):
    def __init__(self, n_state: int, n_head: int):
        super().__init__()
        self.attn = SelfAttention(n_state, n_head)
        self.attn_ln = LayerNorm(n_state)
        self.mlp = nn.Sequential(nn.Linear(n_state, 4 * n_state), nn.GELU(), nn.Linear(4 * n_state, n_state))
        self.mlp_ln = LayerNorm(n_state)

    def forward(self, x: torch.Tensor, key_ok: torch.Tensor | None) -> torch.Tensor:
        x = x + self.attn(self.attn_ln(x), key_ok)
        return x + self.mlp(self.mlp_ln(x))


class QwenAudioEncoder(nn.Module):
    def __init__(self, cfg: AudioEncoderConfig):
        super().__init__()
        self.cfg = cfg
        s = cfg.n_state
        self.conv1 = nn.Conv1d(cfg.n_mels, s, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(s, s, kernel_size=3, stride=2, padding=1)
        self.register_buffer("positional_embedding", torch.empty(cfg.n_ctx, s))  # persistent: from the checkpoint
        self.blocks = nn.ModuleList(EncoderBlock(s, cfg.n_head) for _ in range(cfg.n_layer))
        self.ln_post = LayerNorm(s)
        self.proj = nn.Linear(s, cfg.output_dim)
        self.audio_bos_eos_token = nn.Embedding(2, cfg.output_dim)

    @property
    def device(self) -> torch.device:
        return self.proj.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.proj.weight.dtype

    def encode(self, mel: torch.Tensor, mel_lens: list[int]) -> list[torch.Tensor]:
        """mel [B, n_mels, frames] (30 s windows), true lengths -> one [span_i, output_dim] tensor per audio."""
        frames = [encoder_frames(n) for n in mel_lens]
        t_max = max(frames)
        if 2 * t_max > mel.shape[-1] or t_max > self.cfg.n_ctx:
            raise ValueError(f"audio of {max(mel_lens)} mel frames is longer than the encoder's window")
        x = mel[:, :, : 2 * t_max].to(device=self.device, dtype=self.dtype)  # [B, M, 2*T_max]
        b = x.shape[0]
        pos = torch.arange(2 * t_max, device=self.device)
        lens2 = torch.tensor([2 * t for t in frames], device=self.device)
        # Frames >= 2*T_i must read as conv1's zero padding, as when the audio is encoded alone.
        x = x * (pos[None, :] < lens2[:, None])[:, None, :].to(x.dtype)
        x = F.gelu(self.conv1(x))
        x = F.gelu(self.conv2(x))  # [B, S, T_max]
        x = x.transpose(1, 2) + self.positional_embedding[:t_max].to(x.dtype)  # [B, T_max, S]
        key_ok = None
        if b > 1 and min(frames) < t_max:
            key_ok = (
                torch.arange(t_max, device=self.device)[None, :] < torch.tensor(frames, device=self.device)[:, None]
            )
            x = x * key_ok[:, :, None].to(x.dtype)
        for block in self.blocks:
            x = block(x, key_ok)
        x = F.avg_pool1d(x.transpose(1, 2), kernel_size=2, stride=2).transpose(1, 2)  # [B, T_max // 2, S]
        x = self.proj(self.ln_post(x))  # [B, T_max // 2, D]
        bos, eos = self.audio_bos_eos_token.weight[0:1], self.audio_bos_eos_token.weight[1:2]
        return [torch.cat([bos, x[i, : span_tokens(n) - 2], eos]) for i, n in enumerate(mel_lens)]

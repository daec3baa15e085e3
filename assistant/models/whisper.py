"""Whisper (encoder-decoder ASR) for the embedded backend: the network, batched greedy transcription, language ID.

Owns the model read top to bottom: dimensions, attention, residual blocks, encoder (two convolutions + sinusoid-free
learned positions + blocks), decoder (token + position embeddings, self- and cross-attention blocks, logits tied to
the token embedding), and `WhisperTranscriber`, which turns a batch of 16 kHz clips into (text, language).

Latency: the reference encoder always runs a 30 s window (1500 positions) whatever the clip length. Here the encoder
can run on the clip's own frames (`pad_to_30s=False`, positions sliced to the clip length); which mode the backend
uses is a config choice backed by the accuracy measured in tests/bench. Weights: transformers' Whisper names, as
written by `assistant/weights/convert.py` from the CTranslate2 package.
"""

from __future__ import annotations

import json
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from assistant.audio import MODEL_RATE_HZ
from assistant.audio.frontend import HOP, MIN_SAMPLES, N_FRAMES, log_mel
from assistant.models.layers import multi_head_attention


@dataclass(frozen=True)
class WhisperDims:
    n_mels: int
    d_model: int
    encoder_layers: int
    decoder_layers: int
    encoder_heads: int
    decoder_heads: int
    ffn_dim: int
    vocab_size: int
    max_source_positions: int
    max_target_positions: int

    def transformers_config(self, **token_ids: int):
        """The same dimensions as a transformers `WhisperConfig` (tests and the benchmark compare against it);
        `token_ids`: decoder_start/eos/pad/bos token ids, which the dimensions do not carry."""
        from transformers import WhisperConfig

        return WhisperConfig(
            vocab_size=self.vocab_size,
            num_mel_bins=self.n_mels,
            d_model=self.d_model,
            encoder_layers=self.encoder_layers,
            decoder_layers=self.decoder_layers,
            encoder_attention_heads=self.encoder_heads,
            decoder_attention_heads=self.decoder_heads,
            encoder_ffn_dim=self.ffn_dim,
            decoder_ffn_dim=self.ffn_dim,
            max_source_positions=self.max_source_positions,
            max_target_positions=self.max_target_positions,
            **token_ids,
        )


class Whisper:
    """Weights as plain tensors (inference only) and the encoder/decoder passes."""

    def __init__(
        self,
        dims: WhisperDims,
        weights: dict[str, torch.Tensor],
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        self.dims, self.dtype, self.device = dims, dtype, torch.device(device)
        self.w = {k: v.to(device=self.device, dtype=dtype) for k, v in weights.items()}
        need = {"model.encoder.conv1.weight", "model.decoder.embed_tokens.weight", "model.encoder.layer_norm.weight"}
        need |= {f"model.encoder.layers.{i}.fc1.weight" for i in range(dims.encoder_layers)}
        need |= {f"model.decoder.layers.{i}.encoder_attn.q_proj.weight" for i in range(dims.decoder_layers)}
        missing = sorted(need - set(self.w))
        if missing:
            raise ValueError(f"Whisper checkpoint is missing keys {missing[:8]}; re-run `python -m assistant prepare`")

    @classmethod
    def load(cls, model_dir: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu") -> Whisper:
        from safetensors.torch import load_file

        model_dir = Path(model_dir)
        dims = WhisperDims(**json.loads((model_dir / "dims.json").read_text(encoding="utf-8")))
        return cls(dims, load_file(str(model_dir / "model.safetensors")), dtype, device)

    def _lin(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return F.linear(x, self.w[name + ".weight"], self.w.get(name + ".bias"))

    def _ln(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), self.w[name + ".weight"], self.w[name + ".bias"], eps=1e-5)

    def _mlp(self, x: torch.Tensor, p: str) -> torch.Tensor:
        return self._lin(F.gelu(self._lin(self._ln(x, p + "final_layer_norm"), p + "fc1")), p + "fc2")

    # ------------------------------------------------------------------ encoder

    @torch.inference_mode()
    def encode(self, mel: torch.Tensor) -> torch.Tensor:
        """mel [B, n_mels, frames] (frames even, <= 3000) -> audio features [B, frames/2, d_model]."""
        x = mel.to(device=self.device, dtype=self.dtype)
        x = F.gelu(F.conv1d(x, self.w["model.encoder.conv1.weight"], self.w["model.encoder.conv1.bias"], padding=1))
        x = F.gelu(
            F.conv1d(x, self.w["model.encoder.conv2.weight"], self.w["model.encoder.conv2.bias"], stride=2, padding=1)
        )
        x = x.transpose(1, 2)  # [B, frames/2, D]
        x = x + self.w["model.encoder.embed_positions.weight"][: x.shape[1]]
        heads = self.dims.encoder_heads
        for i in range(self.dims.encoder_layers):
            p = f"model.encoder.layers.{i}."
            a = self._ln(x, p + "self_attn_layer_norm")
            q, k, v = (self._lin(a, p + f"self_attn.{n}_proj") for n in "qkv")
            x = x + self._lin(multi_head_attention(q, k, v, heads), p + "self_attn.out_proj")
            x = x + self._mlp(x, p)
        return self._ln(x, "model.encoder.layer_norm")

    # ------------------------------------------------------------------ decoder

    def cross_kv(self, audio_features: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per decoder layer, the cross-attention K/V of the audio features (computed once per utterance)."""
        out = []
        for i in range(self.dims.decoder_layers):
            p = f"model.decoder.layers.{i}.encoder_attn."
            out.append((self._lin(audio_features, p + "k_proj"), self._lin(audio_features, p + "v_proj")))
        return out

    @torch.inference_mode()
    def decode(
        self,
        tokens: torch.Tensor,
        cross: list[tuple[torch.Tensor, torch.Tensor]],
        self_kv: list[tuple[torch.Tensor, torch.Tensor]] | None,
        cross_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """tokens [B, T] appended after the cached `self_kv` ([B, t, D] per layer) -> (logits [B, T, V] float32,
        the grown self_kv). `cross_mask` [B, 1, 1, Tk] hides padded audio positions of shorter clips."""
        past = 0 if self_kv is None else self_kv[0][0].shape[1]
        n = tokens.shape[1]
        x = F.embedding(tokens.to(self.device), self.w["model.decoder.embed_tokens.weight"])
        x = x + self.w["model.decoder.embed_positions.weight"][past : past + n]
        causal = None
        if n > 1:
            causal = torch.ones(n, past + n, dtype=torch.bool, device=self.device).tril(diagonal=past)
        heads = self.dims.decoder_heads
        new_kv = []
        for i in range(self.dims.decoder_layers):
            p = f"model.decoder.layers.{i}."
            a = self._ln(x, p + "self_attn_layer_norm")
            q, k, v = (self._lin(a, p + f"self_attn.{nm}_proj") for nm in "qkv")
            if self_kv is not None:
                k, v = torch.cat([self_kv[i][0], k], 1), torch.cat([self_kv[i][1], v], 1)
            new_kv.append((k, v))
            x = x + self._lin(multi_head_attention(q, k, v, heads, causal), p + "self_attn.out_proj")
            a = self._ln(x, p + "encoder_attn_layer_norm")
            q = self._lin(a, p + "encoder_attn.q_proj")
            x = x + self._lin(multi_head_attention(q, *cross[i], heads, cross_mask), p + "encoder_attn.out_proj")
            x = x + self._mlp(x, p)
        x = self._ln(x, "model.decoder.layer_norm")
        return F.linear(x, self.w["model.decoder.embed_tokens.weight"]).float(), new_kv


@dataclass
class Transcript:
    text: str
    language: str
    token_ids: list[int]
    avg_logprob: float = 0.0  # mean log-probability of the chosen tokens
    language_prob: float = 1.0
    reliable: bool = True  # False: looped, hit the token cap, or unsure (see WhisperTranscriber thresholds)
    no_speech: bool = False  # judged silent (or too short): text is empty


class WhisperTranscriber:
    """Batched greedy transcription with language detection (Whisper's `<|lang|><|transcribe|><|notimestamps|>`)."""

    # Below this mean token log-probability a short-window transcript is redone on the full window. Whisper's own
    # fallback uses -1.0; on the espeak question set the wrong short-window transcripts scored -0.74 and -2.3 and
    # the right ones -0.13..-0.42. (The language probability is no signal: a right transcript had 0.36.)
    MIN_AVG_LOGPROB = -0.5
    NO_SPEECH_PROB, SILENT_AVG_LOGPROB = 0.6, -1.0  # openai/whisper's defaults for "this segment is silence"
    # Full-window redos per step. On 2 shared CPU cores one 30 s redo took 2-5 s and a batch of 4 took 12.6 s:
    # batching gains little there, and each step holds the engine's worker (running answers wait for it).
    REDO_BATCH = 1

    def __init__(self, model: Whisper, tokenizer_json: Path, config_json: Path, pad_s: float = 30.0):
        from tokenizers import Tokenizer as HFTokenizer

        self.model, self.pad_s = model, pad_s
        self.tok = HFTokenizer.from_file(str(tokenizer_json))
        cfg = json.loads(Path(config_json).read_text(encoding="utf-8"))

        def tid(text: str) -> int:
            i = self.tok.token_to_id(text)
            if i is None:
                raise ValueError(f"{tokenizer_json}: special token {text} is missing; not a Whisper tokenizer")
            return i

        self.sot, self.eot = tid("<|startoftranscript|>"), tid("<|endoftext|>")
        self.transcribe, self.no_timestamps = tid("<|transcribe|>"), tid("<|notimestamps|>")
        self.no_speech = tid("<|nospeech|>")
        self.lang_ids = list(cfg["lang_ids"])
        self.lang_names = {i: self.tok.id_to_token(i)[2:-2] for i in self.lang_ids}
        vocab = model.dims.vocab_size
        suppress = torch.zeros(vocab, dtype=torch.bool)
        suppress[[i for i in cfg["suppress_ids"] if i < vocab]] = True
        suppress[self.eot + 1 :] = True  # every special token after <|endoftext|> (sot, languages, tasks, timestamps)
        self.suppress = suppress.to(model.device)
        self.suppress_begin = self.suppress.clone()
        self.suppress_begin[[i for i in cfg["suppress_ids_begin"] if i < vocab]] = True  # no blank/eot first

    def mel(self, audio: np.ndarray, pad_s: float) -> torch.Tensor:
        """[n_mels, frames]: the clip followed by `pad_s` seconds of padding (silence frames of the 30 s window),
        at most the whole window; frames rounded up to even (the second convolution has stride 2)."""
        m = log_mel(audio[: N_FRAMES * HOP])
        frames = min(N_FRAMES, max(2, -(-len(audio) // HOP) + int(pad_s * MODEL_RATE_HZ) // HOP))
        return m[:, : frames + frames % 2]

    def transcribe_steps(
        self, audios: list[np.ndarray], max_tokens: int | None = None
    ) -> Generator[None, None, list[Transcript]]:
        """Greedy transcripts of `audios`, in bounded steps (the caller may do other work at each `yield`): one pass
        over the batch, then, with a short window (`pad_s` < 30), each utterance whose result looks unreliable (unsure
        language, low token confidence, or a repetition loop) is decoded again on the full 30 s window the model was
        trained on, `REDO_BATCH` per step, so the fast path never costs accuracy on those."""
        # A clip under 30 ms holds no word (and gives the convolutions too few frames): an empty transcript.
        results: list[Transcript] = [Transcript("", "", [], no_speech=True) for _ in audios]
        runnable = [i for i, a in enumerate(audios) if len(a) >= MIN_SAMPLES]
        for i, r in zip(runnable, self._run([audios[i] for i in runnable], self.pad_s, max_tokens), strict=True):
            results[i] = r
        if self.pad_s < 30.0:
            redo = [i for i in runnable if not results[i].reliable]
            for at in range(0, len(redo), self.REDO_BATCH):
                yield
                part = redo[at : at + self.REDO_BATCH]
                for i, r in zip(part, self._run([audios[i] for i in part], 30.0, max_tokens), strict=True):
                    results[i] = r
        return results

    @torch.inference_mode()
    def _run(self, audios: list[np.ndarray], pad_s: float, max_tokens: int | None) -> list[Transcript]:
        if not audios:
            return []
        m = self.model
        feats = [m.encode(self.mel(a, pad_s)[None])[0] for a in audios]  # lengths differ unless padded: one pass each
        lengths = [f.shape[0] for f in feats]
        tk = max(lengths)
        b = len(audios)
        padded = torch.zeros(b, tk, feats[0].shape[1], dtype=feats[0].dtype, device=m.device)
        for i, f in enumerate(feats):
            padded[i, : f.shape[0]] = f
        cross_mask = None
        if min(lengths) != tk:
            valid = torch.arange(tk, device=m.device)[None, :] < torch.tensor(lengths, device=m.device)[:, None]
            cross_mask = valid[:, None, None, :]  # [B, 1, 1, Tk]
        cross = m.cross_kv(padded)
        # Language: the distribution over language tokens right after <|startoftranscript|>.
        logits, _ = m.decode(torch.full((b, 1), self.sot), cross, None, cross_mask)
        no_speech_p = logits[:, 0].softmax(-1)[:, self.no_speech]  # Whisper's voice-activity signal
        lang_probs = logits[:, 0, self.lang_ids].softmax(-1)
        lang_p, lang_j = lang_probs.max(-1)
        langs = [self.lang_ids[int(j)] for j in lang_j]
        prompt = torch.tensor([[self.sot, lang, self.transcribe, self.no_timestamps] for lang in langs])
        logits, kv = m.decode(prompt, cross, None, cross_mask)
        # A cap on tokens per second of audio stops a runaway loop that the repetition check would miss.
        limits = [min(m.dims.max_target_positions - 8, 16 + int(6 * len(a) / MODEL_RATE_HZ)) for a in audios]
        if max_tokens is not None:
            limits = [min(x, max_tokens) for x in limits]
        out: list[list[int]] = [[] for _ in range(b)]
        logprob = [0.0] * b
        looped = [False] * b
        done = [False] * b
        for step in range(max(limits) + 1):
            last = logits[:, -1].masked_fill(self.suppress_begin if step == 0 else self.suppress, float("-inf"))
            lp = last.log_softmax(-1)
            nxt = last.argmax(-1)
            for i in range(b):
                if done[i]:
                    continue
                tok = int(nxt[i])
                if tok == self.eot or len(out[i]) >= limits[i]:
                    done[i] = True
                    continue
                out[i].append(tok)
                logprob[i] += float(lp[i, tok])
                cut = _repeat_start(out[i])
                if cut is not None:
                    del out[i][cut:]
                    looped[i] = done[i] = True
            if all(done):
                break
            logits, kv = m.decode(nxt[:, None], cross, kv, cross_mask)
        results = []
        for i in range(b):
            avg_lp = logprob[i] / max(1, len(out[i]))
            reliable = not looped[i] and len(out[i]) < limits[i] and avg_lp >= self.MIN_AVG_LOGPROB
            # Whisper's rule: likely no speech and an unsure transcript -> nothing was said (no hallucinated text).
            silent = float(no_speech_p[i]) > self.NO_SPEECH_PROB and avg_lp < self.SILENT_AVG_LOGPROB
            text = "" if silent else self.tok.decode(out[i], skip_special_tokens=True).strip()
            lang = self.lang_names[langs[i]]
            results.append(Transcript(text, lang, [] if silent else out[i], avg_lp, float(lang_p[i]), reliable, silent))
        return results


def _repeat_start(ids: list[int], min_block: int = 4) -> int | None:
    """If `ids` ends with a block repeated back to back (a decoding loop), the index where the repeat starts."""
    n = len(ids)
    for block in range(min_block, n // 2 + 1):
        if ids[n - block :] == ids[n - 2 * block : n - block]:
            return n - block
    return None

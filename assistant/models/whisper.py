"""Whisper (encoder-decoder ASR) for the embedded backend: the network, batched transcription, language ID.

Owns the model read top to bottom: dimensions, attention, residual blocks, encoder (two convolutions + sinusoid-free
learned positions + blocks), decoder (token + position embeddings, self- and cross-attention blocks, logits tied to
the token embedding), and `WhisperTranscriber`, which turns a batch of 16 kHz clips into (text, language).

The encoder always runs the 30 s window it was trained on (1500 positions; see `WhisperTranscriber` for what
shorter windows did to the words). Weights: transformers' Whisper names, as written by
`assistant/weights/convert.py` from the CTranslate2 package.
"""

from __future__ import annotations

import json
import math
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from assistant.audio import MODEL_RATE_HZ
from assistant.audio.frontend import HOP, MIN_SAMPLES, N_FRAMES, log_mel
from assistant.audio.speech_text import language_code
from assistant.audio.trim import trim_silence
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

    @property
    def multilingual(self) -> bool:
        """openai/whisper's rule: the English-only models (tiny.en, base.en, ...) have a 51864-token vocabulary, the
        multilingual ones 51865 or more (the extra token shifts every special token by one)."""
        return self.vocab_size >= 51865

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
    ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """tokens [B, T] appended after the cached `self_kv` ([B, t, D] per layer) -> (logits [B, T, V] float32,
        the grown self_kv)."""
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
            x = x + self._lin(multi_head_attention(q, *cross[i], heads), p + "encoder_attn.out_proj")
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
    looped: bool = False  # a repetition loop was cut, or the token cap was hit
    no_speech: bool = False  # judged silent (or too short): text is empty


class WhisperTranscriber:
    """Batched transcription with language detection (Whisper's `<|lang|><|transcribe|><|notimestamps|>`;
    English-only models: `<|notimestamps|>` alone, language "en"), greedy or by beam search (`beam_size`), optionally
    after the text said before (`previous_ids`).

    Every clip is cut to its speech plus a fixed margin (`assistant.audio.trim`) and encoded in the full 30 s window
    the model was trained on. Both are needed for the words not to depend on the silence around them (measured by
    bench/asr_peers.py, README "Speech recognition"). Encoding only the clip plus 2 s gave the encoder and the
    decoder's cross-attention 13-27 % of the positions they were trained with (a 2-6 s question): attention that
    training spread over the whole window then lands on the speech alone, the features drift (cosine 0.86-0.90 to
    the full-window ones, some frames anti-correlated) and the words, even the detected language, change with where
    the speech sits in that short window. In the full window Whisper is steadier but still not shift-invariant
    (faster-whisper changes words with leading silence too), hence the trim.
    """

    NO_SPEECH_PROB, SILENT_AVG_LOGPROB = 0.6, -1.0  # openai/whisper's defaults for "this segment is silence"
    # Below this language probability (faster-whisper's language_detection_threshold, 0.5) the likeliest transcript
    # among the top candidates decides (decode_features).
    LANGUAGE_SURE_P, LANGUAGE_CANDIDATES = 0.5, 3

    def __init__(self, model: Whisper, tokenizer_json: Path, config_json: Path, beam_size: int = 1):
        from tokenizers import Tokenizer as HFTokenizer

        if beam_size < 1:
            raise ValueError(f"Whisper beam size {beam_size}: expected 1 (greedy) or more (beam search)")
        self.model, self.beam_size = model, beam_size
        # Of a previous text, its last n_text_ctx // 2 - 1 tokens (openai/whisper's; 223 of 448): half the decoder's
        # positions stay for the transcript.
        self.previous_tokens = model.dims.max_target_positions // 2 - 1
        self.tok = HFTokenizer.from_file(str(tokenizer_json))
        cfg = json.loads(Path(config_json).read_text(encoding="utf-8"))

        def tid(text: str) -> int:
            i = self.tok.token_to_id(text)
            if i is None:
                raise ValueError(f"{tokenizer_json}: special token {text} is missing; not a Whisper tokenizer")
            return i

        self.sot, self.eot, self.start_of_prev = (
            tid("<|startoftranscript|>"),
            tid("<|endoftext|>"),
            tid("<|startofprev|>"),
        )
        self.transcribe, self.no_timestamps = tid("<|transcribe|>"), tid("<|notimestamps|>")
        self.multilingual = model.dims.multilingual
        if self.multilingual:
            self.no_speech = tid("<|nospeech|>")
            self.lang_ids = list(cfg["lang_ids"])
        else:
            # English-only (tiny.en): no language detection; its prompt is `<|startoftranscript|><|notimestamps|>`
            # and its no-speech token has the older name. (Its config.json lists multilingual lang_ids: not used.)
            self.no_speech = tid("<|nocaptions|>")
            self.lang_ids = [tid("<|en|>")]
        self.lang_names = {i: self.tok.id_to_token(i)[2:-2] for i in self.lang_ids}
        vocab = model.dims.vocab_size
        suppress = torch.zeros(vocab, dtype=torch.bool)
        suppress[[i for i in cfg["suppress_ids"] if i < vocab]] = True
        suppress[self.eot + 1 :] = True  # every special token after <|endoftext|> (sot, languages, tasks, timestamps)
        self.suppress = suppress.to(model.device)
        self.suppress_begin = self.suppress.clone()
        self.suppress_begin[[i for i in cfg["suppress_ids_begin"] if i < vocab]] = True  # no blank/eot first

    @classmethod
    def load(
        cls, model_dir: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu", beam_size: int = 1
    ) -> WhisperTranscriber:
        """The transcriber of a prepared Whisper directory (`assistant.weights.cache`); beam size 1 is greedy."""
        model_dir = Path(model_dir)
        model = Whisper.load(model_dir, dtype, device)
        return cls(model, model_dir / "tokenizer.json", model_dir / "config.json", beam_size)

    @staticmethod
    def speech(audio: np.ndarray) -> np.ndarray:
        """What the model hears of `audio`: its speech with `trim.MARGIN_S` around it, at most one 30 s window."""
        return trim_silence(audio)[: N_FRAMES * HOP]

    def languages(self) -> tuple[str, ...]:
        """The language codes this model can be told to hear (`transcribe_steps(languages=...)`)."""
        return tuple(self.lang_names.values())

    def language_token(self, language: str) -> int:
        """The language token of `language` (an ISO-639-1 code such as "en"; "en-US" reads as "en")."""
        code = language_code(language)
        for tok, name in self.lang_names.items():
            if name == code:
                return tok
        which = "this English-only model" if not self.multilingual else "Whisper"
        raise ValueError(
            f"transcription language {language!r} is not one {which} knows; expected one of "
            f"{', '.join(self.languages())}, or none to detect the language"
        )

    def transcribe_steps(
        self,
        audios: list[np.ndarray],
        max_tokens: int | None = None,
        languages: list[str | None] | None = None,
        previous: list[str] | None = None,
    ) -> Generator[None, None, list[Transcript]]:
        """Transcripts of `audios`, in bounded steps (the caller may do other work at each `yield`): one 30 s window
        encoded per step, then the batch decoded together. `languages[i]`, when given, is the language clip i is
        spoken in (no detection); None detects it. `previous[i]`, when given, is the text said before clip i
        (`decode_features`)."""
        forced = [None if not lang else self.language_token(lang) for lang in (languages or [None] * len(audios))]
        # A clip under 30 ms holds no word (and gives the convolutions too few frames): an empty transcript.
        results: list[Transcript] = [Transcript("", "", [], no_speech=True) for _ in audios]
        runnable = [i for i, a in enumerate(audios) if len(a) >= MIN_SAMPLES]
        speech = [self.speech(audios[i]) for i in runnable]
        feats = []
        for k, clip in enumerate(speech):
            if k:
                yield
            feats.append(self.model.encode(log_mel(clip)[None]))
        if runnable:
            yield
            told = [forced[i] for i in runnable]
            before = [previous[i] for i in runnable] if previous else None
            decoded = self.decode_features(torch.cat(feats), speech, max_tokens, told, before)
            for i, r in zip(runnable, decoded, strict=True):
                results[i] = r
        return results

    @torch.inference_mode()
    def decode_features(
        self,
        feats: torch.Tensor,
        speech: list[np.ndarray],
        max_tokens: int | None = None,
        language_tokens: list[int | None] | None = None,
        previous: list[str] | None = None,
    ) -> list[Transcript]:
        """feats [B, T, D] (the encoder output; T = 1500 for the 30 s window) of the clips `speech` (their length
        caps the tokens) -> transcripts, greedy or by beam search (`beam_size`). Public for bench/asr_peers.py,
        which also decodes shorter windows. `language_tokens[i]` (`language_token`), when given, is clip i's
        language: it is decoded in it alone. `previous[i]`, when given, is what was said before clip i (the
        conversation's earlier turns): Whisper's previous-text prompt, `<|startofprev|>` and the text's last
        `previous_tokens` tokens before `<|startoftranscript|>`, as openai/whisper conditions each 30 s window on
        the text of the last (language and no-speech are still judged without it, as there).

        Language: Whisper's distribution over language tokens right after `<|startoftranscript|>`. When its top
        language is below `LANGUAGE_SURE_P`, the clip is transcribed in each of its `LANGUAGE_CANDIDATES` likeliest
        languages and the likeliest (language, transcript) pair wins: log p(language) plus the transcript's summed
        token log-probabilities, the model's own probability of the whole decoded sequence. On an espeak-ng English
        question Whisper base's first guess was Thai (0.42, English 0.10): its Thai transcript, nonsense, scored
        -17.9 and the English one -9.6 (the mean per token, -0.90 against -0.91, could not tell them apart).
        """
        m, b = self.model, feats.shape[0]
        cross = m.cross_kv(feats)
        logits, _ = m.decode(torch.full((b, 1), self.sot), cross, None)
        no_speech_p = logits[:, 0].softmax(-1)[:, self.no_speech]  # Whisper's voice-activity signal
        lang_probs = logits[:, 0, self.lang_ids].softmax(-1)
        rows: list[tuple[int, int, float]] = []  # (clip, language token, its probability) per decoded row
        told = language_tokens or [None] * b
        for i in range(b):
            if told[i] is not None:  # the caller knows the language: detection is skipped, not just overruled
                rows.append((i, told[i], 1.0))
                continue
            top = lang_probs[i].topk(min(self.LANGUAGE_CANDIDATES, len(self.lang_ids)))
            n = 1 if float(top.values[0]) >= self.LANGUAGE_SURE_P else len(top.values)
            rows += [(i, self.lang_ids[int(j)], float(p)) for p, j in zip(top.values[:n], top.indices[:n], strict=True)]
        before = [self.previous_ids(t) for t in previous] if previous else [[] for _ in range(b)]
        if self.multilingual:
            prompts = [[*before[i], self.sot, lang, self.transcribe, self.no_timestamps] for i, lang, _ in rows]
        else:
            prompts = [[*before[i], self.sot, self.no_timestamps] for i, _, _ in rows]
        clip_of = [i for i, _, _ in rows]
        # Rows beyond one per clip (unsure languages) need their clip's cross K/V repeated; otherwise it is as is.
        row_cross = cross if len(rows) == b else [(k[clip_of], v[clip_of]) for k, v in cross]
        # A cap on tokens per second of speech stops a runaway loop that the repetition check would miss.
        limits = [min(m.dims.max_target_positions - 8, 16 + int(6 * len(speech[i]) / MODEL_RATE_HZ)) for i in clip_of]
        if max_tokens is not None:
            limits = [min(x, max_tokens) for x in limits]
        out, logprob, looped = self._decode_rows(prompts, row_cross, limits)
        score = [math.log(max(p, 1e-30)) + logprob[r] for r, (_, _, p) in enumerate(rows)]
        best: dict[int, int] = {}  # clip -> its likeliest row
        for r, (i, _, _) in enumerate(rows):
            if i not in best or score[r] > score[best[i]]:
                best[i] = r
        results = []
        for i in range(b):
            r = best[i]
            avg_lp = logprob[r] / max(1, len(out[r]))
            # Whisper's rule: likely no speech and an unsure transcript -> nothing was said (no hallucinated text).
            silent = float(no_speech_p[i]) > self.NO_SPEECH_PROB and avg_lp < self.SILENT_AVG_LOGPROB
            text = "" if silent else self.tok.decode(out[r], skip_special_tokens=True).strip()
            ids = [] if silent else out[r]
            lang, lang_p = rows[r][1], rows[r][2]
            results.append(Transcript(text, self.lang_names[lang], ids, avg_lp, lang_p, looped[r], silent))
        return results

    def previous_ids(self, text: str) -> list[int]:
        """Whisper's previous-text prompt: `<|startofprev|>` and the last `previous_tokens` tokens of `text`."""
        text = text.strip()
        if not text:
            return []
        return [self.start_of_prev, *self.tok.encode(" " + text, add_special_tokens=False).ids[-self.previous_tokens :]]

    def _decode_rows(
        self, prompts: list[list[int]], cross: list[tuple[torch.Tensor, torch.Tensor]], limits: list[int]
    ) -> tuple[list[list[int]], list[float], list[bool]]:
        """Every prompt decoded (`_greedy`, or `_beam` over `beam_size` hypotheses): rows whose prompts are as long
        decode together (the decoder has no padding mask), each within the decoder's positions."""
        n = len(prompts)
        out: list[list[int]] = [[] for _ in range(n)]
        logprob, looped = [0.0] * n, [False] * n
        room = self.model.dims.max_target_positions - 1
        for length in sorted({len(p) for p in prompts}):
            rows = [r for r in range(n) if len(prompts[r]) == length]
            sub = cross if len(rows) == n else [(k[rows], v[rows]) for k, v in cross]
            prompt, caps = torch.tensor([prompts[r] for r in rows]), [min(limits[r], room - length) for r in rows]
            if self.beam_size > 1:
                got = self._beam(prompt, sub, caps, self.beam_size)
            else:
                got = self._greedy(prompt, sub, caps)
            for k, r in enumerate(rows):
                out[r], logprob[r], looped[r] = got[0][k], got[1][k], got[2][k]
        return out, logprob, looped

    def _greedy(
        self, prompt: torch.Tensor, cross: list[tuple[torch.Tensor, torch.Tensor]], limits: list[int]
    ) -> tuple[list[list[int]], list[float], list[bool]]:
        """Greedy decoding of every prompt row to `<|endoftext|>` or its token limit, a repetition loop cut:
        (tokens, summed log-probability, looped) per row."""
        b = prompt.shape[0]
        logits, kv = self.model.decode(prompt, cross, None)
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
                    looped[i] = tok != self.eot
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
            logits, kv = self.model.decode(nxt[:, None], cross, kv)
        return out, logprob, looped

    def _beam(
        self, prompt: torch.Tensor, cross: list[tuple[torch.Tensor, torch.Tensor]], limits: list[int], beam: int
    ) -> tuple[list[list[int]], list[float], list[bool]]:
        """Beam search over every prompt row, `_greedy`'s returns. openai/whisper's BeamSearchDecoder with patience 1:
        each row keeps its `beam` likeliest unfinished hypotheses (summed token log-probabilities); one that emits
        `<|endoftext|>`, ends in a repetition loop (cut) or reaches the row's token limit is finished, and the row
        stops when `beam` are. The winner has the highest log-probability per token (its `<|endoftext|>` counted, as
        openai/whisper's ranker does), so a short hypothesis does not win by being short. The returned sum is
        `_greedy`'s: `<|endoftext|>` left out, a cut loop's tokens counted (a looped transcript stays unlikely)."""
        n_rows, ninf = prompt.shape[0], float("-inf")
        src = torch.arange(n_rows, device=self.model.device).repeat_interleave(beam)  # `beam` rows per prompt row
        cross = [(k[src], v[src]) for k, v in cross]
        logits, kv = self.model.decode(prompt[src.cpu()], cross, None)
        alive: list[list[tuple[list[int], list[float]]]] = [[([], [])] for _ in range(n_rows)]  # (ids, logprobs)
        finished: list[list[tuple[float, list[int], list[float], bool]]] = [[] for _ in range(n_rows)]
        for step in range(max(limits) + 1):
            mask = self.suppress_begin if step == 0 else self.suppress
            lp = logits[:, -1].masked_fill(mask, ninf).log_softmax(-1).view(n_rows, beam, -1)
            keep, feed = [], []  # per decoder row of the next step: the row it continues, the token it is fed
            for r in range(n_rows):
                grown = self._beam_row(alive[r], lp[r], finished[r], beam, step >= limits[r])
                alive[r] = [(ids, lps) for _, ids, lps in grown]
                for h, ids, _ in grown:
                    keep.append(r * beam + h)
                    feed.append(ids[-1])
                keep += [r * beam] * (beam - len(grown))  # idle rows: decoded, never read
                feed += [self.eot] * (beam - len(grown))
            if not any(alive):
                break
            sel = torch.tensor(keep, device=self.model.device)
            kv = [(k[sel], v[sel]) for k, v in kv]
            logits, kv = self.model.decode(torch.tensor(feed)[:, None], cross, kv)
        out, logprob, looped = [], [], []
        for r in range(n_rows):
            pool = finished[r] or [(sum(lps), ids, lps, True) for ids, lps in alive[r]]
            _, ids, lps, loop = max(pool, key=lambda f: f[0] / max(1, len(f[1])))
            out.append(ids)
            logprob.append(sum(lps))
            looped.append(loop)
        return out, logprob, looped

    def _beam_row(
        self,
        alive: list[tuple[list[int], list[float]]],
        lp: torch.Tensor,
        finished: list[tuple[float, list[int], list[float], bool]],
        beam: int,
        at_limit: bool,
    ) -> list[tuple[int, list[int], list[float]]]:
        """One beam step of one row: `lp` [beam, V] the next-token log-probabilities of its `alive` hypotheses.
        Appends to `finished` (ranking score, ids, logprobs, looped) up to `beam` of them; returns the hypotheses
        that go on as (the hypothesis they grew from, ids, logprobs), at most `beam`, none once the row is done."""
        if not alive or len(finished) >= beam:
            return []
        total = lp.new_tensor([sum(lps) for _, lps in alive])[:, None] + lp[: len(alive)]
        vals, idx = total.flatten().topk(min(2 * beam, total.numel()))
        grown: list[tuple[int, list[int], list[float]]] = []
        capped: set[int] = set()
        for score, j in zip(vals.tolist(), idx.tolist(), strict=True):
            if score == float("-inf") or len(grown) == beam:
                break
            h, tok = divmod(j, lp.shape[-1])
            ids, lps = alive[h]
            if tok == self.eot:
                done = (score, ids, lps, False)
            elif at_limit:  # the token cap: finished as it stands, like `_greedy`'s cap
                if h in capped:
                    continue
                capped.add(h)
                done = (sum(lps), ids, lps, True)
            else:
                ids, lps = ids + [tok], lps + [float(lp[h, tok])]
                cut = _repeat_start(ids)
                if cut is None:
                    grown.append((h, ids, lps))
                    continue
                done = (sum(lps), ids[:cut], lps, True)  # the loop's tokens cut, their log-probability kept
            if len(finished) < beam:
                finished.append(done)
        return [] if len(finished) >= beam else grown


def _repeat_start(ids: list[int], min_block: int = 4) -> int | None:
    """If `ids` ends with a block repeated back to back (a decoding loop), the index where the repeat starts."""
    n = len(ids)
    for block in range(min_block, n // 2 + 1):
        if ids[n - block :] == ids[n - 2 * block : n - block]:
            return n - block
    return None

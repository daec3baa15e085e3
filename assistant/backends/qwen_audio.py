"""The `qwen-audio` backend: an official Qwen-Audio(-Chat) checkpoint directory behind the `Backend` interface.

Owns loading (config.json, generation_config.json, qwen.tiktoken, safetensors shards; strict, via
`assistant.weights.checkpoint`), the audio work of a turn (mel + encoder, batched over utterances and exact per
audio), and the chatml prompt of QWEN_AUDIO.md §6 with history trimmed to the window.

A spoken turn becomes the user message `Audio {k}: <audio>{key}</audio>\\n{text or turn_instruction}`. Audio longer
than 30 s is split into consecutive 30 s windows (never cut): each window is its own span, keyed `{key}` for the
first and `{key}#2`, `{key}#3` ... for the rest, all written after the same `Audio {k}: `. Clips under 30 ms are
refused with `AudioTooShort`.

    backend = QwenAudioBackend.from_checkpoint("/models/Qwen-Audio-Chat")           # CUDA + bf16 when present
    [turn] = backend.prepare([Utterance(key="item_1", audio=pcm_16k)], audio_numbers=[1])
    prompt = backend.build_prompt(backend.default_system_prompt, history=[], turn=turn, max_window_tokens=6144)
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from assistant.audio.frontend import log_mel, mel_frames, split_windows
from assistant.backends.base import AudioSpan, Exchange, PreparedTurn, Prompt, SamplingParams, Utterance
from assistant.models.device import resolve_device, resolve_dtype
from assistant.models.qwen_audio_encoder import AudioEncoderConfig, QwenAudioEncoder
from assistant.models.qwen_lm import QWenConfig, QWenLM
from assistant.models.tokenizer import QwenTokenizer
from assistant.weights.checkpoint import CheckpointError, load_weights, read_json

log = logging.getLogger(__name__)

DEFAULT_SYSTEM = "You are a helpful assistant."
DEFAULT_TURN_INSTRUCTION = "Answer the speaker's question briefly."
ENCODER_BATCH = 8  # 30 s windows encoded together; bounds the encoder's activation memory


class QwenAudioBackend:
    name = "qwen-audio"
    prepare_batch = ENCODER_BATCH  # utterances per prepare call (the engine's chunk)

    def __init__(
        self,
        lm: QWenLM,
        encoder: QwenAudioEncoder,
        tokenizer: QwenTokenizer,
        generation_config: dict,
        system_prompt: str = "",
        turn_instruction: str = DEFAULT_TURN_INSTRUCTION,
    ):
        self.lm, self.encoder, self.tokenizer = lm, encoder, tokenizer
        self.generation_config = generation_config
        self.default_system_prompt = system_prompt or DEFAULT_SYSTEM
        self.turn_instruction = turn_instruction
        self.max_window_tokens = int(generation_config.get("max_window_size", 6144))
        self.default_sampling = SamplingParams.from_generation_config(generation_config)
        self.max_new_tokens = int(generation_config.get("max_new_tokens", 512))

    # -- loading ---------------------------------------------------------------------------------------------
    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        system_prompt: str = "",
        turn_instruction: str = DEFAULT_TURN_INSTRUCTION,
    ) -> QwenAudioBackend:
        root = Path(path)
        if not root.is_dir():
            raise CheckpointError(
                f"checkpoint: expected a Qwen-Audio(-Chat) checkpoint directory, {root} is not one "
                "(set model.path or --model)"
            )
        config = read_json(root / "config.json", "Qwen-Audio config")
        if "audio" not in config:
            raise CheckpointError(
                f"{root}/config.json has no 'audio' section: expected a Qwen-Audio(-Chat) checkpoint, got "
                f"model_type {config.get('model_type')!r}"
            )
        gen_path = root / "generation_config.json"
        gen = read_json(gen_path, "generation config") if gen_path.is_file() else {}
        if not gen:
            log.warning("%s has no generation_config.json: using the Qwen-Audio-Chat defaults", root)
        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev, "qwen-audio")
        with torch.device("meta"):
            lm = QWenLM(QWenConfig.from_json(config))
            encoder = QwenAudioEncoder(AudioEncoderConfig.from_json(config["audio"]))
        load_weights(root, {"": lm, "transformer.audio.": encoder}, dtype=dt, device=dev)
        for m in (lm, encoder):
            m.eval().requires_grad_(False)
        tokenizer = QwenTokenizer.for_qwen_audio(root)
        if lm.vocab_size < tokenizer.n_valid:
            raise CheckpointError(f"vocab_size {lm.vocab_size} is smaller than the tokenizer ({tokenizer.n_valid})")
        log.info("loaded %s on %s as %s", root, dev, dt)
        return cls(lm, encoder, tokenizer, gen, system_prompt, turn_instruction)

    @classmethod
    def from_config(cls, cfg) -> QwenAudioBackend:
        m = cfg.model
        return cls.from_checkpoint(m.path, m.device, m.dtype, m.system_prompt, m.turn_instruction)

    # -- audio -----------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def encode_windows(self, windows: list) -> list[torch.Tensor]:
        """16 kHz windows (<= 30 s each) -> one [span, hidden] embedding each, encoded in batches."""
        out: list[torch.Tensor] = []
        for i in range(0, len(windows), ENCODER_BATCH):
            chunk = windows[i : i + ENCODER_BATCH]
            mel = torch.stack([log_mel(w) for w in chunk])  # [B, 80, 3000]
            out += self.encoder.encode(mel, [mel_frames(len(w)) for w in chunk])
        return out

    def prepare(self, utterances: list[Utterance], audio_numbers: list[int]) -> list[PreparedTurn]:
        plan: list[list[str]] = []  # window keys per utterance
        windows = []
        for u in utterances:
            keys: list[str] = []
            if u.audio is not None:
                if any(c in u.key for c in "<>"):
                    raise ValueError(f"utterance key {u.key!r} must not contain '<' or '>' (it names an audio tag)")
                for w_i, w in enumerate(split_windows(u.audio)):
                    keys.append(u.key if w_i == 0 else f"{u.key}#{w_i + 1}")
                    windows.append(w)
            plan.append(keys)
        embeds = iter(self.encode_windows(windows)) if windows else iter(())
        turns = []
        for u, k, keys in zip(utterances, audio_numbers, plan, strict=True):
            if keys:
                tags = "".join(f"<audio>{key}</audio>" for key in keys)
                user_text = f"Audio {k}: {tags}\n{u.text if u.text else self.turn_instruction}"
            else:
                user_text = u.text or ""
            turns.append(
                PreparedTurn(
                    key=u.key,
                    user_text=user_text,
                    audio_s=u.audio_s,
                    audio_embeds={key: next(embeds) for key in keys},
                )
            )
        return turns

    # -- prompt ----------------------------------------------------------------------------------------------
    def _user_ids(self, turn: PreparedTurn, offset: int) -> tuple[list[int], list[AudioSpan]]:
        """Ids of a user message and its audio spans at absolute `offset` (audio tags parsed, nothing else)."""
        embeds = turn.audio_embeds
        ids, tags = self.tokenizer.encode_with_audio(
            turn.chat_text, lambda url: embeds[url].shape[0] if url in embeds else None
        )
        return ids, [AudioSpan(offset + t.start, embeds[t.url], t.url) for t in tags]

    def _exchange_ids(self, user: PreparedTurn, reply: str | None) -> tuple[list[int], list[AudioSpan]]:
        """`\n<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n` + (`{reply}<|im_end|>` if a reply)."""
        t = self.tokenizer
        head = t.encode("\n") + [t.im_start_id] + t.encode("user") + t.encode("\n")
        q_ids, spans = self._user_ids(user, len(head))
        ids = head + q_ids + [t.im_end_id] + t.encode("\n") + [t.im_start_id] + t.encode("assistant") + t.encode("\n")
        if reply is not None:
            ids += t.encode(reply.strip()) + [t.im_end_id]  # history replies are re-encoded from stripped text
        return ids, spans

    def build_prompt(self, system: str, history: list[Exchange], turn: PreparedTurn, max_window_tokens: int) -> Prompt:
        t = self.tokenizer
        ids = [t.im_start_id] + t.encode("system") + t.encode("\n") + t.encode(system or self.default_system_prompt)
        ids += [t.im_end_id]
        # History newest first while system + kept history stays under the window (the query is not counted).
        kept: list[tuple[list[int], list[AudioSpan]]] = []
        context_len = 0
        for ex in reversed(history):
            ex_ids, ex_spans = self._exchange_ids(ex.user, ex.reply_text)
            if len(ids) + context_len + len(ex_ids) >= max_window_tokens:
                break
            kept.insert(0, (ex_ids, ex_spans))
            context_len += len(ex_ids)
        spans: list[AudioSpan] = []
        for ex_ids, ex_spans in [*kept, self._exchange_ids(turn, None)]:
            spans += [AudioSpan(len(ids) + sp.start, sp.embeds, sp.key) for sp in ex_spans]
            ids += ex_ids
        return Prompt(ids=ids, audio=spans, history_kept=len(kept))

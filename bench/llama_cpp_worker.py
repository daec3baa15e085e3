"""llama-cpp-python side of `bench/peers.py`: runs inside the bench's own venv (`bench/llama_peer.py` builds it), so it
imports nothing from this project, only the standard library, numpy and `llama_cpp`.

Protocol: argv = GGUF path, thread count, max streams; then one JSON request per stdin line, one JSON reply per stdout
line (llama.cpp's own log goes to stderr):

    {"op": "timed", "prompt": [ids], "streams": S, "tokens": N}
        S copies of the prompt as S sequences, prefilled in one batch, then N - 1 batched steps of one token per
        sequence, greedy (argmax of the logits), stop ids ignored so every stream makes N tokens;
        -> {"first_token_s": prefill + first pick, "decode_s": first token -> last, "tokens": [[ids] per stream]}
    {"op": "answer", "prompt": [ids], "tokens": N, "stop": [ids]}
        one greedy answer, stopping at a stop id (not returned) -> {"ids": [...]}

It uses llama.cpp's C API through llama_cpp's ctypes bindings (the high-level `Llama` class has no way to pass
`use_extra_bufts` and no batch of several sequences). Weights stay out of the CPU "extra buffer" (repacked) types
(`use_extra_bufts = False`, llama.cpp's `--no-repack`): on a CPU with AMX, llama_decode segfaulted with them
(../shared/MODELS.md).
"""

from __future__ import annotations

import json
import sys
import time

import llama_cpp as L
import numpy as np

N_BATCH = 512  # tokens per llama_decode call (prompts here are far shorter)
CTX_PER_STREAM = 1024


class Runner:
    def __init__(self, gguf: str, threads: int, max_streams: int):
        L.llama_backend_init()
        mp = L.llama_model_default_params()
        mp.n_gpu_layers = 0
        mp.use_extra_bufts = False
        self.model = L.llama_model_load_from_file(gguf.encode(), mp)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {gguf}")
        cp = L.llama_context_default_params()
        cp.n_ctx = CTX_PER_STREAM * max_streams
        cp.n_batch = cp.n_ubatch = N_BATCH
        cp.n_seq_max = max_streams
        cp.n_threads = cp.n_threads_batch = threads
        self.ctx = L.llama_init_from_model(self.model, cp)
        self.n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))
        self.batch = L.llama_batch_init(N_BATCH, 0, max_streams)
        self.max_streams = max_streams

    def _decode(self, rows: list[tuple[int, int, int, bool]]) -> None:
        """rows: (token, position, sequence, wants logits)."""
        b = self.batch
        b.n_tokens = len(rows)
        for i, (tok, pos, seq, logits) in enumerate(rows):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos, 1, logits
            b.seq_id[i][0] = seq
        rc = L.llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")

    def _argmax(self, i: int) -> int:
        return int(np.argmax(np.ctypeslib.as_array(L.llama_get_logits_ith(self.ctx, i), shape=(self.n_vocab,))))

    def _start(self, prompt: list[int], streams: int) -> list[int]:
        """Clear the KV cache, prefill `streams` copies in one batch; the first token of each."""
        L.llama_memory_clear(L.llama_get_memory(self.ctx), True)
        n = len(prompt)
        rows = [(t, p, s, p == n - 1) for s in range(streams) for p, t in enumerate(prompt)]
        self._decode(rows)
        return [self._argmax((s + 1) * n - 1) for s in range(streams)]

    def timed(self, prompt: list[int], streams: int, tokens: int) -> dict:
        if not 1 <= streams <= self.max_streams:
            raise ValueError(f"streams must be 1..{self.max_streams}, got {streams}")
        t0 = time.perf_counter()
        out = [[t] for t in self._start(prompt, streams)]
        t_first = time.perf_counter()
        for step in range(1, tokens):
            self._decode([(out[s][-1], len(prompt) + step - 1, s, True) for s in range(streams)])
            for s in range(streams):
                out[s].append(self._argmax(s))
        t_last = time.perf_counter()
        return {"first_token_s": t_first - t0, "decode_s": t_last - t_first, "tokens": out}

    def answer(self, prompt: list[int], tokens: int, stop: list[int]) -> dict:
        ids = self._start(prompt, 1)
        while ids[-1] not in stop and len(ids) < tokens:
            self._decode([(ids[-1], len(prompt) + len(ids) - 1, 0, True)])
            ids.append(self._argmax(0))
        return {"ids": ids[: next((i for i, t in enumerate(ids) if t in stop), len(ids))]}


def main() -> int:
    gguf, threads, max_streams = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    runner = Runner(gguf, threads, max_streams)
    print(json.dumps({"ready": True, "llama_cpp": L.__version__}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        if req["op"] == "timed":
            reply = runner.timed(req["prompt"], req["streams"], req["tokens"])
        elif req["op"] == "answer":
            reply = runner.answer(req["prompt"], req["tokens"], req["stop"])
        else:
            reply = {"error": f"unknown op {req['op']!r}; expected timed or answer"}
        print(json.dumps(reply), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

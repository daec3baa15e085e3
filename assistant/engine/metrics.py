"""Prometheus metrics of the engine, registered once in the default registry (the server exposes it at /metrics).

Several `Engine` instances in one process (tests) share these series; that is what the default registry allows.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

# seconds; voice latency lives between a few ms (decode step) and tens of seconds (long answers on CPU)
_LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)

PHASE_SECONDS = Histogram(
    "assistant_engine_phase_seconds",
    "Per-response time spent in each phase (queue, encode, prefill, first_token, decode, total)",
    ["phase"],
    buckets=_LATENCY_BUCKETS_S,
)
RESPONSES = Counter("assistant_engine_responses_total", "Responses finished, by final status", ["status"])
TOKENS = Counter(
    "assistant_engine_tokens_total",
    "Tokens processed, by kind (prompt, prefilled, reused, output, decoded = rows of decode steps)",
    ["kind"],
)
ADMISSION_REJECTED = Counter("assistant_engine_rejected_total", "Responses refused by admission control (server_busy)")
CACHE_EVENTS = Counter(
    "assistant_engine_cache_events_total", "KV-cache decisions per response and evictions", ["event"]
)
ACTIVE = Gauge("assistant_engine_active_responses", "Responses in the decode batch")
QUEUED = Gauge("assistant_engine_queued_responses", "Responses waiting for a batch slot")
CACHED_TOKENS = Gauge("assistant_engine_cached_tokens", "KV-cache tokens held across all sessions")
SPECULATIONS = Counter(
    "assistant_engine_speculative_turns_total",
    "Speculative user turns by outcome (prepared, confirmed = reused, missed = redone at confirm, discarded)",
    ["outcome"],
)
PREFIX_SNAPSHOTS = Counter(
    "assistant_engine_prefix_snapshots_total",
    "Shared system-prompt KV snapshots for empty session caches by outcome (hit = copied instead of prefilled, "
    "miss, stored = harvested after a full prefill, dropped = cache budget)",
    ["outcome"],
)
DECODE_SECONDS = Counter(
    "assistant_engine_decode_seconds_total",
    "Time in batched decode steps (prefills excluded); tokens/kind=decoded over it is the decode speed",
)
BATCH_SIZE = Histogram(
    "assistant_engine_decode_batch_size", "Responses per batched decode step", buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32)
)


def observe_timings(timings_ms: dict[str, float]) -> None:
    for phase, ms in timings_ms.items():
        PHASE_SECONDS.labels(phase=phase).observe(ms / 1000.0)

"""Prometheus metrics with vLLM's metric names under the `engine_builder:` prefix (docs/metrics.md lists them).

Request series are recorded by the routes as requests finish; the engine's own state is read at each scrape:
current values as gauges, totals since start as counters."""

from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from http import HTTPStatus

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from engine_builder.common.types import EncoderBatchStats, EngineStats, GrammarStats

PREFIX = "engine_builder:"
# e2e, TTFT and queue time: fine steps for an encoder's milliseconds up to vLLM's 7680 s for long CPU generations
LATENCY_BUCKETS = (
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    320.0,
    640.0,
    1280.0,
    2560.0,
    7680.0,
)
# inter-token latency and time per output token: up to vLLM's 80 s, so a decode stall shows as one
TOKEN_LATENCY_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)


@dataclass
class ChoiceTiming:
    """One choice's token times, for the token-latency series."""

    first_token_at: float | None = None
    last_token_at: float = 0.0
    num_tokens: int = 0


class TokenGapHistogram(Collector):
    """A histogram observed once per generated token, at the cost of one bisect per delta: `observe(value, count)`
    counts `count` equal observations at once (prometheus_client's Histogram takes a lock and walks the buckets
    for each one). Observed and scraped on the event loop, so it needs no lock; no samples before the first."""

    def __init__(self, name: str, documentation: str, buckets: Sequence[float], labels: dict[str, str]) -> None:
        self._name = name
        self._documentation = documentation
        self._bounds = tuple(buckets)
        self._labels = labels
        self._counts = [0] * (len(self._bounds) + 1)  # the last one: above every bound
        self._sum = 0.0

    def observe(self, value: float, count: int = 1) -> None:
        self._counts[bisect_left(self._bounds, value)] += count
        self._sum += value * count

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self._name, self._documentation, labels=list(self._labels))
        if any(self._counts):
            cumulative, buckets = 0, []
            for bound, count in zip([*map(floatToGoString, self._bounds), "+Inf"], self._counts, strict=True):
                cumulative += count
                buckets.append((bound, float(cumulative)))
            family.add_metric(list(self._labels.values()), buckets, self._sum)
        yield family


class _EngineSeries(Collector):
    """The engine's state at each scrape: current values as gauges, totals since start as counters."""

    def __init__(
        self,
        stats: Callable[[], EngineStats],
        labels: dict[str, str],
        inflight: Callable[[], int],
        generates: bool,
    ) -> None:
        self._stats = stats
        self._labels = labels
        self._inflight = inflight
        self._generates = generates

    def collect(self) -> Iterator[Metric]:
        stats = self._stats()
        gauges: list[tuple[str, str, float]] = [
            (
                "num_requests_running",
                "Requests being computed: in the running batch (an encoder: a batch of theirs has started).",
                stats.num_running,
            ),
            (
                "num_requests_waiting",
                "Requests queued for their first step (an encoder: for their first batch).",
                stats.num_waiting,
            ),
            (
                "num_requests_inflight",
                "Requests accepted by the HTTP server and not finished (the autoscaling signal).",
                self._inflight(),
            ),
        ]
        counters: list[tuple[str, str, float]] = []
        if self._generates:  # an encoder has no KV cache, prefix cache, preemption or lookahead to report
            gauges += [
                ("kv_cache_usage_perc", "Fraction of KV cache blocks in use (0..1).", stats.kv_cache_usage),
                ("num_kv_cache_blocks", "KV cache blocks in the pool.", stats.num_kv_blocks),
            ]
            counters += self._generation_counters(stats)
        if stats.encoder_batches is not None:
            counters += self._encoder_counters(stats.encoder_batches)
        if stats.grammars is not None:
            counters += self._grammar_counters(stats.grammars)
        names, values = list(self._labels), list(self._labels.values())
        for name, documentation, value in gauges:
            gauge = GaugeMetricFamily(f"{PREFIX}{name}", documentation, labels=names)
            gauge.add_metric(values, float(value))
            yield gauge
        for name, documentation, value in counters:
            counter = CounterMetricFamily(f"{PREFIX}{name}", documentation, labels=names)
            counter.add_metric(values, float(value))
            yield counter

    @staticmethod
    def _generation_counters(stats: EngineStats) -> list[tuple[str, str, float]]:
        return [
            ("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", stats.num_prefix_cache_queries),
            (
                "prefix_cache_hits",
                "Prompt tokens found in the prefix cache (hit rate: rate of hits / rate of queries).",
                stats.num_prefix_cache_hits,
            ),
            (
                "num_preemptions",
                "Preemptions (a running request's KV cache freed, recomputed later).",
                stats.num_preemptions,
            ),
            ("spec_decode_num_drafts", "Decode steps that verified a lookahead draft.", stats.num_lookahead_drafts),
            (
                "spec_decode_num_accepted_tokens",
                "Lookahead draft tokens accepted (tokens per drafted step: 1 + accepted / drafts).",
                stats.num_lookahead_accepted_tokens,
            ),
        ]

    @staticmethod
    def _grammar_counters(grammars: GrammarStats) -> list[tuple[str, str, float]]:
        return [
            (
                "structured_output_grammar_compiles",
                "Structured-output grammars compiled (each distinct schema, regex or grammar once while cached).",
                grammars.num_compiles,
            ),
            (
                "structured_output_grammar_compile_seconds",
                "Time those compiles took (mean: rate of seconds / rate of compiles).",
                grammars.compile_seconds,
            ),
            (
                "structured_output_grammar_reused",
                "Requests whose grammar was cached or already compiling for another request.",
                grammars.num_reused,
            ),
            (
                "structured_output_grammar_compile_timeouts",
                "Requests refused (400) because their grammar took longer than the compile limit to compile.",
                grammars.num_timeouts,
            ),
        ]

    @staticmethod
    def _encoder_counters(batches: EncoderBatchStats) -> list[tuple[str, str, float]]:
        return [
            ("encoder_batches", "Forward passes the encoder ran.", batches.num_batches),
            (
                "encoder_failed_batches",
                "Forward passes that failed (their requests answered an error).",
                batches.num_failed_batches,
            ),
            ("encoder_batch_inputs", "Inputs (rows) in those passes (mean batch size: / batches).", batches.num_inputs),
            ("encoder_batch_tokens", "Tokens of those inputs.", batches.num_tokens),
            (
                "encoder_batch_padded_tokens",
                "Tokens the model ran, padding included: rows x longest row per pass (padding: 1 - tokens / padded).",
                batches.num_padded_tokens,
            ),
            ("encoder_busy_seconds", "Time spent computing passes (its rate is the busy fraction).", batches.busy_s),
        ]


class ServerMetrics:
    def __init__(
        self,
        model_name: str,
        stats: Callable[[], EngineStats],
        inflight: Callable[[], int],
        generates: bool = True,
    ) -> None:
        """`generates` False (an encoder): no KV cache or generation series; the token-latency series stay
        declared, without samples."""
        self.registry = CollectorRegistry()
        labels = ["model_name"]
        self.model_name = model_name
        registry = self.registry
        self.ttft = Histogram(
            f"{PREFIX}time_to_first_token_seconds",
            "Time from arrival to a request's first token (once per request, whatever its n).",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.inter_token_latency = TokenGapHistogram(
            f"{PREFIX}inter_token_latency_seconds",
            "Time between consecutive tokens of one choice, once per token after the choice's first (a delta of k "
            "tokens counts k gaps of its gap / k).",
            TOKEN_LATENCY_BUCKETS,
            {"model_name": model_name},
        )
        registry.register(self.inter_token_latency)
        self.request_tpot = Histogram(
            f"{PREFIX}request_time_per_output_token_seconds",
            "A choice's mean time per output token after its first: (last token - first token) / (tokens - 1), "
            "once per choice of two tokens or more (each of n choices counts, as vLLM counts each as a request).",
            labels,
            buckets=TOKEN_LATENCY_BUCKETS,
            registry=registry,
        )
        self.e2e = Histogram(
            f"{PREFIX}e2e_request_latency_seconds",
            "End-to-end request latency, once per request (its n choices share one observation).",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.queue_time = Histogram(
            f"{PREFIX}request_queue_time_seconds",
            "Time from arrival to the first scheduled step (an encoder: from its inputs queued to its first batch).",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.prompt_tokens = Counter(
            f"{PREFIX}prompt_tokens", "Prompt tokens processed.", labels, registry=registry
        )
        self.generation_tokens = Counter(
            f"{PREFIX}generation_tokens", "Tokens generated.", labels, registry=registry
        )
        self.request_success = Counter(
            f"{PREFIX}request_success",
            "Finished requests by finish reason, one per choice (abort: the client went away).",
            [*labels, "finished_reason"],
            registry=registry,
        )
        self.request_errors = Counter(
            f"{PREFIX}request_errors",
            "Requests the server failed (5xx, and 424 when an encoder model fails), by status; client errors (4xx) are not counted.",
            [*labels, "status"],
            registry=registry,
        )
        registry.register(_EngineSeries(stats, {"model_name": model_name}, inflight, generates))

    def record_finished(
        self, latency_s: float, num_prompt_tokens: int, finished_reasons: Iterable[str]
    ) -> None:
        """The end of an admitted request: its latency and prompt tokens, and one success per finished choice
        (none when it failed)."""
        self.e2e.labels(self.model_name).observe(latency_s)
        self.prompt_tokens.labels(self.model_name).inc(num_prompt_tokens)
        for reason in finished_reasons:
            self.request_success.labels(self.model_name, reason).inc()

    def record_tokens(self, choice: ChoiceTiming, num_tokens: int, now: float) -> None:
        """`num_tokens` new tokens of one choice arrived at `now`. Each token after the choice's first is one
        inter-token gap: a delta of k tokens counts k gaps of its gap / k (vLLM's way with a multi-token step),
        and tokens that came with the choice's first count gaps of 0, so that the gaps of a choice sum to its
        decode time and number its tokens - 1."""
        if choice.first_token_at is None:
            choice.first_token_at = now
            if num_tokens > 1:
                self.inter_token_latency.observe(0.0, num_tokens - 1)
        else:
            self.inter_token_latency.observe((now - choice.last_token_at) / num_tokens, num_tokens)
        choice.last_token_at = now
        choice.num_tokens += num_tokens

    def record_decode(self, choices: Iterable[ChoiceTiming]) -> None:
        """The end of a request's choices: each one of two tokens or more observes its own time per output token
        (its decode time over its own tokens: n choices decoding side by side are each as slow as one)."""
        for choice in choices:
            if choice.first_token_at is not None and choice.num_tokens > 1:
                decode_s = choice.last_token_at - choice.first_token_at
                self.request_tpot.labels(self.model_name).observe(decode_s / (choice.num_tokens - 1))

    def record_queue_time(self, queue_s: float) -> None:
        self.queue_time.labels(self.model_name).observe(queue_s)

    def record_error(self, status: int) -> None:
        """An error answered to a client: the server's own failures count (5xx, and 424, TEI's answer when the
        encoder model failed), refused client input does not."""
        if status >= 500 or status == HTTPStatus.FAILED_DEPENDENCY:
            self.request_errors.labels(self.model_name, str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)

"""Prometheus metrics with vLLM's metric names under the `engine_builder:` prefix."""

from collections.abc import Callable, Iterable, Iterator
from http import HTTPStatus

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from engine_builder.common.types import EngineStats

PREFIX = "engine_builder:"
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
)
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
)


class _EngineGauges(Collector):
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

    def collect(self) -> Iterator[GaugeMetricFamily]:
        stats = self._stats()
        names = list(self._labels)
        values = list(self._labels.values())
        gauges: list[tuple[str, str, float]] = [
            ("num_requests_running", "Requests in the running batch.", stats.num_running),
            ("num_requests_waiting", "Requests waiting for admission.", stats.num_waiting),
            (
                "num_requests_inflight",
                "Requests accepted by the HTTP server and not finished (the autoscaling signal).",
                self._inflight(),
            ),
        ]
        if self._generates:  # an encoder has no KV cache, prefix cache, preemption or lookahead to report
            gauges += self._generation_gauges(stats)
        for name, documentation, value in gauges:
            family = GaugeMetricFamily(f"{PREFIX}{name}", documentation, labels=names)
            family.add_metric(values, float(value))
            yield family

    @staticmethod
    def _generation_gauges(stats: EngineStats) -> list[tuple[str, str, float]]:
        return [
            ("kv_cache_usage_perc", "Fraction of KV cache blocks in use (0..1).", stats.kv_cache_usage),
            ("num_kv_cache_blocks", "KV cache blocks in the pool.", stats.num_kv_blocks),
            (
                "prefix_cache_hit_rate",
                "Prompt tokens served from the prefix cache / prompt tokens.",
                stats.prefix_cache_hit_rate,
            ),
            ("num_preemptions", "Preemptions since start (recompute).", stats.num_preemptions),
            (
                "lookahead_accepted_tokens_per_step",
                "Mean tokens accepted per lookahead step.",
                stats.lookahead_accepted_per_step,
            ),
        ]


class ServerMetrics:
    def __init__(
        self,
        model_name: str,
        stats: Callable[[], EngineStats],
        inflight: Callable[[], int],
        generates: bool = True,
    ) -> None:
        """`generates` False (an encoder): no KV cache gauges; the token-latency series stay declared, without
        samples."""
        self.registry = CollectorRegistry()
        labels = ["model_name"]
        self.model_name = model_name
        registry = self.registry
        self.ttft = Histogram(
            f"{PREFIX}time_to_first_token_seconds",
            "Time to first token.",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.tpot = Histogram(
            f"{PREFIX}time_per_output_token_seconds",
            "Time per output token after the first.",
            labels,
            buckets=TOKEN_LATENCY_BUCKETS,
            registry=registry,
        )
        self.e2e = Histogram(
            f"{PREFIX}e2e_request_latency_seconds",
            "End-to-end request latency.",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.queue_time = Histogram(
            f"{PREFIX}request_queue_time_seconds",
            "Time from arrival to the first scheduled step.",
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
            "Finished requests by finish reason.",
            [*labels, "finished_reason"],
            registry=registry,
        )
        self.request_errors = Counter(
            f"{PREFIX}request_errors",
            "Requests the server failed (5xx, and 424 when an encoder model fails), by status; client errors (4xx) are not counted.",
            [*labels, "status"],
            registry=registry,
        )
        registry.register(_EngineGauges(stats, {"model_name": model_name}, inflight, generates))

    def record_finished(
        self, latency_s: float, num_prompt_tokens: int, finished_reasons: Iterable[str]
    ) -> None:
        """The end of an admitted request: its latency and prompt tokens, and one success per finished choice
        (none when it failed)."""
        self.e2e.labels(self.model_name).observe(latency_s)
        self.prompt_tokens.labels(self.model_name).inc(num_prompt_tokens)
        for reason in finished_reasons:
            self.request_success.labels(self.model_name, reason).inc()

    def record_error(self, status: int) -> None:
        """An error answered to a client: the server's own failures count (5xx, and 424, TEI's answer when the
        encoder model failed), refused client input does not."""
        if status >= 500 or status == HTTPStatus.FAILED_DEPENDENCY:
            self.request_errors.labels(self.model_name, str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)

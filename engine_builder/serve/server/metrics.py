"""Prometheus metrics with vLLM's metric names under the `engine_builder:` prefix."""

from collections.abc import Callable, Iterator

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
        self, stats: Callable[[], EngineStats], labels: dict[str, str], inflight: Callable[[], int]
    ) -> None:
        self._stats = stats
        self._labels = labels
        self._inflight = inflight

    def collect(self) -> Iterator[GaugeMetricFamily]:
        stats = self._stats()
        names = list(self._labels)
        values = list(self._labels.values())
        for name, documentation, value in [
            ("num_requests_running", "Requests in the running batch.", stats.num_running),
            ("num_requests_waiting", "Requests waiting for admission.", stats.num_waiting),
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
            (
                "num_requests_inflight",
                "Requests accepted by the HTTP server and not finished (the autoscaling signal).",
                self._inflight(),
            ),
        ]:
            family = GaugeMetricFamily(f"{PREFIX}{name}", documentation, labels=names)
            family.add_metric(values, float(value))
            yield family


class ServerMetrics:
    def __init__(
        self, model_name: str, stats: Callable[[], EngineStats], inflight: Callable[[], int]
    ) -> None:
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
            "Requests answered with an error.",
            [*labels, "status"],
            registry=registry,
        )
        registry.register(_EngineGauges(stats, {"model_name": model_name}, inflight))

    def render(self) -> bytes:
        return generate_latest(self.registry)

"""Prometheus metrics for one serving replica (`GET /metrics`, text format from `prometheus_client`).

    medtune_requests_total{route, model, status}        every HTTP request, by its final status
    medtune_request_seconds{route, model}               request latency to the last byte (streams included)
    medtune_ttft_seconds{model}                         time to the first generated token
    medtune_generation_tokens_per_second{model}         completion tokens / generation time, per request
    medtune_tokens_total{model, kind}                   prompt and completion tokens
    medtune_requests_in_progress / medtune_queue_depth  admitted requests generating / waiting for a slot
    medtune_guardrail_verdicts_total{stage, action, category, layer}
    medtune_finetuned_info{checkpoint, serving}         1 for the checkpoint behind `finetuned`
    medtune_reloads_total{result}                       hot reloads: loaded | refused

One registry per Service (not the process-global one), so several apps in one process (tests)
do not share counters. Under Ray Serve each replica answers with its own figures; a cluster
scrapes every replica pod (deploy/: PodMonitor).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120)
RATE_BUCKETS = (1, 2, 5, 10, 20, 40, 80, 160, 320)


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("medtune_requests", "HTTP requests by route, model and final status.",
                                ["route", "model", "status"], registry=r)
        self.latency = Histogram("medtune_request_seconds", "Request latency to the last byte.", ["route", "model"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("medtune_ttft_seconds", "Time to the first generated token.", ["model"],
                              buckets=LATENCY_BUCKETS, registry=r)
        self.tokens_per_s = Histogram("medtune_generation_tokens_per_second", "Completion tokens per second of generation.",
                                      ["model"], buckets=RATE_BUCKETS, registry=r)
        self.tokens = Counter("medtune_tokens", "Prompt and completion tokens.", ["model", "kind"], registry=r)
        self.in_progress = Gauge("medtune_requests_in_progress", "Admitted requests holding a generation slot.", registry=r)
        self.queue_depth = Gauge("medtune_queue_depth", "Admitted requests waiting for a generation slot.", registry=r)
        self.verdicts = Counter("medtune_guardrail_verdicts", "Guardrail verdicts by stage, action, category and layer.",
                                ["stage", "action", "category", "layer"], registry=r)
        self.finetuned = Gauge("medtune_finetuned_info", "1 for the checkpoint serving as `finetuned`.",
                               ["checkpoint", "serving"], registry=r)
        self.reloads = Counter("medtune_reloads", "Hot reloads of the latest checkpoint.", ["result"], registry=r)

    def verdict(self, stage: str, verdict) -> None:
        self.verdicts.labels(stage, verdict.action, verdict.category or "", getattr(verdict, "layer", None) or "").inc()

    def serving(self, checkpoint: str | None, mode: str | None) -> None:
        self.finetuned.clear()
        if checkpoint:
            self.finetuned.labels(checkpoint, mode or "").set(1)

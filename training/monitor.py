"""Throughput, model-FLOPs utilisation and per-node network bandwidth for training runs.

The network monitor reproduces the seed's network-adapter analysis inside every run: each
worker samples its node's NIC counters (loopback excluded) once a second and reports the
average and peak receive/transmit rates in Gbit/s.
"""

from __future__ import annotations

import socket
import threading
import time


def model_flops_per_token(
    n_body: int, n_layers: int, hidden: int, vocab: int, seq_len: float, answer_fraction: float, full: bool
) -> float:
    """The model FLOPs one training token needs (the "model FLOPs" of MFU, the same for any
    implementation): the decoder body's matmuls for every token (2 per weight forward, 2 for the
    activation gradient, 2 more for weight gradients when all weights train; LoRA's frozen weights
    get none) plus attention scores, and the output head only where a loss is taken (answer tokens).
    `n_body`: parameters of the decoder's linear layers (embeddings excluded)."""
    passes = 3 if full else 2
    body = passes * (2 * n_body + 4 * n_layers * hidden * seq_len)
    head = passes * 2 * hidden * vocab * answer_fraction
    return body + head


def body_params(model) -> int:
    """Parameters of a causal LM's decoder excluding the token embeddings (and any LoRA extras)."""
    decoder = model.get_decoder()
    emb = decoder.get_input_embeddings() if hasattr(decoder, "get_input_embeddings") else None
    emb_ids = {id(p) for p in emb.parameters()} if emb is not None else set()
    return sum(getattr(p, "ds_numel", p.numel()) for n, p in decoder.named_parameters() if id(p) not in emb_ids and "lora_" not in n)


def measure_peak_tflops(device: str = "cpu", seconds: float = 0.5) -> float:
    """Achievable bf16 matmul throughput of this process (its threads, or its GPU) in TFLOP/s:
    the best of a few square sizes, each timed for `seconds` after a warm-up."""
    import torch

    sizes = (1024, 2048, 3072) if device == "cpu" else (4096, 8192)
    best = 0.0
    for n in sizes:
        a = torch.randn(n, n, dtype=torch.bfloat16, device=device)
        b = torch.randn(n, n, dtype=torch.bfloat16, device=device)
        for _ in range(2):
            torch.mm(a, b)
        if device != "cpu":
            torch.cuda.synchronize()
        iters = 0
        start = time.perf_counter()
        while time.perf_counter() - start < seconds or iters < 3:
            torch.mm(a, b)
            iters += 1
        if device != "cpu":
            torch.cuda.synchronize()
        best = max(best, 2 * n**3 * iters / (time.perf_counter() - start) / 1e12)
    return best


def _nic_bytes() -> tuple[int, int]:
    import psutil

    rx = tx = 0
    for name, c in psutil.net_io_counters(pernic=True).items():
        if name == "lo" or name.startswith("lo"):
            continue
        rx += c.bytes_recv
        tx += c.bytes_sent
    return rx, tx


class NetMonitor:
    """Samples this node's NIC byte counters in a daemon thread; `summary()` gives Gbit/s."""

    def __init__(self, interval: float = 1.0):
        self.interval = interval
        self.node = socket.gethostname()
        self._peak_rx = 0.0
        self._peak_tx = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="medtune-netmon", daemon=True)

    def start(self) -> "NetMonitor":
        self._start_t = time.monotonic()
        self._start_rx, self._start_tx = _nic_bytes()
        self._thread.start()
        return self

    def _run(self) -> None:
        last_t, (last_rx, last_tx) = time.monotonic(), _nic_bytes()
        while not self._stop.wait(self.interval):
            now, (rx, tx) = time.monotonic(), _nic_bytes()
            dt = max(now - last_t, 1e-6)
            self._peak_rx = max(self._peak_rx, (rx - last_rx) * 8 / dt / 1e9)
            self._peak_tx = max(self._peak_tx, (tx - last_tx) * 8 / dt / 1e9)
            last_t, last_rx, last_tx = now, rx, tx

    def summary(self) -> dict:
        self._stop.set()
        self._thread.join(timeout=2 * self.interval)
        rx, tx = _nic_bytes()
        dt = max(time.monotonic() - self._start_t, 1e-6)
        avg_rx = (rx - self._start_rx) * 8 / dt / 1e9
        avg_tx = (tx - self._start_tx) * 8 / dt / 1e9
        return {
            "node": self.node,
            "seconds": round(dt, 1),
            "rx_avg_gbps": round(avg_rx, 4),
            "tx_avg_gbps": round(avg_tx, 4),
            "rx_peak_gbps": round(max(self._peak_rx, avg_rx), 4),
            "tx_peak_gbps": round(max(self._peak_tx, avg_tx), 4),
        }

"""Monitoring a run: Prometheus metrics and threshold alerts.

metrics_port= serves the run's figures on http://127.0.0.1:PORT/metrics while it runs (and
two minutes after), for Prometheus or Grafana to scrape. alerts= sets thresholds; a rule
crossed warns once per cooldown (never a storm): on the dashboard, the "nbllm" logger,
on_alert= and result.summary.alerts. Here nbllm's test server is made slow so that the
latency rule fires. No key, no network. Needs prometheus-client
(pip install 'nbllm[metrics]'). (The flow of notebooks/08-monitoring.ipynb.)

    python examples/monitoring.py
"""

from __future__ import annotations

import socket
import urllib.request
from pathlib import Path

import nbllm
from nbllm.executor.events import Alert
from nbllm.testing import TestServer

DATA = Path(__file__).resolve().parent / "data" / "finqa_sample.jsonl"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(port: int, name: str) -> list[str]:
    """The lines of one metric on /metrics, as a Prometheus server would read them."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return [line for line in text.splitlines() if line.startswith(name + "{")]


def on_alert(alert: Alert) -> None:
    # Your own hook: post to a chat channel, page someone, stop the run...
    print(f"on_alert: {alert.rule} crossed ({alert.value:.2f} > {alert.threshold})")


def main() -> None:
    port = free_port()  # a real setup picks a fixed one, such as 9464
    # Every answer takes 0.15 s; the alert fires above a p95 of 0.1 s (default: 60 s).
    with TestServer(latency=0.15) as server:
        result = nbllm.run(
            DATA,
            model="nbllm-test",
            api_base=server.url,
            metrics_port=port,
            alerts={"latency_p95_s": 0.1},
            on_alert=on_alert,
            progress=False,
            checkpoint=False,
            cache=False,
        )
    print(result.verdict)
    for line in scrape(port, "nbllm_turns_total"):
        print(line)
    print("alerts in the summary:", len(result.summary.alerts))


if __name__ == "__main__":
    main()

"""Threshold alerts: a run that goes wrong says so once, not in a storm.

``alerts=`` on ``nbllm.run`` / ``arun`` / ``submit`` sets the rules' thresholds (a number)
or turns a rule off (``False``); the rules not named keep their defaults (``DEFAULTS``), and
``alerts=False`` turns them all off. Two settings go with them: ``window_s`` (the recent
window the rates and the p95 are taken over, default 60 s) and ``cooldown_s`` (how long a
rule that fired stays quiet, default 300 s). The rules:

``latency_p95_s``      the p95 of the answered requests' latency over the window is above
                       this many seconds (default 60);
``error_rate``         failed attempts (5xx, timeouts, refused connections, ...) are more
                       than this share of the window's attempts (0.25);
``rate_limited_rate``  429s are more than this share of the window's attempts (0.2);
``throughput_drop``    answers per second over the window fell below this share of the
                       pace of the window before it (0.5: halved);
``gpu_memory``         a GPU's memory in use is above this share of its total (0.95), read
                       from NVML at most every 5 s (nothing where there is no GPU);
``spend_share``        the run's cost has passed this share of ``max_cost_usd`` (0.8).

A rate needs ``MIN_ATTEMPTS`` attempts in the window before it can fire. The rates are kept
as attempts come; the rules that read the whole window (the p95, the pace, the GPUs) run at
most twice a second and once more at the run's last turn. When a rule crosses, its
``Alert`` (an executor event) goes, once per cooldown, to every listener of the run (the
notebook dashboard shows it as a line under its errors), to the ``nbllm`` logger as a warning, to
``on_alert`` (a callable: a webhook of one's own) and into ``result.summary.alerts``.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable
from functools import partial
from typing import Any

from nbllm.alert_rules import DEFAULTS, SETTINGS, AlertRules, alert_rules
from nbllm.engines.hardware import nvml_reading, open_nvml
from nbllm.executor.events import (
    Alert,
    AttemptFinished,
    Event,
    RunFinished,
    RunStarted,
    TurnFinished,
)
from nbllm.results_sample import percentile

__all__ = ["DEFAULTS", "MIN_ATTEMPTS", "SETTINGS", "AlertRules", "AlertWatcher", "alert_rules"]

log = logging.getLogger("nbllm")

#: Attempts a window needs before a rate or a p95 over it can fire.
MIN_ATTEMPTS = 20
_GPU_EVERY_S = 5.0
#: The rate rules: (rule, the attempts' outcome it counts, what the message says of them).
_RATES = (("error_rate", "error", "failed"), ("rate_limited_rate", "rate_limited", "got a 429"))
#: The rules are checked at most this often (seconds): a check reads the whole window.
_CHECK_EVERY_S = 0.5


class AlertWatcher:
    """A run's listener that checks the rules as events come (see the module).

    ``forward`` delivers each ``Alert`` to the run's other listeners (set by whoever builds
    the run); ``fired`` keeps every alert raised, for the summary.
    """

    def __init__(
        self,
        rules: AlertRules,
        *,
        on_alert: Callable[[Alert], Any] | None = None,
        max_cost_usd: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rules = rules
        self.on_alert = on_alert
        self.max_cost_usd = max_cost_usd
        self.forward: Callable[[Event], None] | None = None
        self.fired: list[Alert] = []
        self._clock = clock
        self._last: dict[str, float] = {}
        # (time, latency or None, outcome) of each attempt, and the time of each answer.
        self._attempts: collections.deque[tuple[float, float | None, str]] = collections.deque()
        self._answers: collections.deque[float] = collections.deque()
        self._cost = 0.0
        self._gpu_at = -_GPU_EVERY_S
        self._checked_at = -_CHECK_EVERY_S
        self._turns_left = -1  # turns of the run still to finish (RunStarted tells)
        self._outcomes: collections.Counter[str] = collections.Counter()  # in the window

    def __call__(self, event: Event) -> None:
        now = self._clock()
        if isinstance(event, AttemptFinished):
            if event.outcome != "cancelled":
                latency = event.latency_s if event.outcome == "ok" else None
                self._attempts.append((now, latency, event.outcome))
                self._outcomes[event.outcome] += 1
            self._check(now)
        elif isinstance(event, TurnFinished):
            self._turns_left -= 1
            if self._turns_left == 0:  # the last turn: before the result is made
                self._check(now, whole=True)
            record = event.record
            if record.ok and not record.resumed and not record.cached:
                self._answers.append(now)
                self._cost += record.cost_usd or 0.0
                self._spend()
        elif isinstance(event, RunStarted):
            self._turns_left = event.turns
            self._answers.clear()
            self._attempts.clear()
            self._outcomes.clear()
        elif isinstance(event, RunFinished) and self._turns_left > 0:
            self._check(now, whole=True)  # stopped early: what the last half second brought

    # -- the rules -----------------------------------------------------------------

    def _check(self, now: float, *, whole: bool = False) -> None:
        """The rates at every attempt (counts kept as they come); the rules that read the
        whole window at most every ``_CHECK_EVERY_S``, and at the run's end (``whole``)."""
        window = self.rules.window_s
        while self._attempts and self._attempts[0][0] < now - window:
            self._outcomes[self._attempts.popleft()[2]] -= 1
        rules = self.rules.thresholds
        attempts = self._attempts
        n = len(attempts)
        if n >= MIN_ATTEMPTS:
            for rule, outcome, what in _RATES:
                if rule in rules:
                    share = self._outcomes[outcome] / n
                    self._rate(rule, share, f"{share:.0%} of the last {n} attempts {what}")
        if not whole and now - self._checked_at < _CHECK_EVERY_S:
            return
        self._checked_at = now
        while self._answers and self._answers[0] < now - 2 * window:
            self._answers.popleft()
        if n >= MIN_ATTEMPTS and "latency_p95_s" in rules:
            latencies = sorted(lat for _, lat, _ in attempts if lat is not None)
            p95 = percentile(latencies, 0.95)
            if p95 is not None:
                self._rate("latency_p95_s", p95, f"request latency p95 is {p95:.2f} s")
        if "throughput_drop" in rules and self._answers and now - self._answers[0] >= window:
            recent = sum(1 for t in self._answers if t >= now - window)
            before = len(self._answers) - recent
            if before >= MIN_ATTEMPTS:
                ratio = recent / before
                if ratio < rules["throughput_drop"]:
                    self._raise(
                        "throughput_drop", ratio, rules["throughput_drop"],
                        f"answers per second fell to {ratio:.0%} of the window before",
                    )  # fmt: skip
        if "gpu_memory" in rules and now - self._gpu_at >= _GPU_EVERY_S:
            self._gpu_at = now
            self._gpus()

    def _rate(self, rule: str, value: float, what: str) -> None:
        threshold = self.rules.thresholds[rule]
        if value > threshold:
            self._raise(rule, value, threshold, f"{what} (alert above {threshold:g})")

    def _spend(self) -> None:
        share = self.rules.thresholds.get("spend_share")
        if share is None or not self.max_cost_usd:
            return
        used = self._cost / self.max_cost_usd
        if used > share:
            what = f"${self._cost:,.4f} spent, {used:.0%} of max_cost_usd ${self.max_cost_usd:g}"
            self._raise("spend_share", used, share, what)

    def _gpus(self) -> None:
        devices = open_nvml()
        if devices is None:
            return
        threshold = self.rules.thresholds["gpu_memory"]
        with devices:
            for device in devices:
                info = nvml_reading(partial(devices.nvml.nvmlDeviceGetMemoryInfo, device.handle))
                if info is None or not info.total:
                    continue
                used = info.used / info.total
                if used > threshold:
                    what = f"GPU {device.index} memory is {used:.0%} full"
                    self._raise("gpu_memory", used, threshold, what)

    def _raise(self, rule: str, value: float, threshold: float, message: str) -> None:
        now = self._clock()
        last = self._last.get(rule)
        if last is not None and now - last < self.rules.cooldown_s:
            return
        self._last[rule] = now
        alert = Alert(rule, message, value, threshold, time.time())
        self.fired.append(alert)
        log.warning("nbllm alert: %s", message)
        if self.forward is not None:
            self.forward(alert)
        if self.on_alert is not None:
            try:
                self.on_alert(alert)
            except Exception:  # a webhook's failure must not stop the run
                log.exception("on_alert raised; the run goes on")

"""Per-requester rate limits of the package repository: token buckets for messages and bytes."""

from __future__ import annotations

from collections import OrderedDict

from edgesdk.errors import ConfigError


class _Bucket:
    """Token levels of one requester; they go negative when a request borrowed from the future."""

    __slots__ = ("messages", "bytes", "at")

    def __init__(self, messages: float, nbytes: float, at: float) -> None:
        self.messages, self.bytes, self.at = messages, nbytes, at


class RequesterLimits:
    """Token buckets per requester (messages and bytes), bounded in number (least recently used go).

    ``admit`` answers how long a request must wait to fit the requester's rate (0: serve now) or
    None (over the limit by more than ``max_delay_s``: drop it). Waiting rather than dropping keeps
    an honest fetcher, which asks again only after its request timeout, near the limit instead of
    far below it. A request larger than the burst is admitted when the bucket is full and leaves
    it in debt, so over any span T a requester gets at most burst + rate x T + one request.
    """

    def __init__(self, messages_per_s: float, burst_messages: float, bytes_per_s: float, burst_bytes: float,
                 max_delay_s: float, max_requesters: int) -> None:
        for name, value in (("blocks_per_s", messages_per_s), ("burst_blocks", burst_messages),
                            ("bytes_per_s", bytes_per_s), ("burst_bytes", burst_bytes)):
            if not value > 0:
                raise ConfigError(f"repository rate limit {name} must be positive, got {value!r}")
        self.rates = (messages_per_s, bytes_per_s)
        self.bursts = (burst_messages, burst_bytes)
        self.max_delay_s = max_delay_s
        self.max_requesters = max(1, max_requesters)
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def admit(self, requester: str, messages: int, nbytes: int, now: float) -> float | None:
        bucket = self._buckets.get(requester)
        if bucket is None:
            bucket = self._buckets[requester] = _Bucket(*self.bursts, now)
            while len(self._buckets) > self.max_requesters:
                self._buckets.popitem(last=False)
        self._buckets.move_to_end(requester)
        (mrate, brate), (mburst, bburst) = self.rates, self.bursts
        elapsed = max(0.0, now - bucket.at)
        bucket.messages = min(mburst, bucket.messages + elapsed * mrate)
        bucket.bytes = min(bburst, bucket.bytes + elapsed * brate)
        bucket.at = now
        wait = max(0.0, (min(messages, mburst) - bucket.messages) / mrate,
                   (min(nbytes, bburst) - bucket.bytes) / brate)
        if wait > self.max_delay_s:
            return None
        bucket.messages -= messages
        bucket.bytes -= nbytes
        return wait

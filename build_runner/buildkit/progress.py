"""Plain-text rendering of BuildKit solve progress, like `buildctl --progress=plain`.

Owns turning `StatusResponse` messages into lines (moby/buildkit
`util/progress/progressui/{display,printer}.go`): vertex numbering, headers,
status lines with byte counts, logs split into lines with elapsed time,
warnings and the CACHED / DONE / ERROR / CANCELED outcome. Pure: messages in,
lines out; no clock (durations come from the daemon's timestamps) and no I/O.

Unlike Go's printer it does not interleave "#N ..." continuation markers: every
line carries its `#N` prefix, which is what log collectors want.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

from google.protobuf import timestamp_pb2

from build_runner._pb.buildkit import control_pb2

# Go's printer: a running status is reprinted only after 5 % progress or 5 s.
MIN_PROGRESS_DELTA = 0.05
MIN_TIME_DELTA_NS = 5_000_000_000
# How many trailing log lines of each vertex are kept for error summaries (Go: 10).
LOG_TAIL_LINES = 10
# The daemon reports a cancelled vertex with an error ending in Go's context.Canceled text.
CANCELED_SUFFIX = "context canceled"


def _ns(ts: timestamp_pb2.Timestamp) -> int:
    return ts.seconds * 1_000_000_000 + ts.nanos


def format_bytes(n: int) -> str:
    """Binary units with two decimals, as tonistiigi/units prints them (`1.50MiB`)."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.2f}{unit}" if unit != "B" else f"{int(value)}B"
        value /= 1024
    raise AssertionError("unreachable")


def _log_elapsed(seconds: float) -> str:
    # display.go: 3 decimals under 10 s, 2 under 100 s, then 1.
    precision = 3 if seconds < 10 else 2 if seconds < 100 else 1
    return f"{seconds:.{precision}f}"


@dataclass
class _Status:
    printed_current: int | None = None
    printed_at_ns: int | None = None
    done: bool = False


@dataclass
class VertexState:
    """What the renderer knows about one vertex (by the daemon's digest)."""

    digest: str
    name: str = ""
    index: int = 0
    cached: bool = False
    error: str = ""
    # start ns -> stop ns (None while running); a vertex can run more than once.
    intervals: dict[int, int | None] = field(default_factory=dict)
    printed_completion: int | None = None
    # Unfinished last line per stream (1 stdout, 2 stderr) and when it began:
    # keeping streams apart stops "abc" + stderr line + "\n" mixing into one line.
    partial_logs: dict[int, tuple[bytes, int]] = field(default_factory=dict)
    log_tail: collections.deque[str] = field(
        default_factory=lambda: collections.deque(maxlen=LOG_TAIL_LINES)
    )
    statuses: dict[str, _Status] = field(default_factory=dict)

    @property
    def started_ns(self) -> int | None:
        return max(self.intervals) if self.intervals else None

    @property
    def completed(self) -> bool:
        return bool(self.intervals) and all(stop is not None for stop in self.intervals.values())

    def duration_s(self) -> float:
        """Total running time, overlapping intervals counted once."""
        spans = sorted((a, b) for a, b in self.intervals.items() if b is not None)
        total = 0
        end = None
        for start, stop in spans:
            if end is None or start > end:
                total += stop - start
                end = stop
            elif stop > end:
                total += stop - end
                end = stop
        return total / 1e9


class PlainProgress:
    """Feed `StatusResponse` messages; get plain-text lines back."""

    def __init__(self) -> None:
        self._vertices: dict[str, VertexState] = {}
        self._next_index = 0

    @property
    def vertices(self) -> list[VertexState]:
        """Every vertex seen so far, in first-seen order."""
        return list(self._vertices.values())

    def failed(self) -> list[VertexState]:
        """Vertices that ended with an error other than cancellation."""
        return [v for v in self._vertices.values() if v.error and not _cancelled(v.error)]

    def _number(self, v: VertexState) -> int:
        if v.index == 0:
            self._next_index += 1
            v.index = self._next_index
        return v.index

    def feed(self, response: control_pb2.StatusResponse) -> list[str]:
        """Merge one status message and return the lines it produces."""
        lines: list[str] = []
        newly_completed: list[VertexState] = []
        for vx in response.vertexes:
            v = self._vertices.setdefault(vx.digest, VertexState(digest=vx.digest))
            v.name = vx.name or v.name
            v.cached = vx.cached
            v.error = vx.error
            was_started = v.started_ns is not None
            if vx.HasField("started"):
                start = _ns(vx.started)
                v.intervals[start] = _ns(vx.completed) if vx.HasField("completed") else None
            elif vx.HasField("completed") and not v.intervals:
                # Completed without ever starting (e.g. cached during cache-key lookup).
                stop = _ns(vx.completed)
                v.intervals[stop] = stop
            if v.intervals and not was_started:
                lines.append(f"#{self._number(v)} {v.name}")
            if v.completed and v.printed_completion != v.started_ns:
                newly_completed.append(v)
        for st in response.statuses:
            owner = self._vertices.get(st.vertex)
            if owner is not None and owner.index:
                line = self._status_line(owner, st)
                if line is not None:
                    lines.append(line)
        for w in response.warnings:
            owner = self._vertices.get(w.vertex)
            if owner is not None:
                short = w.short.decode("utf-8", "replace")
                lines.append(f"#{self._number(owner)} WARN: {short}")
        for log in response.logs:
            owner = self._vertices.get(log.vertex)
            if owner is not None:
                lines.extend(self._log_lines(owner, log))
        for v in newly_completed:
            lines.extend(self._completion(v))
        return lines

    def finish(self) -> list[str]:
        """Flush partial log lines at the end of the stream."""
        lines: list[str] = []
        for v in self._vertices.values():
            lines.extend(self._flush_partial(v))
        return lines

    def _flush_partial(self, v: VertexState) -> list[str]:
        lines = [self._format_log(v, data, at) for data, at in v.partial_logs.values() if data]
        v.partial_logs.clear()
        return lines

    def _status_line(self, v: VertexState, st: control_pb2.VertexStatus) -> str | None:
        state = v.statuses.setdefault(st.ID, _Status())
        completed = st.HasField("completed")
        if state.done:
            return None
        now = _ns(st.timestamp) if st.HasField("timestamp") else 0
        if not completed and state.printed_current is not None:
            delta = (st.current - state.printed_current) / st.total if st.total > 0 else 0.0
            since = now - (state.printed_at_ns or 0)
            if delta < MIN_PROGRESS_DELTA and since < MIN_TIME_DELTA_NS:
                return None
        state.printed_current = st.current
        state.printed_at_ns = now
        state.done = completed
        amount = ""
        if st.total:
            amount = f" {format_bytes(st.current)} / {format_bytes(st.total)}"
        elif st.current:
            amount = f" {format_bytes(st.current)}"
        elapsed = ""
        if st.HasField("started"):
            end = _ns(st.completed) if completed else now
            seconds = (end - _ns(st.started)) / 1e9
            if seconds > 0.01:
                elapsed = f" {seconds:.1f}s"
        return f"#{v.index} {st.ID}{amount}{elapsed}{' done' if completed else ''}"

    def _format_log(self, v: VertexState, data: bytes, at_ns: int) -> str:
        started = v.started_ns
        seconds = max(0.0, (at_ns - started) / 1e9) if started is not None and at_ns else 0.0
        text = data.decode("utf-8", "replace").rstrip("\r")
        v.log_tail.append(text)
        return f"#{self._number(v)} {_log_elapsed(seconds)} {text}"

    def _log_lines(self, v: VertexState, log: control_pb2.VertexLog) -> list[str]:
        at = _ns(log.timestamp) if log.HasField("timestamp") else 0
        pending, start_ns = v.partial_logs.pop(log.stream, (b"", at))
        *complete, rest = (pending + log.msg).split(b"\n")
        lines = []
        for i, chunk in enumerate(complete):
            # A line continued from an earlier message keeps that message's time.
            lines.append(self._format_log(v, chunk, start_ns if i == 0 else at))
        if rest:
            v.partial_logs[log.stream] = (rest, start_ns if not complete else at)
        return lines

    def _completion(self, v: VertexState) -> list[str]:
        lines = self._flush_partial(v)
        v.printed_completion = v.started_ns
        n = self._number(v)
        if v.error:
            lines.append(f"#{n} CANCELED" if _cancelled(v.error) else f"#{n} ERROR: {v.error}")
        elif v.cached:
            lines.append(f"#{n} CACHED")
        else:
            lines.append(f"#{n} DONE {v.duration_s():.1f}s")
        return lines


def _cancelled(error: str) -> bool:
    return error.endswith(CANCELED_SUFFIX)

"""Plain progress rendering from synthetic StatusResponse messages."""

from __future__ import annotations

from google.protobuf import timestamp_pb2

from build_runner._pb.buildkit import control_pb2
from build_runner.buildkit.progress import PlainProgress, format_bytes

T0 = 1_800_000_000


def ts(seconds: float) -> timestamp_pb2.Timestamp:
    whole = int(seconds)
    return timestamp_pb2.Timestamp(seconds=T0 + whole, nanos=round((seconds - whole) * 1e9))


def vertex(
    digest: str,
    name: str,
    *,
    started: float | None = None,
    completed: float | None = None,
    cached: bool = False,
    error: str = "",
) -> control_pb2.Vertex:
    v = control_pb2.Vertex(digest=digest, name=name, cached=cached, error=error)
    if started is not None:
        v.started.CopyFrom(ts(started))
    if completed is not None:
        v.completed.CopyFrom(ts(completed))
    return v


def msg(**kw: object) -> control_pb2.StatusResponse:
    return control_pb2.StatusResponse(**kw)  # type: ignore[arg-type]


def test_vertices_numbered_in_start_order_with_done_duration() -> None:
    p = PlainProgress()
    out = p.feed(msg(vertexes=[vertex("a", "[1/2] FROM busybox"), vertex("b", "[2/2] RUN x")]))
    assert out == []  # nothing started yet
    out = p.feed(msg(vertexes=[vertex("b", "[2/2] RUN x", started=1.0)]))
    assert out == ["#1 [2/2] RUN x"]
    out = p.feed(
        msg(vertexes=[vertex("a", "[1/2] FROM busybox", started=1.5, completed=1.5, cached=True)])
    )
    assert out == ["#2 [1/2] FROM busybox", "#2 CACHED"]
    out = p.feed(msg(vertexes=[vertex("b", "[2/2] RUN x", started=1.0, completed=3.25)]))
    assert out == ["#1 DONE 2.2s"]
    # A repeated completed update prints nothing new.
    assert p.feed(msg(vertexes=[vertex("b", "[2/2] RUN x", started=1.0, completed=3.25)])) == []


def test_logs_split_into_lines_with_elapsed_time() -> None:
    p = PlainProgress()
    p.feed(msg(vertexes=[vertex("r", "RUN echo", started=10.0)]))
    out = p.feed(
        msg(
            logs=[
                control_pb2.VertexLog(vertex="r", timestamp=ts(10.5), stream=1, msg=b"hel"),
                control_pb2.VertexLog(vertex="r", timestamp=ts(10.6), stream=1, msg=b"lo\nwor"),
            ]
        )
    )
    # The partial "hel" is completed by the next chunk and keeps its first timestamp.
    assert out == ["#1 0.500 hello"]
    out = p.feed(
        msg(
            logs=[
                control_pb2.VertexLog(vertex="r", timestamp=ts(22.0), stream=1, msg=b"ld\nnext\n")
            ]
        )
    )
    assert out == ["#1 0.600 world", "#1 12.00 next"]
    out = p.feed(
        msg(
            logs=[
                control_pb2.VertexLog(
                    vertex="r", timestamp=ts(130.0), stream=1, msg=b"tail no newline"
                )
            ]
        )
    )
    assert out == []
    # Completion flushes the partial line before the outcome.
    out = p.feed(msg(vertexes=[vertex("r", "RUN echo", started=10.0, completed=131.0)]))
    assert out == ["#1 120.0 tail no newline", "#1 DONE 121.0s"]


def test_error_and_cancel_outcomes() -> None:
    p = PlainProgress()
    p.feed(
        msg(vertexes=[vertex("e", "RUN false", started=0.0), vertex("c", "RUN sleep", started=0.0)])
    )
    p.feed(msg(logs=[control_pb2.VertexLog(vertex="e", timestamp=ts(0.1), msg=b"boom\n")]))
    err = 'process "/bin/sh -c false" did not complete successfully: exit code: 1'
    out = p.feed(
        msg(
            vertexes=[
                vertex("e", "RUN false", started=0.0, completed=0.2, error=err),
                vertex("c", "RUN sleep", started=0.0, completed=0.3, error="context canceled"),
            ]
        )
    )
    assert out == [f"#1 ERROR: {err}", "#2 CANCELED"]
    failed = p.failed()
    assert [v.name for v in failed] == ["RUN false"]
    assert list(failed[0].log_tail) == ["boom"]


def test_status_lines_bytes_duration_and_throttle() -> None:
    p = PlainProgress()
    p.feed(msg(vertexes=[vertex("x", "exporting to image", started=0.0)]))

    def status(
        current: int, total: int, at: float, done: bool = False
    ) -> control_pb2.StatusResponse:
        st = control_pb2.VertexStatus(
            ID="pushing layers",
            vertex="x",
            current=current,
            total=total,
            timestamp=ts(at),
            started=ts(0.0),
        )
        if done:
            st.completed.CopyFrom(ts(at))
        return msg(statuses=[st])

    assert p.feed(status(0, 4 << 20, 0.0)) == ["#1 pushing layers 0B / 4.00MiB"]
    # +1 % after 1 s: throttled.
    assert p.feed(status(42_000, 4 << 20, 1.0)) == []
    # +50 %: printed.
    assert p.feed(status(2 << 20, 4 << 20, 1.5)) == ["#1 pushing layers 2.00MiB / 4.00MiB 1.5s"]
    # No progress but 5 s later: printed.
    assert p.feed(status(2 << 20, 4 << 20, 7.0)) == ["#1 pushing layers 2.00MiB / 4.00MiB 7.0s"]
    assert p.feed(status(4 << 20, 4 << 20, 7.2, done=True)) == [
        "#1 pushing layers 4.00MiB / 4.00MiB 7.2s done"
    ]
    # Nothing after done.
    assert p.feed(status(4 << 20, 4 << 20, 9.0, done=True)) == []


def test_count_status_without_total_and_short_duration() -> None:
    p = PlainProgress()
    p.feed(msg(vertexes=[vertex("v", "load", started=0.0)]))
    st = control_pb2.VertexStatus(
        ID="transferring context:", vertex="v", current=1536, timestamp=ts(0.005), started=ts(0.0)
    )
    st.completed.CopyFrom(ts(0.005))
    # Under 10 ms no duration is shown, like Go's printer.
    assert p.feed(msg(statuses=[st])) == ["#1 transferring context: 1.50KiB done"]


def test_warnings() -> None:
    p = PlainProgress()
    p.feed(msg(vertexes=[vertex("w", "step", started=0.0)]))
    out = p.feed(
        msg(warnings=[control_pb2.VertexWarning(vertex="w", level=1, short=b"deprecated thing")])
    )
    assert out == ["#1 WARN: deprecated thing"]


def test_vertex_that_runs_twice_reports_both_runs() -> None:
    """A local source starts and completes twice (cache key, then transfer)."""
    p = PlainProgress()
    out = p.feed(msg(vertexes=[vertex("l", "load context", started=0.0, completed=0.1)]))
    assert out == ["#1 load context", "#1 DONE 0.1s"]
    assert p.feed(msg(vertexes=[vertex("l", "load context", started=1.0)])) == []
    out = p.feed(msg(vertexes=[vertex("l", "load context", started=1.0, completed=1.3)]))
    # Both runs count, overlapping time only once.
    assert out == ["#1 DONE 0.4s"]


def test_finish_flushes_partial_logs() -> None:
    p = PlainProgress()
    p.feed(msg(vertexes=[vertex("r", "RUN", started=0.0)]))
    p.feed(msg(logs=[control_pb2.VertexLog(vertex="r", timestamp=ts(2.0), msg=b"no newline")]))
    assert p.finish() == ["#1 2.000 no newline"]
    assert p.finish() == []


def test_unknown_vertex_is_ignored() -> None:
    p = PlainProgress()
    out = p.feed(
        msg(
            statuses=[control_pb2.VertexStatus(ID="x", vertex="nope")],
            logs=[control_pb2.VertexLog(vertex="nope", msg=b"a\n")],
            warnings=[control_pb2.VertexWarning(vertex="nope", short=b"w")],
        )
    )
    assert out == []


def test_format_bytes() -> None:
    assert format_bytes(0) == "0B"
    assert format_bytes(1023) == "1023B"
    assert format_bytes(1024) == "1.00KiB"
    assert format_bytes(5 * 1024**3 // 2) == "2.50GiB"


def test_stdout_and_stderr_partial_lines_stay_apart() -> None:
    p = PlainProgress()
    p.feed(msg(vertexes=[vertex("r", "RUN", started=0.0)]))
    out = p.feed(
        msg(
            logs=[
                control_pb2.VertexLog(vertex="r", timestamp=ts(0.1), stream=1, msg=b"token"),
                control_pb2.VertexLog(vertex="r", timestamp=ts(0.2), stream=2, msg=b"warning\n"),
                control_pb2.VertexLog(vertex="r", timestamp=ts(0.3), stream=1, msg=b"\n"),
            ]
        )
    )
    assert out == ["#1 0.200 warning", "#1 0.100 token"]

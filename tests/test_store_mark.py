"""``StoreMark``: each stream waits once per write-back record, never for a record it has waited for."""

from __future__ import annotations

from kvpr.runtime.streams import StoreMark


class RecordingStreams:
    """A StreamSet's event calls, recorded in order (no device needed)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []

    def event(self) -> object:
        return object()

    def record_on_store(self, event: object) -> None:
        self.calls.append(("record", event))

    def copy_waits(self, event: object) -> None:
        self.calls.append(("copy_waits", event))

    def compute_waits(self, event: object) -> None:
        self.calls.append(("compute_waits", event))


def test_each_stream_waits_once_per_record() -> None:
    streams = RecordingStreams()
    mark = StoreMark(streams)  # type: ignore[arg-type]
    mark.copy_waits()
    mark.compute_waits()
    assert streams.calls == []  # nothing written yet
    mark.record()
    for _ in range(3):  # a layer's chunks, then the next steps
        mark.copy_waits()
        mark.compute_waits()
    mark.record()
    mark.record()  # two write-backs before any wait: one wait covers both
    mark.copy_waits()
    mark.copy_waits()
    event = mark.event
    assert streams.calls == [
        ("record", event),
        ("copy_waits", event),
        ("compute_waits", event),
        ("record", event),
        ("record", event),
        ("copy_waits", event),
    ]


def test_without_events_nothing_waits() -> None:
    streams = RecordingStreams()
    streams.event = lambda: None  # type: ignore[method-assign]  # the CPU's StreamSet
    mark = StoreMark(streams)  # type: ignore[arg-type]
    mark.record()
    mark.copy_waits()
    mark.compute_waits()
    assert streams.calls == [("record", None)]

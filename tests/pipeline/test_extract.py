import pytest

from pipeline.extract import _BackgroundWriter, chunk_rows_for


class _Sink:
    def __init__(self, fail_at=None):
        self.rows_done, self.got, self.fail_at = 0, [], fail_at

    def append(self, rows):
        if self.fail_at is not None and len(self.got) == self.fail_at:
            raise ValueError("disk full")
        self.got.append(rows["x"])


def test_background_writer_keeps_order_and_surfaces_errors():
    sink = _Sink()
    w = _BackgroundWriter(sink)
    for i in range(20):
        w.put({"x": i})
    w.close()
    assert sink.got == list(range(20))

    bad = _BackgroundWriter(_Sink(fail_at=3))
    with pytest.raises(ValueError, match="disk full"):
        for i in range(50):
            bad.put({"x": i})
        bad.close()


def test_chunk_rows_are_whole_sequences():
    assert chunk_rows_for(256, 4096) == 4096
    assert chunk_rows_for(300, 4096) == 4200
    assert chunk_rows_for(8192, 4096) == 8192

"""Progress bars reach whoever watches them (a run page), and a failing watcher never stops
the work it watches."""

from __future__ import annotations

from pipeline.progress import ProgressBar, watch_progress


def test_listeners_see_every_update_and_the_close():
    seen = []
    with watch_progress(lambda desc, done, total: seen.append((desc, done, total))):
        bar = ProgressBar(total=10, desc="work", disable=False)
        for _ in range(4):
            bar.update(2)
        bar.close()
    assert seen[:4] == [("work", 2, 10), ("work", 4, 10), ("work", 6, 10), ("work", 8, 10)]
    assert seen[-1] == ("work", 8, 10) and len(seen) == 5
    bar = ProgressBar(total=3, desc="after", disable=False)
    bar.update(1)
    bar.close()
    assert len(seen) == 5  # the listener is gone with its block


def test_a_disabled_bar_reports_nothing():
    seen = []
    with watch_progress(lambda *a: seen.append(a)):
        bar = ProgressBar(total=5, disable=True)
        bar.update(5)
        bar.close()
    assert seen == []


def test_a_failing_listener_is_dropped_and_the_work_goes_on(caplog):
    calls = []

    def broken(desc, done, total):
        calls.append(done)
        raise ConnectionError("API gone")

    with watch_progress(broken):
        bar = ProgressBar(total=3, disable=False)
        for _ in range(3):
            bar.update(1)
        bar.close()
    assert calls == [1] and bar.n == 3
    assert "progress listener failed (API gone)" in caplog.text

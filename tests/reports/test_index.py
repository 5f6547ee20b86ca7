"""The index of reports under a root: newest first, headline numbers, relative links that
resolve to each report's page."""

from __future__ import annotations

from html.parser import HTMLParser

from flows.stages.base import run_stage
from flows.stages.report import ReportStage
from reports.format import pct
from reports.index import latest_report, report_html_path, write_index
from stores.artifacts import ArtifactStore


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.links: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "a":
            self.links.append(dict(attrs)["href"])


def test_an_empty_root_has_an_empty_index(tmp_path):
    store = ArtifactStore(tmp_path)
    assert latest_report(store) is None
    path = write_index(store)
    assert path == tmp_path / "reports" / "index.html" and "No reports yet" in path.read_text()


def test_the_index_lists_reports_newest_first_with_links_that_resolve(full_run):
    store, keys = full_run.store, full_run.keys
    built = []
    for names in (("eval_cache",), ("heads", "eval_cache"), ("heads", "calibration", "evaluation")):
        built.append(run_stage(ReportStage(), full_run.ctx(), {n: keys[n] for n in names}))
    assert latest_report(store) == built[-1]
    path = write_index(store)
    page = path.read_text()
    parser = _Links()
    parser.feed(page)
    ours = [link for link in parser.links if any(k in link for k in built)]
    assert ours == [f"../artifacts/report/{k}/report.html" for k in reversed(built)]
    for link, key in zip(ours, reversed(built)):
        assert (path.parent / link).resolve() == report_html_path(store, key).resolve()
        assert report_html_path(store, key).is_file()
    evaluation = store.manifest("evaluate", keys["evaluation"]).metrics
    for layer, h in evaluation["heads"].items():
        assert f"{layer}: {pct(h['agreement'])}" in page

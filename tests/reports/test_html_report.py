"""The report of a whole run on the tiny model: the report stage's files, one section per kind
of input and none without it, plots that are real PNGs embedded in a page that needs nothing
from outside, the key numbers in the page, summary.md and metrics.json alike."""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import json
import re
from html.parser import HTMLParser

import pytest
from PIL import Image

from flows.stages.base import PRODUCED_BY, run_stage
from flows.stages.report import ReportStage
from reports.format import level, pct, times
from reports.report import render_report
from reports.run import CALIBRATION_FILE, DRIFT_FILE, METRICS_JSON, REPORT_HTML, SUMMARY_MD, load_run
from reports.sections import SECTION_TITLES, build_sections

ALL_SECTIONS = set(SECTION_TITLES)


class _Page(HTMLParser):
    """Section ids, <img> sources and every attribute that could fetch something."""

    def __init__(self):
        super().__init__()
        self.sections: list[str] = []
        self.images: list[str] = []
        self.fetches: list[str] = []
        self.tags: set[str] = set()

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.add(tag)
        if tag == "section":
            self.sections.append(a["id"])
        if tag == "img":
            self.images.append(a["src"])
        for name in ("src", "href"):
            if name in a and tag != "img" and not a[name].startswith("#"):
                self.fetches.append(a[name])


def parse(page: str) -> _Page:
    p = _Page()
    p.feed(page)
    return p


@pytest.fixture(scope="module")
def built(full_run):
    """The report stage run on every artifact of the run."""
    key = run_stage(ReportStage(), full_run.ctx(), dict(full_run.keys))
    return key, full_run.store.path("report", key)


def render(full_run, *names: str):
    return render_report(load_run(full_run.store, {n: full_run.keys[n] for n in names}, PRODUCED_BY))


def test_the_stage_writes_the_page_the_summary_and_the_metrics(full_run, built):
    key, folder = built
    m = full_run.store.manifest("report", key)
    assert {REPORT_HTML, SUMMARY_MD, METRICS_JSON} <= set(m.files)
    assert m.inputs == full_run.keys and m.code_version == ReportStage.code_version
    assert m.metrics["sections"] == list(SECTION_TITLES)  # every section, in page order
    page = parse((folder / REPORT_HTML).read_text())
    assert page.sections == list(SECTION_TITLES)


def test_every_plot_is_an_embedded_png_and_the_page_fetches_nothing(built):
    page_text = (built[1] / REPORT_HTML).read_text()
    page = parse(page_text)
    # heads: agreement, training; gates: ROC, training; calibration: exit rates, cascade, agreement against
    # entropy; ternary: agreement; decoding: the float heads' speed-ups (the ternary evaluation did not decode)
    assert len(page.images) == 9 == page_text.count("<figure>")
    for src in page.images:
        assert src.startswith("data:image/png;base64,")
        png = base64.b64decode(src.removeprefix("data:image/png;base64,"), validate=True)
        assert png.startswith(b"\x89PNG\r\n\x1a\n")
        with Image.open(io.BytesIO(png)) as im:
            im.verify()
            assert im.size[0] > 200 and im.size[1] > 100
    assert page.fetches == []  # no link, script or stylesheet from elsewhere
    assert not {"script", "link", "iframe"} & page.tags
    assert "url(" not in page_text and "@import" not in page_text and "http://" not in page_text
    assert "https://" not in page_text


@pytest.mark.parametrize("names, sections", [
    (("eval_cache",), {"caches"}),
    (("teacher_topk",), {"caches"}),
    (("heads",), {"heads"}),
    (("gates",), {"gates"}),
    (("calibration",), {"calibration"}),
    (("evaluation",), {"heads", "gates", "calibration", "decoding"}),
    (("quantized",), {"ternary"}),
    (("ternary_evaluation",), {"ternary"}),
    (("recalibrate",), {"recalibration"}),
    (("train_cache", "heads", "calibration"), {"caches", "heads", "calibration"}),
])
def test_a_section_appears_exactly_when_its_artifact_is_an_input(full_run, names, sections):
    rendered = render(full_run, *names)
    assert parse(rendered.html).sections == [s for s in SECTION_TITLES if s in sections | {"run"}]
    assert rendered.metrics["sections"] == parse(rendered.html).sections
    for sid in ALL_SECTIONS - sections - {"run"}:
        assert f"## {SECTION_TITLES[sid]}" not in rendered.markdown


def test_the_first_screen_names_the_inputs_backbone_and_data(full_run, built, tiny_model_dir, corpus_dir):
    page = (built[1] / REPORT_HTML).read_text()
    first = page[:page.index('<section id="caches"')]
    for name, key in full_run.keys.items():
        assert f"<td>{name}</td>" in first and key[:12] in first and key[12:20] not in first
    assert str(tiny_model_dir) in first and str(corpus_dir) in first
    assert "levels [0.5, 0.8]" in first  # the calibration's config


def test_key_numbers_appear_in_the_page_and_the_summary(full_run, built):
    page, summary = (built[1] / REPORT_HTML).read_text(), (built[1] / SUMMARY_MD).read_text()
    store, keys = full_run.store, full_run.keys
    evaluation = store.manifest("evaluate", keys["evaluation"]).metrics
    expected = []
    for layer, h in evaluation["heads"].items():
        expected += [pct(h["agreement"]), pct(evaluation["lens"][layer]["agreement"])]
        row = f"{layer} | {pct(h['agreement'])} | {pct(evaluation['lens'][layer]['agreement'])} |"
        assert f"| {row}" in summary and re.search(
            rf'<td class="n">{layer}</td><td class="n">{pct(h["agreement"])}</td>', page), row
    for c in evaluation["cascade"]:
        expected.append(pct(c["compute_saved"]))
    best = next(s for s in evaluation["decode"]["settings"] if s["name"] == evaluation["decode"]["best"])
    expected += [times(best["speedup"]), f"{best['name']} (best)"]
    for e in store.manifest("quantize", keys["quantized"]).metrics["eval"].values():
        expected += [pct(e["float_agreement"]), pct(e["ternary_agreement"])]
    held = sum(g["held"] for g in evaluation["guarantees"])
    expected.append(f"Guarantees held on eval tokens: {held} of {len(evaluation['guarantees'])}")
    expected += [f"({g['n_exited']:,} exits)" for g in evaluation["guarantees"] if g["n_exited"]]  # what "held" rests on
    for text in expected:
        assert text in summary, text
        assert html.escape(text, quote=False) in page, text
    drift = store.manifest("recalibrate", keys["recalibrate"])
    assert ("promoted" if drift.metrics["promote"] else "kept the previous") in page


def test_metrics_json_round_trips_and_holds_the_key_numbers(full_run, built):
    text = (built[1] / METRICS_JSON).read_text()
    metrics = json.loads(text)
    assert json.loads(json.dumps(metrics, allow_nan=False)) == metrics
    evaluation = full_run.store.manifest("evaluate", full_run.keys["evaluation"]).metrics
    assert {k: h["agreement"] for k, h in metrics["heads"].items()} == \
        {k: h["agreement"] for k, h in evaluation["heads"].items()}
    assert [c["compute_saved"] for c in metrics["cascade"]] == [c["compute_saved"] for c in evaluation["cascade"]]
    assert metrics["inputs"] == full_run.keys
    assert metrics["guarantees"]["checked"] == len(evaluation["guarantees"])
    assert metrics["decode"]["float"]["best"] == evaluation["decode"]["best"]
    assert set(metrics["ternary"]) == set(evaluation["heads"])
    assert isinstance(metrics["recalibration"]["promote"], bool)


def test_tables_have_the_same_columns_in_the_page_and_the_summary(full_run, built):
    run = load_run(full_run.store, full_run.keys, PRODUCED_BY)
    page, summary = (built[1] / REPORT_HTML).read_text(), (built[1] / SUMMARY_MD).read_text()
    for section in build_sections(run):
        for table in section.tables:
            if not table.rows:
                continue
            columns = list(table.rows[0])
            assert all(list(r) == columns for r in table.rows), table.title
            assert "| " + " | ".join(columns) + " |" in summary, table.title
            header = "".join(f'<th( class="n")?>{re.escape(html.escape(c))}</th>' for c in columns)
            assert re.search(header, page), table.title


def test_an_older_evaluation_without_curves_degrades_to_a_note(full_run, built):
    run = load_run(full_run.store, full_run.keys, PRODUCED_BY)
    ev = run.manifests["evaluation"]
    old_metrics = {k: v for k, v in ev.metrics.items() if k != "curves"}
    old_heads = run.manifests["heads"]
    epochs = [{k: v for k, v in e.items() if k != "loss_curve"} for e in old_heads.metrics["epochs"]]
    older = dataclasses.replace(run, manifests={
        **run.manifests, "evaluation": dataclasses.replace(ev, code_version="evaluate-2", metrics=old_metrics),
        "heads": dataclasses.replace(old_heads, metrics={**old_heads.metrics, "epochs": epochs})})
    full, old = (built[1] / REPORT_HTML).read_text(), render_report(older).html
    assert "evaluate-2, before evaluations recorded curves" in old
    assert "predates per-step loss curves" in old and "predates" not in full
    assert 'alt="ROC curves"' in full and 'alt="ROC curves"' not in old
    assert 'alt="Agreement against entropy"' in full and 'alt="Agreement against entropy"' not in old
    assert parse(old).sections == parse(full).sections
    assert len(parse(old).images) == len(parse(full).images) - 2


def test_entropy_thresholds_are_drawn_on_the_agreement_curves(full_run, monkeypatch):
    import reports.plots

    seen = {}
    real = reports.plots.accuracy_by_entropy

    def spy(bins, thresholds, ylabel):
        seen.update(bins=bins, thresholds=thresholds, ylabel=ylabel)
        return real(bins, thresholds, ylabel)

    monkeypatch.setattr(reports.plots, "accuracy_by_entropy", spy)
    run = load_run(full_run.store, {k: full_run.keys[k] for k in ("calibration", "evaluation")}, PRODUCED_BY)
    render_report(run)
    cal = run.calibrations["calibration"]
    assert seen["ylabel"] == "agreement" and set(seen["bins"]) == set(cal.layers)
    assert seen["thresholds"] == {layer: [(r.level, r.threshold) for r in rs]
                                  for layer, rs in cal.chosen("entropy").items()}
    assert [level(x) for x in cal.levels] == ["0.5", "0.8"]


def test_payload_file_names_are_the_stages_own():
    from flows.stages.calibrate import CALIBRATION_FILE as written_calibration
    from flows.stages.recalibrate import DRIFT_JSON

    assert (CALIBRATION_FILE, DRIFT_FILE) == (written_calibration, DRIFT_JSON)

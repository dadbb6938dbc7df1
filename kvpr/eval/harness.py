"""``kvpr eval``: perplexity and long-context accuracy of one loaded model under several cache configs.

The measuring half of the KV-compression comparison: every config sees the same seeded windows and
task items, so rows differ only by what the placement (and, later, the codec) does to K,V. Results go
to JSON (with model, date, commit and data sources), a markdown table and a PNG of accuracy and
perplexity against bytes per token.
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
import json
import re
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from kvpr.compress.methods import OFFLOADABLE, method_config, parse_codec_spec, recent_window
from kvpr.config import CACHE_METHODS, RECOMPUTE_OFF, CacheConfig, Offload, SamplingParams
from kvpr.device import dtype_name
from kvpr.errors import KvprError
from kvpr.eval.corpus import sources_metadata
from kvpr.eval.hf_runner import TransformersRunner, recent_tokens, runs_here
from kvpr.eval.perplexity import essay_token_stream, perplexity
from kvpr.eval.stats import wilson_interval
from kvpr.eval.tasks import TASK_NAMES, TaskBuilder, TaskItem, depth_band, score_item

if TYPE_CHECKING:
    from kvpr.api import LLM
    from kvpr.config import ModelConfig

# (config name, cache config, model config) -> stored bytes of K and V per token, all layers.
BytesPerToken = Callable[[str, "CacheConfig", "ModelConfig"], float]

PROTOCOL = "context-compressed-v2"  # contexts compressed first; questions and answers through the cache
ANSWER_ROOM = 64  # tokens of every context length kept free for the answer

DATA_NOTE = (
    "Perplexity on Paul Graham essays and synthetic tasks from local seeds: not wikitext-2, PG-19, "
    "RULER or LongBench, so figures are not comparable with published ones."
)


def fp16_bytes_per_token(name: str, cache: CacheConfig, model: ModelConfig) -> float:
    """K and V of every layer in fp16: ``2 * L * n_kv * d * 2`` bytes (no codec)."""
    return float(2 * model.num_layers * model.kv_size * 2)


def cache_for_spec(spec: str, recompute: float | str = RECOMPUTE_OFF, x_codec: str = "none") -> CacheConfig:
    """The placement ``kvpr eval`` measures a ``--codecs`` spec under: KVO and KIVI with their packed
    rows in host memory, the other cache methods on the device, the tokenwise codecs as the offloaded
    host tier (with ``recompute`` and ``x_codec``: the split of that tier and how it keeps X),
    ``none`` as computed. A spec the transformers runner measures (``hf_runner.runs_here``: the
    quanto peers, KIVI specs ending in ``@hf``) gets the uncompressed placeholder."""
    if runs_here(spec):
        return CacheConfig()
    name, params = parse_codec_spec(spec)
    if name == "none":
        return CacheConfig()
    if name in CACHE_METHODS:
        offload = Offload.CPU if name in OFFLOADABLE else Offload.NONE
        return CacheConfig(offload=offload, kv_codec=name, kv_codec_params=params)
    return CacheConfig(offload=Offload.CPU, recompute=recompute, kv_codec=name, x_codec=x_codec)


def cache_footprint(engine: LLM, context_len: int) -> tuple[float, float]:
    """(stored, read by one decode step) bytes of K and V per token of a ``context_len`` context, all
    layers, metadata included, as the engine's codec or cache method keeps them (fp16 when neither)."""
    model, codec = engine.model_config, engine.codec
    if codec is None:
        size = fp16_bytes_per_token("none", engine.config.cache, model)
        return size, size
    footprint = getattr(codec, "footprint", None)  # cache methods: budgets and selection depend on s
    if footprint is not None:
        return footprint(context_len)
    size = model.num_layers * codec.bytes_per_token(1, model.num_kv_heads, model.head_dim)
    return size, size


def guard_tokens(configs: Sequence[tuple[str, CacheConfig]]) -> int:
    """W: the largest recent window of any cache method in the run (0 when none keeps one). No
    needle is placed in the last W tokens of a context, where every method would find it."""
    windows = [
        recent_window(cache.kv_codec, method_config(cache.kv_codec, cache.kv_codec_params))
        for _, cache in configs
        if cache.kv_codec in CACHE_METHODS
    ]
    windows += [recent_tokens(name) for name, _ in configs if runs_here(name)]
    return max(windows, default=0)


def evaluate(
    llm: LLM,
    configs: Sequence[tuple[str, CacheConfig]],
    context_lens: Sequence[int],
    num_items: int,
    seed: int = 0,
    *,
    tasks: Sequence[str] = TASK_NAMES,
    num_windows: int = 4,
    batch_size: int = 4,
    bytes_per_token: BytesPerToken | None = None,
    progress: bool = True,
    guard: int | None = None,
) -> list[dict[str, Any]]:
    """One row per (config, context length): ppl with its bootstrap interval, per-task accuracy and
    their pooled ``retrieval_acc``, each with a Wilson 95% interval and per depth band, and stored
    and read bytes per token (``cache_footprint``, or ``bytes_per_token`` for both).

    The protocol (``PROTOCOL``): each item's context is prefilled and compressed by the method; its
    question and the whole answer then run through the compressed cache (``LLM.answer``), so no
    scored logit sees the uncompressed context. Needles stay out of the last ``guard_tokens``
    tokens of every context. Contexts plus questions take ``context_len - ANSWER_ROOM`` tokens.
    Perplexity uses ``num_windows`` essay windows of ``context_len`` tokens: the first half
    prefilled, every token after the first of the second half scored from decode steps.
    Pass ``tasks=()`` or ``num_windows=0`` to skip either half; ``guard`` overrides W (a run split
    over several calls passes the W of all its configs, so every call builds the same items).
    """
    if not configs or not context_lens:
        raise KvprError("evaluate needs at least one cache config and one context length")
    if llm.tokenizer is None:
        raise KvprError(f"model {llm.name} has no tokenizer: kvpr eval needs one to build its text")
    unknown = [task for task in tasks if task not in TASK_NAMES]
    if unknown:
        raise KvprError(f"unknown tasks {unknown}: use some of {', '.join(TASK_NAMES)}")
    guard = guard_tokens(configs) if guard is None else guard
    builder = TaskBuilder(llm.tokenizer, guard_tokens=guard)
    stream = essay_token_stream(llm.tokenizer) if num_windows > 0 else []
    items = {
        (context_len, task): builder.items(task, context_len - ANSWER_ROOM, num_items, seed)
        for context_len in context_lens
        for task in tasks
    }
    steps = len(configs) * len(context_lens) * (len(tasks) + (num_windows > 0))
    bar = tqdm(total=steps, desc="kvpr eval", disable=not progress)
    rows = []
    for name, cache in configs:
        runner = TransformersRunner(llm, name) if runs_here(name) else None
        engine: Any = runner or llm.with_placement(cache)
        for context_len in context_lens:
            if bytes_per_token is not None:
                stored = read = bytes_per_token(name, cache, llm.model_config)
            elif runner is not None:
                stored, read = runner.footprint(context_len)
            else:
                stored, read = cache_footprint(engine, context_len)
            row: dict[str, Any] = {
                "codec": name,
                "params": runner.params if runner is not None else config_params(cache),
                "runner": "transformers" if runner is not None else "kvpr",
                "bytes_per_token": stored,
                "read_bytes_per_token": read,
                "context_len": context_len,
                "guard_tokens": guard,
                "device": device_label(llm.device),
                "dtype": dtype_name(llm.dtype),
                "compile": runner is None and engine.config.runtime.compile,
                "seed": seed,
                "ppl": None,
                "ppl_ci": None,
            }
            if num_windows > 0:
                bar.set_postfix_str(f"{name} ppl@{context_len}")
                result = perplexity(engine, context_len, num_windows, seed=seed, batch_size=batch_size, stream=stream)
                row.update(
                    ppl=result.ppl,
                    ppl_ci=list(result.ppl_ci),
                    ppl_tokens=result.num_tokens,
                    ppl_windows=result.num_windows,
                    ppl_prefix_len=result.prefix_len,
                )
                bar.update()
            details: list[dict[str, Any]] = []
            for task in tasks:
                bar.set_postfix_str(f"{name} {task}@{context_len}")
                found = run_items(engine, items[context_len, task], batch_size)
                row.update(accuracy_fields(found, f"acc_{task}", f"acc_{task}_ci"))
                details += found
                bar.update()
            row.update(accuracy_fields(details, "retrieval_acc", "retrieval_ci"))
            row["n_items"] = num_items  # per task family and context length
            row["items"] = details
            rows.append(row)
    bar.close()
    return rows


def accuracy_fields(details: Sequence[dict[str, Any]], key: str, ci_key: str) -> dict[str, Any]:
    """``key``: the share of items answered correctly, ``ci_key``: its Wilson 95% interval,
    ``key_by_depth``: {band: [correct, items]}, ``key_recall``: the mean share of answers found."""
    if not details:
        return {key: None, ci_key: None}
    hits = sum(bool(d["correct"]) for d in details)
    bands: dict[str, list[int]] = {}
    for d in details:
        band = bands.setdefault(depth_band(d["depth"]), [0, 0])
        band[0] += bool(d["correct"])
        band[1] += 1
    return {
        key: hits / len(details),
        ci_key: list(wilson_interval(hits, len(details))),
        f"{key}_by_depth": dict(sorted(bands.items())),
        f"{key}_recall": sum(d["recall"] for d in details) / len(details),
    }


def run_items(llm: LLM | TransformersRunner, items: Sequence[TaskItem], batch_size: int) -> list[dict[str, Any]]:
    """Greedy answers to the items (``batch_size`` per call, each context compressed before its
    question runs, see ``LLM.answer``; the transformers runner answers the same way), each scored
    by ``score_item``."""
    results = []
    for first in range(0, len(items), batch_size):
        batch = items[first : first + batch_size]
        params = SamplingParams(max_new_tokens=max(item.max_new_tokens for item in batch), temperature=0.0)
        pairs = llm.encode_split([item.context for item in batch], [item.question for item in batch])
        completions = llm.answer(pairs, params)
        for item, (_, question), completion in zip(batch, pairs, completions):
            correct, recall = score_item(item, completion.text)
            results.append(
                {
                    "task": item.task,
                    "depth": round(item.depth, 4),
                    "length": item.length,
                    "question_tokens": len(question),
                    "answers": list(item.answers),
                    "output": completion.text,
                    "correct": correct,
                    "recall": recall,
                }
            )
    return results


def device_label(device: Any) -> str:
    """``cpu``, or ``cuda (<GPU name>)``: the device a row was measured on."""
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return str(device)


def config_params(cache: CacheConfig) -> dict[str, Any]:
    """A config's fields as JSON values (enums by value), so new codec fields appear unasked."""

    def plain(value: Any) -> Any:
        if isinstance(value, tuple) and all(isinstance(pair, tuple) and len(pair) == 2 for pair in value):
            return dict(value)  # a method's (field, value) knobs
        return value.value if isinstance(value, enum.Enum) else value

    return {f.name: plain(getattr(cache, f.name)) for f in dataclasses.fields(cache)}


def git_commit() -> str | None:
    """The checkout's HEAD (suffixed ``-dirty`` with local changes), or None without git."""
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        status = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return head.stdout.strip() + ("-dirty" if status.stdout.strip() else "")


def write_report(
    rows: Sequence[dict[str, Any]],
    out_dir: str | Path,
    model_name: str,
    metadata: dict[str, Any] | None = None,
    stem: str | None = None,
) -> dict[str, Path]:
    """Write ``<stem>.json``, ``.md`` and ``.png`` under ``out_dir`` (default stem ``eval-<model>``);
    returns the three paths."""
    if not rows:
        raise KvprError("no rows to report: run evaluate with at least one config")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = stem or "eval-" + re.sub(r"[^A-Za-z0-9._-]+", "_", model_name).strip("_")
    report = {
        "model": model_name,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "data": sources_metadata(),
        "protocol": PROTOCOL,
        "note": DATA_NOTE,
        **(metadata or {}),
        "rows": list(rows),
    }
    paths = {"json": out / f"{stem}.json", "markdown": out / f"{stem}.md", "png": out / f"{stem}.png"}
    paths["json"].write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    paths["markdown"].write_text(markdown_table(rows, model_name, report["date"], report["commit"]), encoding="utf-8")
    plot(rows, model_name, paths["png"])
    return paths


def markdown_table(rows: Sequence[dict[str, Any]], model_name: str, date: str, commit: str | None) -> str:
    tasks = [task for task in TASK_NAMES if any(f"acc_{task}" in row for row in rows)]
    header = ["codec", "params", "context", "device", "bytes/token", "read/token", "ppl [95% CI]", "retrieval [95% CI]"]
    lines = [
        f"# kvpr eval: {model_name}",
        "",
        f"{date}, commit {commit or 'unknown'}, protocol {PROTOCOL}. {DATA_NOTE}",
        "",
        "| " + " | ".join(header + tasks) + " |",
        "|" + "|".join("---" for _ in header + tasks) + "|",
    ]
    for row in rows:
        params = ", ".join(f"{k}={v}" for k, v in row["params"].items())
        cells = [
            row["codec"],
            params,
            str(row["context_len"]),
            f"{row.get('device', '-')} {row.get('dtype', '')}".strip(),
            f"{row['bytes_per_token']:.0f}",
            _fmt(row.get("read_bytes_per_token"), ".0f"),
            _with_interval(row.get("ppl"), row.get("ppl_ci"), ".2f"),
            _with_interval(row.get("retrieval_acc"), row.get("retrieval_ci"), ".2f"),
        ]
        cells += [_fmt(row.get(f"acc_{task}"), ".2f") for task in tasks]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _with_interval(value: float | None, interval: Sequence[float] | None, spec: str) -> str:
    if value is None:
        return "-"
    if not interval:
        return format(value, spec)
    return f"{value:{spec}} [{interval[0]:{spec}}, {interval[1]:{spec}}]"


def plot(rows: Sequence[dict[str, Any]], model_name: str, path: Path) -> None:
    """Accuracy and perplexity against stored bytes per token, and perplexity against the bytes a
    decode step reads per token of context; one series per context length."""
    from matplotlib.figure import Figure  # no pyplot: no global figure state

    figure = Figure(figsize=(15, 4.5), layout="constrained")
    accuracy, ppl, ppl_read = figure.subplots(1, 3)
    panels = (  # (axis, x key, y key, interval key)
        (accuracy, "bytes_per_token", "retrieval_acc", "retrieval_ci"),
        (ppl, "bytes_per_token", "ppl", "ppl_ci"),
        (ppl_read, "read_bytes_per_token", "ppl", "ppl_ci"),
    )
    for context_len in sorted({row["context_len"] for row in rows}):
        series = [r for r in rows if r["context_len"] == context_len]
        for axis, x_key, key, ci_key in panels:
            points = sorted(
                (r.get(x_key, r["bytes_per_token"]), r[key], r.get(ci_key) or (r[key], r[key]), r["codec"])
                for r in series
                if r.get(key) is not None
            )
            if points:
                below = [p[1] - p[2][0] for p in points]
                above = [p[2][1] - p[1] for p in points]
                axis.errorbar(
                    [p[0] for p in points],
                    [p[1] for p in points],
                    yerr=[below, above],
                    fmt="o",
                    capsize=3,
                    label=f"{context_len} tokens (95% CI)",
                )
                for xi, yi, _, name in points:
                    axis.annotate(name, (xi, yi), fontsize=7, textcoords="offset points", xytext=(3, 3))
    accuracy.set(xlabel="bytes stored per token (K+V, all layers)", ylabel="retrieval accuracy", ylim=(-0.05, 1.05))
    ppl.set(xlabel="bytes stored per token (K+V, all layers)", ylabel="perplexity (essays)")
    ppl_read.set(xlabel="bytes read per decode step / context tokens", ylabel="perplexity (essays)")
    for axis in (accuracy, ppl, ppl_read):
        axis.grid(alpha=0.3)
        if axis.lines or axis.containers:
            axis.legend(fontsize=8)
        else:
            axis.text(0.5, 0.5, "not measured", ha="center", va="center", transform=axis.transAxes)
    figure.suptitle(f"kvpr eval: {model_name}")
    figure.savefig(path, dpi=120)

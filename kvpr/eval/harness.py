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

from kvpr.compress.methods import OFFLOADABLE, parse_codec_spec
from kvpr.config import CACHE_METHODS, RECOMPUTE_OFF, CacheConfig, Offload, SamplingParams
from kvpr.errors import KvprError
from kvpr.eval.corpus import sources_metadata
from kvpr.eval.perplexity import essay_token_stream, perplexity
from kvpr.eval.tasks import TASK_NAMES, TaskBuilder, TaskItem, score_answer

if TYPE_CHECKING:
    from kvpr.api import LLM
    from kvpr.config import ModelConfig

# (config name, cache config, model config) -> stored bytes of K and V per token, all layers.
BytesPerToken = Callable[[str, "CacheConfig", "ModelConfig"], float]

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
    ``none`` as computed."""
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
    max_new_tokens: int = 12,
    bytes_per_token: BytesPerToken | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """One row per (config, context length): ppl, per-task accuracy and their mean ``retrieval_acc``,
    with stored and read bytes per token (``cache_footprint``, or ``bytes_per_token`` for both).

    Perplexity uses ``num_windows`` essay windows of ``context_len`` tokens (second half scored).
    Task prompts are ``context_len - max_new_tokens`` tokens long so prompt and answer fit in
    ``context_len`` positions; an item scores 1 when the greedy continuation starts with the answer
    (``score_answer``). Pass ``tasks=()`` or ``num_windows=0`` to skip either half.
    """
    if not configs or not context_lens:
        raise KvprError("evaluate needs at least one cache config and one context length")
    if llm.tokenizer is None:
        raise KvprError(f"model {llm.name} has no tokenizer: kvpr eval needs one to build its text")
    unknown = [task for task in tasks if task not in TASK_NAMES]
    if unknown:
        raise KvprError(f"unknown tasks {unknown}: use some of {', '.join(TASK_NAMES)}")
    builder = TaskBuilder(llm.tokenizer)
    stream = essay_token_stream(llm.tokenizer) if num_windows > 0 else []
    items = {
        (context_len, task): builder.items(task, context_len - max_new_tokens, num_items, seed)
        for context_len in context_lens
        for task in tasks
    }
    steps = len(configs) * len(context_lens) * (len(tasks) + (num_windows > 0))
    bar = tqdm(total=steps, desc="kvpr eval", disable=not progress)
    rows = []
    for name, cache in configs:
        engine = llm.with_placement(cache)
        for context_len in context_lens:
            if bytes_per_token is None:
                stored, read = cache_footprint(engine, context_len)
            else:
                stored = read = bytes_per_token(name, cache, llm.model_config)
            row: dict[str, Any] = {
                "codec": name,
                "params": config_params(cache),
                "bytes_per_token": stored,
                "read_bytes_per_token": read,
                "context_len": context_len,
                "seed": seed,
                "ppl": None,
            }
            if num_windows > 0:
                bar.set_postfix_str(f"{name} ppl@{context_len}")
                result = perplexity(engine, context_len, num_windows, seed=seed, batch_size=batch_size, stream=stream)
                row.update(ppl=result.ppl, ppl_tokens=result.num_tokens, ppl_prefix_len=result.prefix_len)
                bar.update()
            details: list[dict[str, Any]] = []
            for task in tasks:
                bar.set_postfix_str(f"{name} {task}@{context_len}")
                details += run_items(engine, items[context_len, task], batch_size, max_new_tokens)
                hits = [d["correct"] for d in details if d["task"] == task]
                row[f"acc_{task}"] = sum(hits) / len(hits)
                bar.update()
            row["retrieval_acc"] = sum(d["correct"] for d in details) / len(details) if details else None
            row["num_items"] = num_items
            row["items"] = details
            rows.append(row)
    bar.close()
    return rows


def run_items(llm: LLM, items: Sequence[TaskItem], batch_size: int, max_new_tokens: int) -> list[dict[str, Any]]:
    """Greedy continuations of the items' prompts (``batch_size`` per call), each scored exactly."""
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
    results = []
    for first in range(0, len(items), batch_size):
        batch = items[first : first + batch_size]
        completions = llm.generate([item.prompt for item in batch], params)
        for item, completion in zip(batch, completions):
            results.append(
                {
                    "task": item.task,
                    "depth": round(item.depth, 4),
                    "length": item.length,
                    "answer": item.answer,
                    "output": completion.text,
                    "correct": score_answer(completion.text, item.answer),
                }
            )
    return results


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
    header = ["codec", "params", "context", "bytes/token", "read/token", "ppl", "retrieval"] + tasks
    lines = [
        f"# kvpr eval: {model_name}",
        "",
        f"{date}, commit {commit or 'unknown'}. {DATA_NOTE}",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    for row in rows:
        params = ", ".join(f"{k}={v}" for k, v in row["params"].items())
        cells = [
            row["codec"],
            params,
            str(row["context_len"]),
            f"{row['bytes_per_token']:.0f}",
            _fmt(row.get("read_bytes_per_token"), ".0f"),
            _fmt(row.get("ppl"), ".2f"),
            _fmt(row.get("retrieval_acc"), ".2f"),
        ]
        cells += [_fmt(row.get(f"acc_{task}"), ".2f") for task in tasks]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def plot(rows: Sequence[dict[str, Any]], model_name: str, path: Path) -> None:
    """Accuracy and perplexity against stored bytes per token, and perplexity against the bytes a
    decode step reads per token of context; one series per context length."""
    from matplotlib.figure import Figure  # no pyplot: no global figure state

    figure = Figure(figsize=(15, 4.5), layout="constrained")
    accuracy, ppl, ppl_read = figure.subplots(1, 3)
    panels = (
        (accuracy, "bytes_per_token", "retrieval_acc"),
        (ppl, "bytes_per_token", "ppl"),
        (ppl_read, "read_bytes_per_token", "ppl"),
    )
    for context_len in sorted({row["context_len"] for row in rows}):
        series = [r for r in rows if r["context_len"] == context_len]
        for axis, x_key, key in panels:
            points = sorted(
                (r.get(x_key, r["bytes_per_token"]), r[key], r["codec"]) for r in series if r.get(key) is not None
            )
            if points:
                axis.plot([p[0] for p in points], [p[1] for p in points], "o", label=f"{context_len} tokens")
                for xi, yi, name in points:
                    axis.annotate(name, (xi, yi), fontsize=7, textcoords="offset points", xytext=(3, 3))
    accuracy.set(xlabel="bytes stored per token (K+V, all layers)", ylabel="retrieval accuracy", ylim=(-0.05, 1.05))
    ppl.set(xlabel="bytes stored per token (K+V, all layers)", ylabel="perplexity (essays)")
    ppl_read.set(xlabel="bytes read per decode step / context tokens", ylabel="perplexity (essays)")
    for axis in (accuracy, ppl, ppl_read):
        axis.grid(alpha=0.3)
        if axis.lines:
            axis.legend(fontsize=8)
        else:
            axis.text(0.5, 0.5, "not measured", ha="center", va="center", transform=axis.transAxes)
    figure.suptitle(f"kvpr eval: {model_name}")
    figure.savefig(path, dpi=120)

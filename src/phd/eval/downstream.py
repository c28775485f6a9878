"""Downstream benchmarks through lm-evaluation-harness, and the results table (terminal and JSON)."""

from __future__ import annotations

from typing import Any

from .harness import PHDLM
from .tasks import TaskBuilder

METRICS = ("acc", "acc_norm", "perplexity")


def _metric(values: dict[str, Any], name: str) -> float | None:
    value = values.get(f"{name},none")
    return float(value) if isinstance(value, (int, float)) else None


def run_downstream(
    lm: PHDLM,
    builder: TaskBuilder,
    names: list[str],
    limit: int | None = None,
    num_fewshot: int = 0,
    seed: int = 1234,
) -> dict[str, dict[str, Any]]:
    """{task: {acc, acc_norm (where lm-eval reports it), perplexity (LAMBADA), n, split, source}}.

    `mmlu` is scored over its subject tasks and reported as their document-weighted mean (lm-eval's own
    aggregation); `limit` caps the documents of every task (every MMLU subject).
    """
    import lm_eval

    expanded = builder.expand(names)
    built = {name: builder.build(name) for name in expanded}
    out = lm_eval.simple_evaluate(
        model=lm, tasks=[t.task for t in built.values()], num_fewshot=num_fewshot, limit=limit,
        bootstrap_iters=0, log_samples=False, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
        fewshot_random_seed=seed,
    )
    raw, counts = out["results"], out.get("n-samples", {})
    table: dict[str, dict[str, Any]] = {}
    for name, local in built.items():
        values = raw.get(name, {})
        row: dict[str, Any] = {m: _metric(values, m) for m in METRICS}
        row = {k: v for k, v in row.items() if v is not None}
        row["n"] = int(counts.get(name, {}).get("effective", 0))
        row["split"], row["source"] = local.split, str(local.source)
        table[name] = row
    if "mmlu" in names:
        subjects = [n for n in expanded if n.startswith("mmlu_") and n not in names]
        n = sum(table[s]["n"] for s in subjects)
        acc = sum(table[s]["acc"] * table[s]["n"] for s in subjects) / max(n, 1)
        table["mmlu"] = {"acc": acc, "n": n, "subjects": len(subjects), "split": "test",
                         "source": str(built[subjects[0]].source.parent) if subjects else ""}
        for s in subjects:
            table.pop(s)
    return {name: table[name] for name in names if name in table}


def format_table(results: dict[str, dict[str, Any]]) -> str:
    """A fixed-width table: task, n, split, acc, acc_norm, perplexity (percentages for accuracies)."""
    lines = [f"{'task':<16} {'n':>6} {'split':<10} {'acc':>7} {'acc_norm':>9} {'ppl':>9}"]
    for name, row in results.items():
        acc = f"{100 * row['acc']:.1f}" if "acc" in row else "-"
        norm = f"{100 * row['acc_norm']:.1f}" if "acc_norm" in row else "-"
        ppl = f"{row['perplexity']:.2f}" if "perplexity" in row else "-"
        lines.append(f"{name:<16} {row.get('n', 0):>6} {row.get('split', ''):<10} {acc:>7} {norm:>9} {ppl:>9}")
    return "\n".join(lines)

"""The gpu-check report: markdown (a table per section) and the one-screen summary printed at the end."""

from __future__ import annotations

from typing import Any

from .gpu_sections import PAPER
from .timing import markdown_table


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, list):
        return ", ".join(_fmt(v) for v in value)
    return "" if value is None else str(value)


def _table(rows: list[dict[str, Any]]) -> str:
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    return markdown_table(keys, [[_fmt(row.get(k)) for k in keys] for row in rows])


def _equivalence_groups(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[tuple[str, str], dict[str, Any]] = {}
    for row in rows:
        g = groups.setdefault((row["backend"], row["dtype"]), {"backend": row["backend"], "dtype": row["dtype"],
                                                               "cases": 0, "failed": 0})
        g["cases"] += 1
        g["failed"] += not row["ok"]
        for name in ("out", "dq", "dk", "dv"):
            if name in row:
                g[f"worst {name}"] = max(g.get(f"worst {name}", 0.0), row[name])
    return list(groups.values())


def _training_line(r: dict[str, Any]) -> str:
    if not r.get("ok"):
        return f"{r['variant']:<18} {r['attention']:<6} compile={r['compile']!s:<5} ERROR {r.get('error', '')[:60]}"
    mem = f"{r['peak_gib']:.1f} GiB" if r.get("peak_gib") is not None else "-"
    mfu = f"MFU {r['mfu']:.1%}" if r.get("mfu") is not None else ""
    ratio = f"x{r['vs_vanilla']:.2f} vanilla" if r.get("vs_vanilla") is not None else ""
    return (f"{r['variant']:<18} {r['attention']:<6} compile={r['compile']!s:<5} {r['tok_per_s']:>10,.0f} tok/s "
            f"{ratio:<14} {mem:>9} {mfu}")


def key_result(name: str, section: dict[str, Any]) -> str:
    """One line: what the section found."""
    rows = section.get("rows", [])
    if section.get("status") == "skipped":
        return section.get("skipped") or section.get("reason", "")
    if section.get("error") and not rows:
        return section["error"].splitlines()[-1][:150]
    if name == "equivalence":
        return "; ".join(f"{g['backend']} {g['dtype']} {g['cases'] - g['failed']}/{g['cases']} ok"
                         for g in _equivalence_groups(rows))
    if name == "inference_agreement":
        worst = max((r.get("max_logit_error", float("inf")) for r in rows), default=None)
        return f"{sum(r['ok'] for r in rows)}/{len(rows)} variants within tolerance, worst {_fmt(worst)}"
    if name == "fsdp":
        diff = section.get("max_relative_loss_difference")
        return f"2 processes vs 1: max relative loss difference {_fmt(diff)}" if diff is not None else ""
    if name == "training":
        return f"{sum(r['ok'] for r in rows)}/{len(rows)} configurations measured"
    if name == "inference":
        cswa = [r for r in rows if r.get("paper_prefill_ok") is not None or r.get("paper_decode_ok") is not None]
        pre = sum(bool(r.get("paper_prefill_ok")) for r in cswa)
        dec = sum(bool(r.get("paper_decode_ok")) for r in cswa)
        return (f"PHD-CSWA within the paper: prefill <= x{PAPER['prefill']} {pre}/{len(cswa)}, "
                f"decode <= x{PAPER['decode']} {dec}/{len(cswa)}")
    return ""


def summary(report: dict[str, Any]) -> str:
    env = report["environment"]
    where = env.get("gpu", report["device"]) + (f" x{env['gpus']}" if env.get("gpus", 1) > 1 else "")
    lines = [f"gpu-check on {where} (torch {env['torch']}{', quick' if report['quick'] else ''}): "
             f"{report['seconds']:.0f} s of a {report['budget_s']:.0f} s budget"]
    for name, section in report["sections"].items():
        lines.append(f"  {name:<20} {section['status']:<10} {section.get('seconds', 0):>5.0f} s  "
                     f"{key_result(name, section)}")
    training = report["sections"].get("training", {}).get("rows", [])
    if training:
        lines.append("  training (tok/s, step time vs vanilla, peak memory, MFU):")
        lines += [f"    {_training_line(r)}" for r in training]
    inference = [r for r in report["sections"].get("inference", {}).get("rows", []) if "paper_decode_ok" in r]
    if inference:
        lines.append(f"  inference, PHD-CSWA / vanilla (paper: prefill x{PAPER['prefill']}, decode <= "
                     f"x{PAPER['decode']}):")
        for r in inference:
            cells = [f"{k.replace('_', ' ')} {_fmt(v)}x" for k, v in r.items() if k.startswith(("prefill_T",
                                                                                                "decode_b"))]
            lines.append(f"    {r['variant']:<20} " + ", ".join(cells))
    return "\n".join(lines)


def markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    parts = [
        "# GPU check (`scripts/gpu-check.sh`)",
        f"Device {report['device']} ({', '.join(f'{k} {v}' for k, v in env.items())}); "
        f"{'quick sizes; ' if report['quick'] else ''}{report['seconds']:.0f} s of a {report['budget_s']:.0f} s "
        "budget. Each section ran in its own process; its log is in logs/.",
        "```\n" + summary(report) + "\n```",
    ]
    for name, section in report["sections"].items():
        parts.append(f"## {name}: {section['status']}")
        if section.get("notes"):
            parts.append("\n".join(f"- {note}" for note in section["notes"]))
        if section.get("error"):
            parts.append("Error:\n```\n" + section["error"][-2000:] + "\n```")
        rows = section.get("rows", [])
        if name == "equivalence" and rows:
            parts.append(_table(_equivalence_groups(rows)))
            failed = [r for r in rows if not r["ok"]]
            if failed:
                parts.append("Failures (all cases are in gpu-check.json):\n\n" + _table(failed[:40]))
        elif rows:
            parts.append(_table(rows))
    return "\n\n".join(parts) + "\n"

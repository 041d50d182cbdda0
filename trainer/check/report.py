"""Plain-text tables for the terminal, and the report of ``trainer compare`` as one."""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # never run: `trainer --help` prints tables without importing torch
    from trainer.check.compare import Report


def table(rows: Sequence[Sequence[object]], headers: Sequence[str]) -> str:
    """Columns padded to their widest cell, under a header and a rule of dashes."""
    cells = [list(map(str, headers))] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def format_report(report: Report) -> str:
    """The table, worst first, then where each mismatch is, the culprits and per-layer saved bytes."""
    if report.error:
        return "\n".join([f"culprit: {c}" for c in report.culprits] + ["MISMATCH: a twin raised"])
    causes = any(d.cause for d in report.tensors)
    rows = [[d.kind, d.name, d.layer or "-", "ok" if d.ok else "MISMATCH" + (" (vacuous)" if d.vacuous else ""),
             f"{d.max_abs_diff:.3g}", f"{d.max_rel_diff:.3g}", f"{d.rel_l2:.3g}", f"{d.cosine:.6f}",
             f"{d.norm_ratio:.6g}", f"{d.score:.3g}", *([d.cause or "-"] if causes else [])] for d in report.tensors]
    out = [table(rows, ["kind", "name", "layer", "result", "max_abs", "max_rel", "rel_l2", "cosine", "norm_ratio",
                        "score", *(["cause"] if causes else [])])]
    vacuous = [d.name for d in report.tensors if d.vacuous and d.kind != "loss"]
    if vacuous:
        out.append(f"note: norms below atol, so these pass vacuously: {', '.join(vacuous)}")
    for d in report.tensors:
        if d.where:
            out.append(f"where: {d.kind} {d.name}: {d.where}")
    if report.memory:
        out.append("")
        out.append(table([[p, m["layer"], m["native"], m["custom"]] for p, m in report.memory.items()],
                         ["layer", "name", "saved bytes native", "saved bytes custom"]))
    for c in report.culprits:
        out.append(f"culprit: {c}")
    failed = sum(not d.ok for d in report.tensors)
    out.append(f"{'ok' if report.ok else 'MISMATCH'}: {len(report.tensors) - failed} of {len(report.tensors)} "
               f"tensors within tolerance")
    return "\n".join(out)

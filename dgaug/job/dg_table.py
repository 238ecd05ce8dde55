"""The DG sweep's DomainBed-style tables: arm x augmentation rows, target-domain columns, mean ± std."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

PROTOCOL_VERSION = 1
AVERAGE = "average"
_ARM_NAMES = {"zero_shot": "zero-shot", "probe": "probe", "coop": "CoOp", "cocoop": "CoCoOp"}
_AUG_NAMES = {"none": "—", "lads": "+ LADS", "ldfs": "+ LDFS"}
_PROTOCOL_NAMES = {
    "single_source": "Single source (train on one domain; column t: accuracy on t, averaged "
    "over the runs from each other domain)",
    "leave_one_out": "Leave one domain out (train on all others; column t: accuracy on t)",
}


def summarize(splits, cells, dg, domains: Sequence[str]) -> dict[str, list[dict[str, Any]]]:
    """{protocol: rows}; a row has arm, augmentation and per column {mean, std, n} in percent.

    Per seed, a column's value is the mean over that protocol's splits that test on the column's
    domain; the average column is the mean of the columns. Mean and (sample) std are over seeds.
    """
    tables: dict[str, list[dict[str, Any]]] = {}
    for protocol in dg.protocols:
        chosen = [s for s in splits if s.protocol == protocol]
        rows = []
        for arm in dg.arms:
            augs = ["none"] if arm == "zero_shot" else dg.augmentations
            for aug in augs:
                per_seed: dict[str, list[float]] = {d: [] for d in (*domains, AVERAGE)}
                for seed in dg.seeds:
                    name = f"{arm}-{aug}-s{seed}"
                    cols = {}
                    for d in domains:
                        vals = [cells[s.name][name][d] for s in chosen if d in s.targets]
                        if vals:
                            cols[d] = statistics.fmean(vals)
                    for d, v in cols.items():
                        per_seed[d].append(v)
                    if cols:
                        per_seed[AVERAGE].append(statistics.fmean(cols.values()))
                row = {"arm": arm, "augmentation": aug}
                row.update({d: _mean_std(v) for d, v in per_seed.items() if v})
                rows.append(row)
        tables[protocol] = rows
    return tables


def _mean_std(vals: list[float]) -> dict[str, float]:
    return {
        "mean": 100 * statistics.fmean(vals),
        "std": 100 * statistics.stdev(vals) if len(vals) > 1 else 0.0,
        "n": len(vals),
    }


def markdown(record: dict[str, Any]) -> str:
    """Both tables as Markdown, each under a heading that says what its columns are."""
    domains = record["domains"]
    seeds = record["config"]["seeds"]
    parts = []
    for protocol, rows in record["tables"].items():
        head = ["arm", "augmentation", *domains, AVERAGE]
        lines = [
            f"**{_PROTOCOL_NAMES[protocol]}**; accuracy (%), mean ± std over seeds {seeds}",
            "",
            "| " + " | ".join(head) + " |",
            "|" + "---|" * len(head),
        ]
        for r in rows:
            cells = [_ARM_NAMES[r["arm"]], _AUG_NAMES[r["augmentation"]]]
            cells += [_cell(r.get(d)) for d in (*domains, AVERAGE)]
            lines.append("| " + " | ".join(cells) + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def _cell(v: dict[str, float] | None) -> str:
    return "–" if v is None else f"{v['mean']:.1f} ± {v['std']:.1f}"

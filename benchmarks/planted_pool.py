"""Pool ``planted_bench.py`` results of one setting over several task draws: is recovery robust?

Each ``planted_bench.py --task-seed T --name NAME`` run is one task draw searched with several
seeds. One draw can be lucky or unlucky (docs/search.md: 1.75x and 4.55x chance on the first two
draws of the context task), so this prints, per draw and pooled, the planted operations
recovered against chance with a one-sided binomial p-value (edges and runs counted as
independent trials: an indication), how many draws reach ``--target`` times chance, and the
three seed-agreement p-values of the counted cells (edges shuffled / operations renamed /
renamed within their kind; ``scnas search-report``). Reads only result files;
searches nothing.

    python benchmarks/planted_pool.py results/planted-context-full.json results/planted-context-full-task1.json \
        ... --setting "full no-augment" --name planted-context-full-pooled

Writes benchmarks/results/NAME.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from scnas.fileio import atomic_write_text


# the report's three seed-agreement p-values: edges shuffled, operations renamed, renamed within their kind
AGREEMENT_P = ("agreement_p", "agreement_p_relabelled", "agreement_p_relabelled_within_kind")


def pool(records: list[dict], setting: str, by: str, target: float) -> dict:
    """Per draw and pooled recovery of ``setting``'s runs in ``records`` (planted_bench.py's
    JSON), its cells chosen ``by`` alpha or perturbation; draws without that setting or
    derivation are left out and named."""
    from scipy.stats import binomtest

    budgets = {json.dumps({k: r.get(k) for k in ("task", "cases", "epochs", "steps_per_epoch", "alpha_lr", "depth",
                                                 "counted_cells", "planted")}, sort_keys=True) for r in records}
    if len(budgets) > 1:
        raise SystemExit("the files are of other tasks or budgets (task, cases, epochs, steps, alpha lr, depth or "
                         "counted cells differ): not pooled")
    seeds = [(r.get("task_seed", 0), r.get("first_seed", 0)) for r in records]
    if len(set(seeds)) < len(seeds):
        raise SystemExit(f"a task draw is given twice (task seed, first search seed: {seeds}): not pooled")
    draws, missing = [], []
    for record in records:
        result = record["results"].get(setting)
        summary = result if by == "alpha" else (result or {}).get("by_perturbation")
        if not summary:
            missing.append(record.get("task_seed", 0))
            continue
        planted = summary["planted"]
        if not planted.get("trials"):
            missing.append(record.get("task_seed", 0))
            continue
        hits = round(planted["recovered"] * planted["trials"])   # recovered is kept to 4 decimals: exact here
        counted = planted["counted_cells"]
        draws.append({"task_seed": record.get("task_seed", 0), "seeds": result["seeds"], "hits": hits,
                      "trials": planted["trials"], "chance": planted["chance"], "x_chance": planted["x_chance"],
                      "p": planted["p"], "seconds_per_search": result["seconds_per_search"],
                      **{key: {c: (summary.get(key) or {}).get(c) for c in counted} for key in AGREEMENT_P}})
    if not draws:
        raise SystemExit(f"no result file holds setting {setting!r} derived by {by}")
    merged: dict[int, dict] = {}      # a draw whose seeds were split over files (--first-seed) is one draw
    for d in draws:
        if d["task_seed"] in merged:
            m = merged[d["task_seed"]]
            m["seconds_per_search"] = round((m["seconds_per_search"] * m["seeds"] + d["seconds_per_search"] * d["seeds"])
                                            / (m["seeds"] + d["seeds"]), 1)
            m.update(seeds=m["seeds"] + d["seeds"], hits=m["hits"] + d["hits"], trials=m["trials"] + d["trials"],
                     **{key: {c: None for c in m[key]} for key in AGREEMENT_P})   # not of the parts
            m["x_chance"] = round(m["hits"] / m["trials"] / m["chance"], 2)
            m["p"] = float(binomtest(m["hits"], m["trials"], m["chance"], alternative="greater").pvalue)
        else:
            merged[d["task_seed"]] = dict(d)
    draws = list(merged.values())
    chance = draws[0]["chance"]
    if any(d["chance"] != chance for d in draws):
        raise SystemExit("the draws were scored against different chances (another vocabulary): not pooled")
    hits, trials = sum(d["hits"] for d in draws), sum(d["trials"] for d in draws)
    return {"setting": setting, "by": by, "target_x_chance": target, "draws": draws, "left_out_task_seeds": missing,
            "pooled": {"hits": hits, "trials": trials, "recovered": round(hits / trials, 4),
                       "x_chance": round(hits / trials / chance, 2),
                       "p": float(binomtest(hits, trials, chance, alternative="greater").pvalue),
                       "draws_reaching_target": sum(d["hits"] / d["trials"] / chance >= target for d in draws)}}


def _agreement_cell(draw: dict) -> str:
    """Per counted cell, its three agreement p-values (``-``: not recorded, as in results written
    before the within-kind test, or a draw merged from parts)."""
    cells = draw["agreement_p_relabelled"]
    return "; ".join(" / ".join("-" if draw[key].get(c) is None else f"{draw[key][c]:.2g}" for key in AGREEMENT_P)
                     for c in cells)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", type=Path, help="planted_bench.py result files, one per task draw")
    parser.add_argument("--setting", default="full no-augment")
    parser.add_argument("--target", type=float, default=3.0, help="the x-chance a draw should reach (issue 26: 3)")
    parser.add_argument("--name", default="planted-pooled")
    args = parser.parse_args()
    records = [json.loads(path.read_text()) for path in args.results]
    bys = ["alpha"] + (["perturbation"] if any((r["results"].get(args.setting) or {}).get("by_perturbation")
                                               for r in records) else [])
    pooled = {by: pool(records, args.setting, by, args.target) for by in bys}
    table = Table(title=f"planted recovery of {args.setting!r} per task draw (chance {pooled['alpha']['draws'][0]['chance']})")
    for column in ("by", "task draw", "seeds", "recovered", "x chance", "p",
                   "agreement p (shuffled / renamed / within kind)", "s/search"):
        table.add_column(column)
    for by, result in pooled.items():
        for d in result["draws"]:
            table.add_row(by, str(d["task_seed"]), str(d["seeds"]), f"{d['hits']}/{d['trials']}", f"{d['x_chance']:.2f}",
                          f"{d['p']:.2g}", _agreement_cell(d), f"{d['seconds_per_search']:.0f}")
        p = result["pooled"]
        table.add_row(by, "pooled", str(sum(d["seeds"] for d in result["draws"])), f"{p['hits']}/{p['trials']}",
                      f"{p['x_chance']:.2f}", f"{p['p']:.2g}",
                      f"{p['draws_reaching_target']} of {len(result['draws'])} draws >= {args.target:g}x", "")
    Console(width=120).print(table)
    out = Path(__file__).parent / "results" / f"{args.name}.json"
    atomic_write_text(out, json.dumps({"sources": [str(p) for p in args.results], **pooled}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""Markdown table of the newest quality-benchmark rows, for the README.

Reads ``bench/results/quality.jsonl`` (written by ``bench/quality.py``), keeps for every
``(dataset, track, method, device kind)`` the newest row (last in the file) of the given run
budget, and prints one table per dataset with the command line that reproduces it::

    python bench/quality_table.py                      # every dataset, newest budget of each
    python bench/quality_table.py --dataset dsb2018 --run dsb2018_efficientnet_lite0_448_300

Rows without a ``run`` field (the first, pre-two-track format) are ignored.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ORDER = ("boxinst", "sim", "boxlevelset", "box2mask_t", "condinst", "solov2_full", "solov2_boxinst", "mask2former_full",
         "boxinst_boxfill", "sim_boxfill", "boxlevelset_boxfill", "box2mask_t_boxfill",
         "filled_box", "grabcut", "boxinst_annotate", "sim_annotate", "boxlevelset_annotate", "box2mask_t_annotate",
         "condinst_annotate")


def load_rows(path: Path) -> list[dict]:
    """All JSON lines of ``path`` that carry a ``run`` (blank lines skipped).

    Raises:
        ValueError: a line is not valid JSON (names the file and line number).
    """
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not a JSON line ({e})") from None
        if row.get("benchmark") == "quality" and row.get("run"):
            rows.append(row)
    return rows


def newest(rows: list[dict], dataset: str, run: str | None) -> list[dict]:
    """Newest row per (track, method, device) of ``dataset`` for ``run`` (default: the run of the last row)."""
    mine = [r for r in rows if r["dataset"] == dataset]
    if not mine:
        return []
    run = run or mine[-1]["run"]
    latest: dict = {}
    for r in mine:
        # per-group rows (image kinds, size buckets) belong to group_table; subsets of another size are kept apart
        if r["run"] == run and r.get("group", "all") == "all":
            latest[(r["track"], r["method"], r["device"], r["images"])] = r
    key = {m: i for i, m in enumerate(ORDER)}
    return sorted(latest.values(), key=lambda r: (r["track"] != "end_to_end", key.get(r["method"], 99), r["device"]))


def table(rows: list[dict]) -> str:
    """Markdown table of ``rows`` (one decimal; ``-`` for null)."""

    def f(v, digits=1):
        return "-" if v is None else f"{v:.{digits}f}"

    lines = ["| track | method | supervision | mask AP | AP50 | AP75 | box AP | mean IoU | box/mask | images | wall s | commit |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['track']} | {r['method']} | {r['supervision']} | {f(r['mask_AP'])} | {f(r['mask_AP50'])} | "
                     f"{f(r['mask_AP75'])} | {f(r['box_AP'])} | {f(r.get('mean_mask_IoU'))} | "
                     f"{f(r.get('ratio_box_over_mask'), 2)} | {r['images']} | {f(r['wall_s'], 0)} | {r['commit']} |")
    return "\n".join(lines)


GROUP_ORDER = ("all", "fluorescence", "colour", "brightfield", "small", "medium", "large")
GIVEN_ORDER = ("filled_box", "grabcut", "boxinst_annotate_nofallback", "boxinst_annotate",
               "boxinst_annotate_fit_nofallback", "boxinst_annotate_fit")


def group_table(rows: list[dict], run: str) -> str:
    """Per-group pivot of the newest boxes-given rows of ``run``: one line per method, one column per group
    (``all``, image kinds, COCO size buckets) holding ``mask AP / mean IoU`` and, marked ``*`` where the
    model never saw that image kind; then the share of masks worse than their box and the time per image."""
    latest: dict = {}
    for r in rows:
        if r["run"] == run and r["track"] == "boxes_given" and "group" in r:
            latest[(r["method"], r["group"])] = r
    groups = [g for g in GROUP_ORDER if any(k[1] == g for k in latest)]
    groups += sorted({k[1] for k in latest} - set(groups))
    methods = [m for m in GIVEN_ORDER if any(k[0] == m for k in latest)]
    methods += sorted({k[0] for k in latest} - set(methods))

    def f(v, digits=1):
        return "-" if v is None else f"{v:.{digits}f}"

    head = "| method | " + " | ".join(groups) + " | worse than box (all) | s / image |"
    lines = [head, "|---|" + "---:|" * (len(groups) + 2)]
    for m in methods:
        cells = []
        for g in groups:
            r = latest.get((m, g))
            cells.append("-" if r is None else
                         f"{f(r['mask_AP'])} / {f(r.get('mean_mask_IoU'))}{'*' if r.get('shift') else ''}")
        a = latest.get((m, "all"), {})
        worse = a.get("worse_than_box")
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {'-' if worse is None else f'{100 * worse:.0f} %'} | "
                     f"{f(a.get('s_per_image'), 2)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", default=str(ROOT / "bench" / "results" / "quality.jsonl"))
    ap.add_argument("--dataset", nargs="*", default=None, help="datasets (default: all in the file)")
    ap.add_argument("--run", default=None, help="run name (default: the newest run of each dataset)")
    ap.add_argument("--groups", nargs="*", default=[], help="runs whose boxes-given rows are shown per group "
                                                           "(image kind, size bucket)")
    args = ap.parse_args(argv)
    rows = load_rows(Path(args.results))
    datasets = args.dataset or list(dict.fromkeys(r["dataset"] for r in rows))
    for name in datasets:
        sel = newest(rows, name, args.run)
        if not sel:
            print(f"no rows for {name}", file=sys.stderr)
            continue
        r0 = sel[0]
        devices = sorted({r["device"] for r in sel})
        print(f"**{name} val** ({r0['run']}: {r0['backbone']}, test size {r0['image_size']}, {r0['iterations']} "
              f"iterations, batch {r0['batch_size']}, maxDets {r0['max_dets']}; {'; '.join(devices)}; {r0['date']})\n")
        print(table(sel) + "\n")
    for run in args.groups:
        print(f"**{run}, boxes given, per group** (mask AP / mean IoU with the GT in %; * = image kind unseen in "
              "training)\n")
        print(group_table(rows, run) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The benchmark table of issue 14: every hot path in wall time and in instructions, judged.

``python benchmarks/summary.py [timing] [instructions]`` (both by default; what
``nox -s bench`` runs). ``timing`` runs ``startup.py`` and ``metric_call.py``,
then ``http_overhead.py``, ``sql_overhead.py`` and ``wsgi_overhead.py``, each
printing its own rows as it goes; ``instructions`` runs ``instructions.py``
over every path in the five modes (raw, by hand, agent, ddtrace,
OpenTelemetry; the peers when installed, else said to be skipped). Then one
table per path: each mode's wall time (median µs of paired rounds, its
ratio to by hand with the interquartile range) and its instructions per call
(and their ratio to by hand); and the targets, each in the measure issue 14
judges it in, with the other measure beside it: the agent / by hand, and the
agent's added cost over raw as a share of the cheaper peer's, marked pass or
over. ``--quick`` is for checking the harness: short rounds and runs, one
layout, no start-up scripts. ``--json OUT`` keeps everything measured,
``--from-json OUT`` prints its table again, ``--markdown`` also as the tables
of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _util import (  # noqa: E402
    LABELS,
    MODES,
    TARGETS,
    agent_share,
    available_peers,
    format_ratio,
)

#: The wall-clock scripts, the paths each measures, and their settings (full, --quick).
WALL = {
    "http_overhead.py": (
        ("urllib3", "requests", "httpx", "aiohttp"),
        [],
        ["--requests", "200", "--rounds", "6"],
    ),
    "sql_overhead.py": (
        ("psycopg2-autocommit", "psycopg2-transaction"),
        [],
        ["--rounds", "30"],
    ),
    "wsgi_overhead.py": (("wsgi",), [], ["--requests", "200", "--rounds", "6"]),
}
QUICK_INSTRUCTIONS = ["--layouts", "1", "--judged-layouts", "1", "--small", "20", "--big", "60"]
QUICK_INSTRUCTIONS += ["--peer-small", "20", "--peer-big", "60"]
#: Every path, in the order of the tables; those in TARGETS are judged, httpx and aiohttp reported.
PATH_NAMES = {
    "urllib3": "urllib3 keep-alive GET, deadline",
    "requests": "requests keep-alive GET, deadline",
    "httpx": "httpx keep-alive GET (sync Client), deadline; no target: reported",
    "aiohttp": "aiohttp keep-alive GET (ClientSession), deadline; no target: reported",
    "psycopg2-autocommit": "psycopg2 SELECT 1, autocommit, deadline",
    "psycopg2-transaction": "psycopg2 SELECT 1 + COMMIT, deadline",
    "wsgi": "Flask trivial view (worker process)",
}


def run(script: str, *args: str) -> bool:
    command = [sys.executable, str(HERE / script), *args]
    print(f"\n$ {' '.join(Path(c).name if c == command[1] else c for c in command[1:])}")
    sys.stdout.flush()
    code = subprocess.run(command, check=False).returncode
    if code != 0:
        print(f"({script} failed, exit status {code}: its figures are missing below)")
    return code == 0


def measure(opts: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    figures: dict[str, Any] = {"wall": {}, "instructions": None}
    if "timing" in opts.parts:
        if not opts.quick:
            run("startup.py")
            run("metric_call.py")
        for script, (_, full, quick) in WALL.items():
            out = workdir / f"{script}.json"
            if run(script, *(quick if opts.quick else full), "--json", str(out)):
                figures["wall"].update(json.loads(out.read_text())["paths"])
    if "instructions" in opts.parts and shutil.which("valgrind") is None:
        print("(valgrind not found: the instruction counts are skipped)")
    elif "instructions" in opts.parts:
        out = workdir / "instructions.json"
        modes = ",".join(["raw", "hand", "wrapt", "agent", *available_peers()])
        quick = QUICK_INSTRUCTIONS if opts.quick else []
        if run("instructions.py", "--modes", modes, *quick, "--json", str(out)):
            figures["instructions"] = json.loads(out.read_text())
    return figures


def instruction_counts(figures: dict[str, Any], path: str) -> dict[str, float]:
    counted = figures.get("instructions")
    if not counted:
        return {}
    return {r["mode"]: r["untimed"] for r in counted["rows"].values() if r["path"] == path}


def verdict(value: float | None, target: float) -> str:
    if value is None:
        return "-"
    return "pass" if value <= target else "over"


def report(figures: dict[str, Any]) -> list[dict[str, Any]]:
    """Print the final table; return the target lines (also kept in --json)."""
    judged: list[dict[str, Any]] = []
    paths = [p for p in PATH_NAMES if p in figures["wall"] or instruction_counts(figures, p)]
    print("\n" + "=" * 100)
    print("Issue 14: each path in wall time (µs per call, median of paired rounds; the ratio")
    print("to by hand is the median of the rounds' ratios, with its interquartile range) and")
    print("in instructions per call (callgrind, every thread of the client or server process).")
    for path in paths:
        wall = figures["wall"].get(path, {}).get("rows", {})
        counts = instruction_counts(figures, path)
        print(f"\n{path}: {PATH_NAMES[path]}")
        print(
            f"  {'mode':<15} {'wall µs':>9} {'/ by hand (IQR)':>22} {'added µs':>9}  "
            f"{'instructions':>12} {'/ by hand':>9} {'added':>10}"
        )
        hand_count, raw_count = counts.get("hand"), counts.get("raw")
        for mode in MODES:
            row, count = wall.get(mode), counts.get(mode)
            if row is None and count is None:
                continue
            cells = [f"  {LABELS[mode]:<15}"]
            if row:
                cells += [
                    f"{row['median']:>9.1f}",
                    f"{format_ratio(row['vs_hand']):>22}",
                    f"{row['added']:>+9.1f}" if mode != "raw" else f"{'':>9}",
                ]
            else:
                cells += [f"{'-':>9}", f"{'-':>22}", f"{'-':>9}"]
            if count is not None:
                cells += [
                    f" {count:>12,.0f}",
                    f"{count / hand_count:>9.4f}" if hand_count else f"{'-':>9}",
                    f"{count - raw_count:>+10,.0f}"
                    if raw_count is not None and mode != "raw"
                    else f"{'':>10}",
                ]
            else:
                cells += [f" {'-':>12}", f"{'-':>9}", f"{'-':>10}"]
            print(" ".join(cells))
        if path not in TARGETS:
            continue
        measure, hand_target, share_target = TARGETS[path]
        wall_ratio = wall["agent"]["vs_hand"][0] if "agent" in wall else None
        count_ratio = counts["agent"] / hand_count if "agent" in counts and hand_count else None
        wall_share = tuple(wall["agent_share"]) if wall.get("agent_share") else None
        count_share = (
            agent_share({m: c - raw_count for m, c in counts.items()})
            if raw_count is not None
            else None
        )
        judged.append(
            {
                "path": path,
                "measure": measure,
                "hand_target": hand_target,
                "share_target": share_target,
                "agent_vs_hand": {"wall": wall_ratio, "instructions": count_ratio},
                "agent_share": {"wall": wall_share, "instructions": count_share},
            }
        )
    print("\n" + "-" * 100)
    print("Targets (issue 14), each judged in its measure; the other measure beside it.")
    print(
        f"{'path':<22} {'judged in':<13} {'agent/hand':>10} {'target':>7} {'':<5} "
        f"{'other':>7}   {'agent added/peer':>16} {'target':>7} {'':<5} {'other':>7}"
    )
    for line in judged:
        measure = line["measure"]
        other = "wall" if measure == "instructions" else "instructions"
        ratio, other_ratio = line["agent_vs_hand"][measure], line["agent_vs_hand"][other]
        share, other_share = line["agent_share"][measure], line["agent_share"][other]
        share_value = share[0] if share else None
        cells = [
            f"{line['path']:<22} {measure:<13}",
            f"{ratio:>10.4f}" if ratio is not None else f"{'-':>10}",
            f"{line['hand_target']:>7.2f}",
            f"{verdict(ratio, line['hand_target']):<5}",
            f"{other_ratio:>7.3f}" if other_ratio is not None else f"{'-':>7}",
            f"  {share_value:>16.3f}" if share_value is not None else f"  {'-':>16}",
            f"{'1/' + str(round(1 / line['share_target'])):>7}",
            f"{verdict(share_value, line['share_target']):<5}",
            f"{other_share[0]:>7.3f}" if other_share else f"{'-':>7}",
        ]
        cheaper = share or other_share
        print(" ".join(cells) + (f"  (cheaper peer: {LABELS[cheaper[1]]})" if cheaper else ""))
    print(
        "agent/hand: the agent's figure over the by-hand row's; agent added/peer: the agent's"
        " added cost over raw\nas a share of the cheaper peer's (ddtrace, OpenTelemetry)."
    )
    return judged


def markdown(figures: dict[str, Any]) -> str:
    """The figures as docs/benchmarks.md's tables: one row per path and mode, then the targets."""
    lines = [
        "| path | mode | wall µs | / by hand (IQR) | instructions | / by hand |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for path in PATH_NAMES:
        wall = figures["wall"].get(path, {}).get("rows", {})
        counts = instruction_counts(figures, path)
        if not wall and not counts:
            continue
        hand = counts.get("hand")
        for mode in MODES:
            row, count = wall.get(mode), counts.get(mode)
            if row is None and count is None:
                continue
            cells = [
                path if mode == "raw" else "",
                LABELS[mode],
                f"{row['median']:.1f}" if row else "-",
                format_ratio(row["vs_hand"]) if row else "-",
                f"{count:,.0f}" if count is not None else "-",
                f"{count / hand:.4f}" if count is not None and hand else "-",
            ]
            lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "| path | judged in | agent / by hand | target | | agent's added / cheaper peer's "
        "| target | | the other measure: ratio, share |",
        "|---|---|---:|---:|---|---:|---:|---|---|",
    ]
    for line in figures.get("targets") or report(figures):
        measure = line["measure"]
        other = "wall" if measure == "instructions" else "instructions"
        ratio, share = line["agent_vs_hand"][measure], line["agent_share"][measure]
        other_ratio, other_share = line["agent_vs_hand"][other], line["agent_share"][other]
        share_value = share[0] if share else None
        cells = [
            line["path"],
            measure,
            f"{ratio:.4f}" if ratio is not None else "-",
            f"{line['hand_target']:.2f}",
            verdict(ratio, line["hand_target"]),
            f"{share_value:.3f} ({LABELS[share[1]]})" if share else "-",
            f"1/{round(1 / line['share_target'])}",
            verdict(share_value, line["share_target"]),
            (f"{other_ratio:.3f}" if other_ratio is not None else "-")
            + (f", {other_share[0]:.3f}" if other_share else ""),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "parts", nargs="*", choices=("timing", "instructions"), help="both by default"
    )
    parser.add_argument("--quick", action="store_true", help="short settings, for the harness")
    parser.add_argument("--json", type=Path, help="write everything measured here")
    parser.add_argument(
        "--from-json", type=Path, help="print the table of an earlier --json, measuring nothing"
    )
    parser.add_argument(
        "--markdown", action="store_true", help="also print the tables of docs/benchmarks.md"
    )
    opts = parser.parse_args()
    opts.parts = set(opts.parts) or {"timing", "instructions"}
    began = time.monotonic()
    if opts.from_json:
        figures = json.loads(opts.from_json.read_text())
    else:
        with tempfile.TemporaryDirectory(prefix="talisker-bench-") as tmp:
            figures = measure(opts, Path(tmp))
        if opts.json:  # before the table: --from-json prints it again
            opts.json.write_text(json.dumps(figures, indent=2) + "\n")
    figures["targets"] = report(figures)
    minutes = (time.monotonic() - began) / 60
    print(f"({minutes:.1f} min)")
    if opts.markdown:
        print("\n" + markdown(figures))
    if opts.json and not opts.from_json:
        opts.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()

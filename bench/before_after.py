"""Before/after: run benchmarks of an earlier revision and of this checkout in one run, alternating.

Each side runs its own copy of a benchmark script with its own source tree (the earlier revision is exported
with ``git archive`` into a temporary folder and put first on ``PYTHONPATH``; the libraries are this
checkout's ``.venv``), so a change of code is measured, not a change of the script. Rounds alternate
before, after, before, after… so that the machine's load falls on both sides alike. Every line both sides
print with the same words is paired, and the median of its first figure over the rounds is shown for each side
with the ratio after / before.

    .venv/bin/python bench/before_after.py --before REV                       # dispatch latency + submissions
    .venv/bin/python bench/before_after.py --before REV --rounds 3 \\
        --bench "dispatch.py --quick --only latency" --bench "submit.py --seconds 5 --skip-depth"
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import statistics
import subprocess
import sys
import tarfile
import tempfile
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_BENCHES = ("dispatch.py --quick --only latency", "submit.py --seconds 5 --skip-depth")
# A figure: a number not glued to a word (p50 and x2 are words of the label).
_NUMBER = re.compile(r"(?<![\w.])-?\d[\d,]*(?:\.\d+)?(?![\w])")
_SECTION = re.compile(r"^\s*\d+\.\s")


def export(revision: str, into: Path) -> Path:
    """The revision's tree (sources, benchmarks and the test data they read) in a folder of its own."""
    archive = into / "tree.tar"
    with archive.open("wb") as out:
        subprocess.run(
            ["git", "archive", revision, "src", "bench", "tests"], cwd=ROOT, stdout=out, check=True
        )
    tree = into / "tree"
    with tarfile.open(archive) as tar:
        tar.extractall(tree, filter="data")
    return tree


def run(tree: Path, bench: str) -> str:
    """One benchmark run from a tree: its own script, its own sources first on the path."""
    script, *args = shlex.split(bench)
    env = {**os.environ, "PYTHONPATH": str(tree / "src")}
    done = subprocess.run(
        [sys.executable, str(tree / "bench" / script), *args],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"{bench} failed in {tree}:\n{done.stdout}\n{done.stderr}")
    return done.stdout


def figures(output: str) -> dict[str, float]:
    """Each line's words (its numbers taken out) → its first figure."""
    found: dict[str, float] = {}
    for line in output.splitlines():
        line = _SECTION.sub("", line)
        numbers = _NUMBER.findall(line)
        label = " ".join(_NUMBER.sub("#", line).split())
        if numbers and any(ch.isalpha() for ch in label):
            found.setdefault(label, float(numbers[0].replace(",", "")))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--before", required=True, help="the earlier revision (a commit, tag or branch)")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each side, alternating")
    parser.add_argument(
        "--bench",
        action="append",
        help=f"a script under bench/ and its arguments (default: {DEFAULT_BENCHES})",
    )
    args = parser.parse_args()
    benches = args.bench or list(DEFAULT_BENCHES)
    with tempfile.TemporaryDirectory(prefix="comfyfleet-before-") as folder:
        sides = {"before": export(args.before, Path(folder)), "after": ROOT}
        for bench in benches:
            seen: dict[str, dict[str, list[float]]] = {
                "before": defaultdict(list),
                "after": defaultdict(list),
            }
            for round_ in range(args.rounds):
                for side, tree in sides.items():
                    print(f"[{bench}] round {round_ + 1} {side} …", file=sys.stderr, flush=True)
                    for label, value in figures(run(tree, bench)).items():
                        seen[side][label].append(value)
            print(
                f"\n{bench}: median of {args.rounds} alternating rounds, before = {args.before}, after = this tree"
            )
            print(f"{'before':>12} {'after':>12} {'after/before':>13}  line")
            for label in seen["after"]:
                if label not in seen["before"]:
                    continue
                old, new = statistics.median(seen["before"][label]), statistics.median(seen["after"][label])
                ratio = f"{new / old:.2f}x" if old else "-"
                print(f"{old:12.2f} {new:12.2f} {ratio:>13}  {label}")


if __name__ == "__main__":
    main()

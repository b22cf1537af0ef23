"""`ditlab report`: the findings' pages and REPORT.md from the results present in a suite folder.

    ditlab report --out reports/cpu          # after (or during) `ditlab reproduce`

Without ids, the findings with any results in the folder get pages; those whose arms are not all
finished are marked pending, the rest get their verdicts; REPORT.md lists the findings with no
results yet as not run. With ids, only those pages are rewritten, and REPORT.md keeps every other
finding's row as its page in the folder has it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ditlab.errors import DitlabError
from ditlab.experiments.reproduce import setup, write_reports


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("ids", nargs="*", help="finding ids (default: those with results in OUT)")
    p.add_argument("--profile", default=None, help="the profile of the results (default: the one OUT was run with)")
    p.add_argument("--seeds", type=int, default=None, help="seeds per arm (default: the one OUT was run with)")
    p.add_argument("--out", default="reports/cpu", help="results folder (default reports/cpu)")
    p.add_argument("--data-dir", default=None, help="dataset folder (as given to reproduce)")
    p.add_argument("--findings", default=None, help="folder of finding specs (as given to reproduce)")


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    meta = out / "suite.json"
    if not meta.is_file():
        raise DitlabError(f"{out} holds no suite results (no suite.json): run `ditlab reproduce --out {out}` first")
    saved = json.loads(meta.read_text())
    args.profile = args.profile or saved["profile"]
    args.seeds = args.seeds or saved["seeds"]
    print(f"wrote {write_reports(setup(args), list(args.ids))}")
    return 0

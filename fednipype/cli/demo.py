"""The demo: fednipype's main job over every site of a folder of BIDS datasets.

``fednipype-demo bids_examples demo_output`` enumerates each bundled site (subjects, sessions,
images, phenotypes) and prints one summary table.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from fednipype.exceptions import FednipypeError

COLUMNS = [
    ("site", "site"),
    ("subjects", "subjects"),
    ("sessions", "sessions"),
    ("t1w", "T1w"),
    ("gm_probseg", "GM maps"),
    ("participants_rows", "phenotype rows"),
    ("age_missing", "age n/a"),
    ("phenotypes", "phenotype columns"),
]


def find_sites(root: Path) -> list[Path]:
    """Sub-folders of ``root`` that are BIDS datasets (hold a ``dataset_description.json``)."""
    return sorted(p for p in root.iterdir() if (p / "dataset_description.json").is_file())


def format_summary(rows: Sequence[dict]) -> str:
    """Render summary rows (from :func:`fednipype.bids.summarize`) as a text table.

    Examples
    --------
    >>> print(format_summary([{"site": "a", "subjects": 2, "sessions": 2, "t1w": 2,
    ...     "gm_probseg": 0, "participants_rows": 2, "age_missing": 0, "phenotypes": ["age"]}]))
    site  subjects  sessions  T1w  GM maps  phenotype rows  age n/a  phenotype columns
    a            2         2    2        0               2        0                age
    """
    import pandas as pd

    table = pd.DataFrame(
        [{title: row[key] for key, title in COLUMNS} for row in rows],
        columns=[title for _, title in COLUMNS],
    )
    table["phenotype columns"] = table["phenotype columns"].map(", ".join)
    return table.to_string(index=False)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo over every BIDS dataset below ``sites_dir``; return the exit code."""
    from fednipype.bids import summarize

    parser = argparse.ArgumentParser(prog="fednipype-demo", description=__doc__.splitlines()[0])
    parser.add_argument("sites_dir", type=Path, help="folder holding one BIDS dataset per site")
    parser.add_argument("output_dir", type=Path, help="folder for the demo's outputs")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not args.sites_dir.is_dir():
        print(f"fednipype-demo: error: {args.sites_dir} is not a folder", file=sys.stderr)
        return 1
    sites = find_sites(args.sites_dir)
    if not sites:
        print(f"fednipype-demo: error: no BIDS dataset below {args.sites_dir}", file=sys.stderr)
        return 1
    rows, failed = [], []
    for site in sites:
        try:
            rows.append({"site": site.name, **summarize(site)})
        except FednipypeError as err:
            failed.append(f"{site.name}: {err}")
    print(format_summary(rows))
    for message in failed:
        print(f"fednipype-demo: error: {message}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())

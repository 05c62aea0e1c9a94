"""Entry point of the ``fednipype`` BIDS-App: a thin layer over the library and workflows."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from fednipype.cli.parser import build_parser
from fednipype.exceptions import FednipypeError

LOGGER = logging.getLogger("fednipype.cli")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the BIDS-App and return its exit code (0 success, 1 error, 2 usage).

    Parameters
    ----------
    argv : sequence of str, optional
        Arguments without the program name; defaults to ``sys.argv[1:]``.
    """
    from fednipype.bids import summarize, write_derivative_description
    from fednipype.cli.demo import format_summary

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        row = summarize(args.bids_dir, args.participant_label)
        print(format_summary([{"site": args.bids_dir.name, **row}]))
        if args.analysis_level == "participant":
            write_derivative_description(args.output_dir, [args.bids_dir.as_uri()])
    except FednipypeError as err:
        print(f"fednipype: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

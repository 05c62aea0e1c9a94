"""``fednipype-site``: the data owner reviews, approves and refuses federated requests.

::

    fednipype-site requests --policy policy.toml [--json]
    fednipype-site approve REQUEST --policy policy.toml [--note TEXT]
    fednipype-site refuse REQUEST --policy policy.toml [--note TEXT]
    fednipype-site serve --policy policy.toml --bids-dir BIDS --derivatives DERIV --site LABEL \\
        --superlink HOST:PORT --root-certificates ca.crt --auth-key site.key [--max-wait-time S]

``REQUEST`` is a request file (an analysis request, ``fednipype-request/1.0``, or a training
request, ``fednipype-training-request/1.0``, JSON) or the content hash (at least its first 8 hex
digits) of a request the ledger has recorded: requests that arrived unapproved are recorded as
pending, with their document, and ``requests`` lists them with the approved, refused and
answered ones (training requests in a table of their own, with their task and rounds).
Decisions go into the audit trail of the dataset's privacy ledger (the one the policy is bound
to), keyed by the request's content hash; an altered request has another hash and needs its
own approval. An approval pays for one answer; for a training request, one run of its rounds,
whose (epsilon, delta) is the whole run's.

``serve`` checks every argument and path first (the policy bound to its ledger, the dataset's
``participants.tsv``, regional features of its participants, the CA certificate, the private
key readable by its owner only), then runs the site's Flower SuperNode in the foreground
(TLS, SuperNode authentication, the node config the client app reads) until SIGTERM or Ctrl-C,
which it forwards; a SuperLink that refuses the key or cannot be reached within
``--max-wait-time`` ends it with one line. It writes nothing into the dataset or derivatives.

Exit codes as every fednipype command (``fednipype-site --help``): 0 success, 2 usage,
3 invalid input (an unreadable or malformed request, an unknown hash; ``serve``: a path, a
certificate or key, a SuperLink that refused or could not be reached), 4 privacy refusal (an
unbound, missing or other ledger), 130 interrupted — one line on stderr; nothing is recorded
before a refusal. ``serve`` stopped by SIGTERM exits 0.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from fednipype.cli.console import setup_logging
from fednipype.cli.errors import (
    EXIT_INTERRUPTED,
    ArgumentParser,
    HelpFormatter,
    exit_epilog,
    guarded,
)
from fednipype.contract.distributed_dp import DistributedNoise, request_noise
from fednipype.contract.request import AnalysisRequest
from fednipype.contract.training import TRAINING_SCHEMA, TrainingRequest
from fednipype.exceptions import FederationError
from fednipype.federated.supernode import (
    DEFAULT_RUNTIME_PORT,
    check_site_node,
    parse_superlink,
    run_supernode,
)
from fednipype.site.approvals import (
    TRAINING,
    RequestRecord,
    approve,
    find_request,
    list_requests,
    refuse,
)
from fednipype.site.ledger import PrivacyLedger
from fednipype.site.policy import TRAINING_MODES, SitePolicy

PROG = "fednipype-site"
COMMANDS = ("requests", "approve", "refuse", "serve")
LOGGER = logging.getLogger("fednipype.cli.site")
SERVE_DESCRIPTION = (
    "run this site's Flower SuperNode in the foreground: it answers the consortium's requests "
    "the data owner approved (one answer per approval), from the site's own features, through "
    "secure aggregation; every argument and path is checked before it starts"
)


def build_parser(command: str | None) -> argparse.ArgumentParser:
    """The parser of one ``fednipype-site`` command (None: the top-level help)."""
    parser = ArgumentParser(
        prog=PROG if command is None else f"{PROG} {command}",
        description=SERVE_DESCRIPTION
        if command == "serve"
        else __doc__.split("\n\n")[0].split(": ", 1)[1],
        epilog=exit_epilog(),
        formatter_class=HelpFormatter,
    )
    if command is None:
        parser.add_argument("command", choices=COMMANDS, help="what to do")
        return parser
    if command in ("approve", "refuse"):
        parser.add_argument(
            "request",
            help="the request file, or the first 8+ hex digits of a recorded request's hash",
        )
        parser.add_argument("--note", help="the owner's reason or reference (kept in the ledger)")
    parser.add_argument("--policy", type=Path, required=True, help="the site policy (TOML)")
    if command == "requests":
        parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    if command == "serve":
        _serve_arguments(parser)
    parser.add_argument("-v", "--verbose", action="count", default=0, help="traceback on error")
    return parser


def _address(text: str) -> str:
    try:
        parse_superlink(text)
    except FederationError as err:
        raise argparse.ArgumentTypeError(str(err).split(": ", 1)[1]) from None
    return text


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected seconds > 0, got {text!r}")
    return value


def _label(text: str) -> str:
    if (
        not text
        or len(text) > 64
        or not all(c.isascii() and (c.isalnum() or c in "._-") for c in text)
    ):
        raise argparse.ArgumentTypeError(
            f"expected a public label [A-Za-z0-9._-]{{1,64}}, got {text!r}"
        )
    return text


def _port(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port from 1 to 65535, got {text!r}")
    return int(text)


def _serve_arguments(parser: argparse.ArgumentParser) -> None:
    data = parser.add_argument_group("the site's data (read by the client app, never written)")
    data.add_argument("--bids-dir", type=Path, required=True, help="the BIDS dataset")
    data.add_argument(
        "--derivatives", type=Path, required=True,
        help="the participant level's output (regional features)",
    )  # fmt: skip
    data.add_argument(
        "--site", type=_label, required=True,
        help="the site's public label, as the consortium's requests name it",
    )  # fmt: skip
    link = parser.add_argument_group("the consortium's SuperLink")
    link.add_argument(
        "--superlink", type=_address, required=True, metavar="HOST:PORT",
        help="the SuperLink's Fleet API address",
    )  # fmt: skip
    link.add_argument(
        "--root-certificates", type=Path, required=True, metavar="CA",
        help="the consortium CA's certificate (PEM): the SuperLink's TLS is checked against it",
    )  # fmt: skip
    link.add_argument(
        "--auth-key", type=Path, required=True, metavar="KEY",
        help="the site's private key (OpenSSH, mode 0600); the coordinator registered KEY.pub",
    )  # fmt: skip
    link.add_argument(
        "--max-wait-time", type=_seconds, default=120.0, metavar="S",
        help="seconds to try to reach the SuperLink before giving up",
    )  # fmt: skip
    link.add_argument(
        "--runtime-port", type=_port, default=DEFAULT_RUNTIME_PORT, metavar="PORT",
        help="port of the SuperNode's local runtime API on 127.0.0.1",
    )  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``fednipype-site`` and return its exit code.

    Parameters
    ----------
    argv : sequence of str, optional
        ``requests --policy FILE [--json]``, ``approve REQUEST --policy FILE [--note TEXT]``
        ``refuse REQUEST --policy FILE [--note TEXT]`` or ``serve --policy FILE ...`` (see
        ``fednipype-site serve --help``).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        build_parser(None).parse_args(argv[:1])  # --help, or a one-line usage error
        return 2  # not reached: parse_args exits
    command = argv.pop(0)
    args = build_parser(command).parse_args(argv)
    setup_logging(PROG, args.verbose)
    body = {"requests": _requests, "approve": _decide, "refuse": _decide, "serve": _serve}[command]
    return guarded(PROG, lambda: body(command, args), verbose=args.verbose)


def _open(policy_path: Path) -> tuple[SitePolicy, PrivacyLedger]:
    policy = SitePolicy.from_toml(policy_path)
    return policy, PrivacyLedger.from_policy(policy)


def _request_file(path: Path) -> AnalysisRequest | TrainingRequest:
    """The request in ``path``: a training request when its schema says so, else an analysis
    request (whose reader reports what is wrong with the file)."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        doc = None
    if isinstance(doc, dict) and doc.get("schema") == TRAINING_SCHEMA:
        return TrainingRequest.from_file(path)
    return AnalysisRequest.from_file(path)


def _cost(record: RequestRecord) -> str:
    if record.epsilon is None:
        return "no noise (a non-DP disclosure)"
    per = "for the whole run" if record.kind == TRAINING else "per answer"
    return f"epsilon={record.epsilon:g}, delta={record.delta:g} {per}"


def _distributed_noise(target: object) -> DistributedNoise | None:
    """The calibrated noise of a ``distributed-dp`` request read from its file (else None)."""
    if isinstance(target, TrainingRequest):
        return target.distributed_noise()
    if isinstance(target, AnalysisRequest) and target.mode == "distributed-dp":
        return request_noise(target)[0]
    return None


def _decide(command: str, args: argparse.Namespace) -> int:
    policy, ledger = _open(args.policy)  # refusals first: nothing is recorded before them
    target: AnalysisRequest | TrainingRequest | RequestRecord
    if Path(args.request).is_file():
        target = _request_file(Path(args.request))
        mode, digest, request_id = target.mode, target.content_hash, target.request_id
    else:
        target = find_request(ledger, args.request)
        mode, digest, request_id = target.mode, target.request_hash, target.request_id
    decide = approve if command == "approve" else refuse
    record = decide(ledger, target, args.note)
    training = record.kind == TRAINING
    if command == "refuse":
        verb = "refused"
    elif training:
        verb = f"approved (for one run of {record.rounds} rounds)"
    else:
        verb = "approved (for one answer)"
    what = f"task {record.task}, {record.rounds} rounds, " if training else ""
    print(
        f"{verb}: {'training ' if training else ''}request {request_id} (hash {digest[:16]}), "
        f"{what}mode {mode}, {_cost(record)}, sites {', '.join(record.sites)}; recorded in "
        f"privacy ledger {ledger.path}"
    )
    if command == "approve" and (shared := _distributed_noise(target)) is not None:
        print(
            f"note: mode distributed-dp: epsilon={shared.epsilon:.3g} holds while the noise "
            f"shares of {shared.n_honest} sites are in every sum the hub unmasks; this site's "
            f"share alone gives epsilon={shared.local_floor_epsilon:.3g} at "
            f"delta={shared.delta:g} (its local floor)"
        )
    allowed = policy.allows_training(mode) if training else policy.allows_mode(mode)
    if command == "approve" and not allowed:
        if training:
            switch = (
                "[federation] allow_non_dp_training = true"
                if mode == "none"
                else f"'{TRAINING_MODES[mode]}' in [federation] modes"
            )
        elif mode == "exact":
            switch = "[federation] allow_exact_secure_sum = true"
        else:
            switch = f"'{mode}' in [federation] modes"
        LOGGER.warning(
            "%s does not allow mode %s: the request is refused at answer time until the policy "
            "sets %s",
            policy.source,
            mode,
            switch,
        )
    return 0


def _print_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    for row in (header, *rows):
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"


def _requests(command: str, args: argparse.Namespace) -> int:
    del command
    _, ledger = _open(args.policy)
    records = list_requests(ledger)
    if args.json:
        print(json.dumps([asdict(r) for r in records], indent=2, allow_nan=False))
        return 0
    if not records:
        print(f"no federated requests recorded in privacy ledger {ledger.path}")
        return 0
    analyses = [r for r in records if r.kind != TRAINING]
    trainings = [r for r in records if r.kind == TRAINING]
    if analyses:
        _print_table(
            ("status", "hash", "request", "mode", "epsilon", "delta", "when"),
            [
                (
                    r.status,
                    r.request_hash[:12],
                    r.request_id,
                    r.mode,
                    _number(r.epsilon),
                    _number(r.delta),
                    r.time,
                )
                for r in analyses
            ],
        )
    if trainings:
        if analyses:
            print()
        print("training requests (epsilon, delta: the whole run's):")
        _print_table(
            ("status", "hash", "request", "task", "mode", "epsilon", "delta", "rounds", "when"),
            [
                (
                    r.status,
                    r.request_hash[:12],
                    r.request_id,
                    str(r.task),
                    r.mode,
                    _number(r.epsilon),
                    _number(r.delta),
                    str(r.rounds),
                    r.time,
                )
                for r in trainings
            ],
        )
    return 0


def _serve(command: str, args: argparse.Namespace) -> int:
    del command
    node = check_site_node(  # every refusal before anything starts
        site=args.site,
        policy=args.policy,
        bids_dir=args.bids_dir,
        derivatives=args.derivatives,
        superlink=args.superlink,
        root_certificates=args.root_certificates,
        auth_key=args.auth_key,
        max_wait_time=args.max_wait_time,
        runtime_port=args.runtime_port,
    )
    print(
        f"site {node.site}: starting its SuperNode for the SuperLink at {node.superlink} "
        f"(TLS, key {node.auth_key.name}; {node.n_features} feature tables; policy "
        f"{node.policy}); stop it with SIGTERM or Ctrl-C",
        flush=True,
    )

    def connected(node_id: int) -> None:
        print(f"site {node.site}: connected to {node.superlink} as node {node_id}", flush=True)

    outcome = run_supernode(node, on_connect=connected)
    if outcome.stopped_by is not None:
        name = signal.Signals(outcome.stopped_by).name
        print(f"site {node.site}: SuperNode stopped ({name})", flush=True)
        return EXIT_INTERRUPTED if outcome.stopped_by == signal.SIGINT else 0
    if outcome.returncode != 0:
        why = outcome.reason or "see the SuperNode's output above"
        raise FederationError(
            f"site {node.site}: SuperNode exited with code {outcome.returncode}: {why}"
        )
    print(f"site {node.site}: SuperNode ended", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""`tomq ledger ...` commands (DESIGN §7). `register` adds them to tomq's parser; `main` runs them alone.

`tomq ledger verify PATH --operator-key HEX_OR_FILE` prints one summary line and exits 0, or prints
`ledger invalid at height H: reason` and exits 1. Usage problems (no such directory, a bad key) are
TomqErrors left to the caller, which prints them and exits 2, as tomq.cli.main does.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tomq.errors import ConfigError
from tomq.identity import PublicKey
from tomq.node.ledger.verify import LedgerInvalid, verify_ledger

_HEX_KEY = re.compile(r"[0-9a-fA-F]{64}")


def operator_key(text: str) -> PublicKey:
    """A public key given as 64 hex digits, or as a file holding them (e.g. DIR/operator/operator.pub)."""
    if _HEX_KEY.fullmatch(text.strip()):
        return PublicKey.from_hex(text.strip())
    try:
        content = Path(text).read_text(encoding="ascii", errors="replace").strip()
    except OSError as exc:
        raise ConfigError(f"--operator-key {text!r} is neither 64 hex digits nor a readable file ({exc.strerror})") from None
    if not _HEX_KEY.fullmatch(content):
        raise ConfigError(f"{text} does not hold an operator public key (64 hex digits, as in DIR/operator/operator.pub)")
    return PublicKey.from_hex(content)


def _cmd_verify(args: argparse.Namespace) -> int:
    key = operator_key(args.operator_key)
    try:
        report = verify_ledger(args.path, key)
    except LedgerInvalid as exc:
        print(exc)
        return 1
    print(report.summary())
    return 0


def register(subparsers: Any) -> Any:
    """Add `ledger` and its actions to `subparsers` (from ArgumentParser.add_subparsers).

    Returns the `ledger` action group so that other ledger commands (tail, export) can join it.
    """
    ledger = subparsers.add_parser("ledger", help="inspect and check the PROV ledger")
    actions = ledger.add_subparsers(dest="ledger_command", metavar="ACTION", required=True)
    verify = actions.add_parser(
        "verify", help="check a ledger directory offline: hash links, signatures, commit certificates, Table II"
    )
    verify.add_argument("path", metavar="PATH", help="a ledger directory of <height>.block files")
    verify.add_argument("--operator-key", required=True, metavar="HEX_OR_FILE",
                        help="the operator public key in hex, or a file holding it (DIR/operator/operator.pub)")
    verify.set_defaults(run=_cmd_verify)
    return actions


def main(argv: Sequence[str] | None = None) -> int:
    """Run `ledger ...` exactly as `tomq ledger ...` does (argv without the leading "ledger")."""
    from tomq.cli import main as tomq_main

    return tomq_main(["ledger", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())

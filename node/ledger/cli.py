"""`tomq ledger ...` commands (DESIGN §7). `register` adds them to tomq's parser; `main` runs them alone.

`tomq ledger verify PATH --operator-key HEX_OR_FILE` prints one summary line and exits 0, or prints
`ledger invalid at height H: reason` and exits 1. Usage problems (no such directory, a bad key) are
TomqErrors left to the caller, which prints them and exits 2, as tomq.cli.main does.

The auditor's toolkit (issue 8); PATH is a ledger directory or an audit bundle file throughout:

    tomq ledger verify PATH --operator-key KEY                  a bundle is checked like a directory
    tomq ledger export PATH [--format prov-json|prov-n|prov-o] [--from H] [--to H]
                            [--operator-key KEY] [--output FILE]
    tomq ledger prove PATH --record ID [--operator-key KEY] [--output FILE]       inclusion proof
    tomq ledger prove PATH --from H1 [--to H2] [--operator-key KEY] [--output FILE]  consistency proof
    tomq ledger check-proof PROOF --operator-key KEY [--old-head HASH] [--json]
    tomq ledger bundle PATH OUT [--from H] [--to H] [--operator-key KEY]
    tomq ledger query PATH lineage RESULT | device NAME [--since T] [--until T]
                      | placements [--service S] | commands ACTUATOR      [--operator-key KEY] [--json]

Exit codes: 0 done; 1 the ledger or the proof does not hold (the one-line reason on stdout); 2 a
usage problem (stderr). Without --operator-key, export, prove and query read the ledger unverified
(bundle.py says what is still checked) and say so on stderr; with it they verify from genesis first.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tomq.errors import ConfigError
from tomq.identity import PublicKey
from tomq.node.ledger.verify import LedgerInvalid, verify_ledger

_UNVERIFIED = ("tomq: note: read without --operator-key: block shape, hash links and Merkle roots are checked, "
               "signatures, certificates and Table II are NOT")

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
    if Path(args.path).is_file():
        from tomq.node.ledger.bundle import verify_bundle

        try:
            report, bundle = verify_bundle(args.path, key)
        except LedgerInvalid as exc:
            print(exc)
            return 1
        print(report.summary())
        print(f"bundle ok: audited heights {bundle.first}..{bundle.last}, verified from genesis")
        return 0
    try:
        report = verify_ledger(args.path, key)
    except LedgerInvalid as exc:
        print(exc)
        return 1
    print(report.summary())
    return 0


def _reader(args: argparse.Namespace) -> Any:
    from tomq.node.ledger.bundle import LedgerReader, open_source

    key = operator_key(args.operator_key) if args.operator_key else None
    if key is None:
        print(_UNVERIFIED, file=sys.stderr)
    return LedgerReader(open_source(args.path), key)


def _write_output(target: str | None, text: str) -> None:
    """`text` to stdout, or to the file `target`, replaced whole only once it is all written."""
    if target is None or target == "-":
        sys.stdout.write(text)
        return
    path = Path(target)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        temporary.write_text(text, encoding="utf-8")
        os.replace(temporary, path)
    except OSError as exc:
        temporary.unlink(missing_ok=True)
        raise ConfigError(f"cannot write {target}: {exc.strerror}") from None


def _cmd_export(args: argparse.Namespace) -> int:
    from tomq.node.ledger import export

    reader = _reader(args)
    first = args.first
    if first is None:
        bundle = getattr(reader.source, "bundle", None)
        first = bundle.first if bundle is not None else 0  # a bundle's export covers its audited range
    path = Path(args.output) if args.output not in (None, "-") else None
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp") if path is not None else None
    try:
        if temporary is None:
            report = export.export(reader, args.format, sys.stdout, first, args.last)
        else:
            with open(temporary, "w", encoding="utf-8") as out:
                report = export.export(reader, args.format, out, first, args.last)
            assert path is not None
            os.replace(temporary, path)
    except LedgerInvalid as exc:
        print(exc)
        return 1
    except OSError as exc:
        raise ConfigError(f"cannot write {args.output}: {exc.strerror}") from None
    finally:
        if temporary is not None:
            temporary.unlink(missing_ok=True)
    print(report.summary() + (f"; written to {args.output}" if path is not None else ""), file=sys.stderr)
    return 0


def _cmd_prove(args: argparse.Namespace) -> int:
    from tomq.node.ledger import proofs
    from tomq.node.ledger.query import LedgerIndex

    reader = _reader(args)
    try:
        if args.record is not None:
            if args.first is not None or args.last is not None:
                raise ConfigError("give either --record ID (inclusion) or --from H1 [--to H2] (consistency)")
            entry = LedgerIndex(reader.entries(), verified=reader.verified).one(args.record)
            data = proofs.build_inclusion(reader.source.read, entry.height, entry.index)
        elif args.first is not None:
            last = reader.source.top if args.last is None else args.last
            if args.operator_key:
                for _ in reader.blocks(0, last):
                    pass  # verify up to the later head before vouching for the headers
            data = proofs.build_consistency(reader.source.read, args.first, last)
        else:
            raise ConfigError("give --record ID for an inclusion proof or --from H1 [--to H2] for a consistency proof")
    except (LedgerInvalid, proofs.ProofRejected) as exc:
        print(exc)
        return 1
    if reader.operator is not None:
        print(proofs.check(data, reader.operator).summary(), file=sys.stderr)  # a proof that would not check is a bug
    _write_output(args.output, proofs.armor(data))
    return 0


def _cmd_check_proof(args: argparse.Namespace) -> int:
    from tomq.node.ledger import proofs

    key = operator_key(args.operator_key)
    try:
        data = sys.stdin.buffer.read() if args.proof == "-" else Path(args.proof).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read proof {args.proof}: {exc.strerror}") from None
    old_head = None
    if args.old_head is not None:
        if not re.fullmatch(r"[0-9a-fA-F]{64}", args.old_head):
            raise ConfigError("--old-head must be a block hash of 64 hex digits")
        old_head = bytes.fromhex(args.old_head)
    try:
        report = proofs.check(data, key, old_head=old_head)
    except proofs.ProofRejected as exc:
        print(json.dumps({"ok": False, "reason": str(exc)}) if args.json else f"proof rejected: {exc}")
        return 1
    print(json.dumps({"ok": True, **report.to_json()}, indent=2) if args.json else report.summary())
    return 0


def _cmd_bundle(args: argparse.Namespace) -> int:
    from tomq.node.ledger.bundle import open_source, write_bundle

    key = operator_key(args.operator_key) if args.operator_key else None
    try:
        bundle = write_bundle(open_source(args.path), args.out, args.first, args.last, key)
    except LedgerInvalid as exc:
        print(exc)
        return 1
    size = Path(args.out).stat().st_size
    print(f"wrote {args.out}: heights {bundle.first}..{bundle.last} with the {bundle.first} block(s) before them "
          f"({bundle.last + 1} blocks, {size} bytes){'' if key else '; not verified (no --operator-key)'}")
    return 0


def _cmd_query(args: argparse.Namespace) -> int:
    from tomq.node.ledger import query

    reader = _reader(args)
    try:
        index = query.LedgerIndex(reader.entries(), verified=reader.verified)
    except LedgerInvalid as exc:
        print(exc)
        return 1
    if args.question == "lineage":
        answer, render = query.lineage(index, args.target), query.render_lineage
    elif args.question == "device":
        since = query.parse_time(args.since) if args.since else None
        until = query.parse_time(args.until) if args.until else None
        answer, render = query.device_activity(index, args.name, since, until), query.render_device
    elif args.question == "placements":
        answer, render = query.placements(index, args.service), query.render_placements
    else:
        answer, render = query.commands(index, args.actuator), query.render_commands
    print(json.dumps(answer, indent=2) if args.json else render(answer))
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
    _register_audit(actions)
    return actions


def _height(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a block height (0, 1, 2, ...)")
    return int(text)


def _register_audit(actions: Any) -> None:
    from tomq.node.ledger.export import FORMATS

    path_help = "a ledger directory of <height>.block files, or an audit bundle file"
    key_help = "the operator public key (hex, or DIR/operator/operator.pub); without it the ledger is read unverified"

    export = actions.add_parser("export", help="write the ledger as W3C PROV (PROV-JSON, PROV-N or PROV-O Turtle)")
    export.add_argument("path", metavar="PATH", help=path_help)
    export.add_argument("--format", choices=FORMATS, default="prov-json")
    export.add_argument("--from", dest="first", type=_height, help="first height (default 0, or a bundle's range)")
    export.add_argument("--to", dest="last", type=_height, help="last height (default: the head)")
    export.add_argument("--operator-key", metavar="HEX_OR_FILE", help=key_help)
    export.add_argument("--output", "-o", metavar="FILE", help="write here instead of stdout")
    export.set_defaults(run=_cmd_export)

    prove = actions.add_parser("prove", help="print an inclusion proof of one record, or a consistency proof")
    prove.add_argument("path", metavar="PATH", help=path_help)
    prove.add_argument("--record", metavar="ID", help="record id (or 8+ hex digits of it), HEIGHT/INDEX, or the "
                                                      "datum / member / command it is about")
    prove.add_argument("--from", dest="first", type=_height, help="consistency proof: the earlier height")
    prove.add_argument("--to", dest="last", type=_height, help="consistency proof: the later height (default: head)")
    prove.add_argument("--operator-key", metavar="HEX_OR_FILE", help=key_help)
    prove.add_argument("--output", "-o", metavar="FILE", help="write the proof here instead of stdout")
    prove.set_defaults(run=_cmd_prove)

    check = actions.add_parser("check-proof", help="check a proof with the operator public key and nothing else")
    check.add_argument("proof", metavar="PROOF", help="the proof file (armored text or CBOR), or - for stdin")
    check.add_argument("--operator-key", required=True, metavar="HEX_OR_FILE",
                       help="the operator public key in hex, or a file holding it")
    check.add_argument("--old-head", metavar="HASH", help="consistency proof: the hash you hold for the earlier height")
    check.add_argument("--json", action="store_true")
    check.set_defaults(run=_cmd_check_proof)

    bundle = actions.add_parser("bundle", help="write an audit bundle: one file another machine can verify alone")
    bundle.add_argument("path", metavar="PATH", help=path_help)
    bundle.add_argument("out", metavar="OUT", help="the bundle file to create (never overwritten)")
    bundle.add_argument("--from", dest="first", type=_height, default=0, help="first audited height (default 0)")
    bundle.add_argument("--to", dest="last", type=_height, help="last height (default: the head)")
    bundle.add_argument("--operator-key", metavar="HEX_OR_FILE", help="verify the ledger before bundling it")
    bundle.set_defaults(run=_cmd_bundle)

    query = actions.add_parser("query", help="answer an auditor's question: lineage, device, placements, commands")
    query.add_argument("path", metavar="PATH", help=path_help)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--operator-key", metavar="HEX_OR_FILE", help=key_help)
    common.add_argument("--json", action="store_true", help="the answer as JSON")
    questions = query.add_subparsers(dest="question", metavar="QUESTION", required=True)
    lineage = questions.add_parser("lineage", parents=[common],
                                   help="a result (or datum, or command) back to its readings and devices")
    lineage.add_argument("target", metavar="RESULT", help="data id (result:...), record id or command id")
    device = questions.add_parser("device", parents=[common], help="everything a device (or any member) did")
    device.add_argument("name", metavar="NAME")
    device.add_argument("--since", metavar="T", help="ISO 8601 time (UTC unless a zone is given) or unix seconds")
    device.add_argument("--until", metavar="T", help="ISO 8601 time or unix seconds (inclusive)")
    placement = questions.add_parser("placements", parents=[common], help="every placement with the loads behind it")
    placement.add_argument("--service", metavar="S")
    command = questions.add_parser("commands", parents=[common], help="every command an actuator was sent, and why")
    command.add_argument("actuator", metavar="ACTUATOR")
    query.set_defaults(run=_cmd_query)


def main(argv: Sequence[str] | None = None) -> int:
    """Run `ledger ...` exactly as `tomq ledger ...` does (argv without the leading "ledger")."""
    from tomq.cli import main as tomq_main

    return tomq_main(["ledger", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())

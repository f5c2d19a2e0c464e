"""Which devices are joined now, as a service instance sees it: `DeviceRegistry`.

It starts from devices.cbor (the devices joined at the instance's ledger_height) and follows the
ledger from there: PROV-ID-delete audit lines, and PROV-ID-create records in certified blocks (an
audit line carries a certificate only as its hash, so the certificate itself comes from the block,
checked against the operator).

What this module must never do: trust a device certificate the operator key did not sign, or let
a change at or below the baseline height, or older than one already applied, undo a newer one.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from typing import Any

from tomq import certificate as certificates
from tomq.certificate import Certificate, TrustStore
from tomq.errors import InvalidCertificate
from tomq.node.ledger.block import Block
from tomq.node.services.committed import block_records
from tomq.node.services.readings import DEVICE_ROLES
from tomq.records import ID_CREATE, ID_DELETE, Identity

log = logging.getLogger("tomq.service")


class DeviceRegistry:
    """Which devices are joined now: devices.cbor at `height`, then every later change on the ledger.

    Changes are ordered by their position (height, index in the block): an audit line and the block
    that carries the same record, or retained blocks delivered out of order, apply once and in order.
    """

    def __init__(self, trust: TrustStore, devices: Mapping[str, Certificate], height: int) -> None:
        self.trust = trust
        self._joined: set[str] = set(devices)
        self._position: dict[str, tuple[int, int]] = dict.fromkeys(devices, (height, sys.maxsize))
        self._baseline = height

    def joined(self, name: str) -> bool:
        return name in self._joined

    def on_block(self, height: int, block: Block) -> None:
        for index, _, _, record in block_records(block):
            identity = record.structure
            if isinstance(identity, Identity):
                self._apply(height, index, record.state, identity.kind, identity.object, identity.proof)

    def on_audit_line(self, line: Mapping[str, Any]) -> None:
        state = line.get("state")
        body = line.get("body")
        identity = body.get("identity") if isinstance(body, dict) else None
        if state not in (ID_CREATE, ID_DELETE) or not isinstance(identity, dict):
            return
        height, index = line.get("height"), line.get("index")
        if not isinstance(height, int) or not isinstance(index, int):
            return
        proof: bytes | None = None
        text = identity.get("proof")
        if isinstance(text, str) and not text.startswith("sha256:"):
            try:
                proof = bytes.fromhex(text)
            except ValueError:
                proof = None
        if state == ID_CREATE and proof is None:
            return  # the line carries only the certificate's hash; its certified block brings the rest
        self._apply(height, index, state, identity.get("kind"), identity.get("object"), proof)

    def _apply(self, height: int, index: int, state: str, kind: object, name: object, proof: bytes | None) -> None:
        if state not in (ID_CREATE, ID_DELETE) or kind != "device" or not isinstance(name, str):
            return
        position = (height, index)
        if height <= self._baseline or position <= self._position.get(name, (-1, -1)):
            return
        if state == ID_DELETE:
            self._position[name] = position
            if name in self._joined:
                self._joined.discard(name)
                log.info("device %s left the cluster (height %s)", name, height)
            return
        try:
            certificate = certificates.decode(proof or b"", self.trust.operator)
            if certificate.name != name or certificate.role not in DEVICE_ROLES:
                raise InvalidCertificate(f"it certifies {certificate.name} as a {certificate.role}")
            self.trust.add(certificate.encoded)
        except InvalidCertificate as exc:
            log.warning("not trusting the join of device %s at height %s: %s", name, height, exc)
            return
        self._position[name] = position
        if name not in self._joined:
            self._joined.add(name)
            log.info("device %s joined the cluster (height %s)", name, height)

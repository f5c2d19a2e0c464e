"""Which Raft batches a node's transport takes, by topic and sender (node/raft/transport.py).

The transport reads the sender from its inbox topic `tomq/<cluster>/node/<to>/raft/<from>` and then
requires the envelope to come from that node: its MAC under the key only the two nodes share.
Pure: no broker, batches handed in directly.
"""

from __future__ import annotations

from typing import Any

import pytest

from fuzz_targets import CLUSTER, raft_batch, raft_messages, world
from tomq.node.raft.messages import Message, encode
from tomq.node.raft.transport import RaftTransport
from tomq.topics import Topics
from tomq.wire import MemoryWatermarks, SequenceCounter, seal_shared

TOPICS = Topics(CLUSTER)


@pytest.fixture
def inbox() -> tuple[RaftTransport, list[tuple[str, list[Message], dict[str, Any]]]]:
    w = world()
    batches: list[tuple[str, list[Message], dict[str, Any]]] = []
    transport = RaftTransport(link=None, topics=TOPICS, name="n1", key=w.keys["n1"], trust=w.trust,  # type: ignore[arg-type]
                              counter=SequenceCounter(), watermarks=MemoryWatermarks(),
                              on_batch=lambda sender, messages, extras: batches.append((sender, messages, extras)))
    return transport, batches


def body() -> dict[str, Any]:
    messages = [m for m in raft_messages() if m.from_ == "n2" and m.to == "n1"]
    assert messages, "the fuzz world has messages from n2 to n1"
    return {"m": [encode(m) for m in messages]}


def batch_from(sender: str, seq: int) -> bytes:
    return raft_batch(sender, "n1", seq=seq, body=body())


def test_a_batch_from_the_node_its_topic_names_is_taken(inbox):
    transport, batches = inbox
    transport.handle(TOPICS.raft("n1", "n2"), batch_from("n2", 1))
    assert [sender for sender, _, _ in batches] == ["n2"] and batches[0][1]
    assert dict(transport.rejected) == {}


@pytest.mark.parametrize("topic", [
    f"tomq/{CLUSTER}/node/n1/raft/",  # no sender
    f"tomq/{CLUSTER}/node/n1/raft/n2/x",  # a level too many
    f"tomq/{CLUSTER}/node/n1/raft/n+2",  # a wildcard where a name goes
    f"tomq/{CLUSTER}/node/n1/raft/.n2",  # a name must start with a letter or digit
])
def test_a_sender_that_is_not_a_node_id_is_refused_as_a_bad_topic(inbox, topic):
    transport, batches = inbox
    transport.handle(topic, batch_from("n2", 1))
    assert batches == [] and dict(transport.rejected) == {"bad-topic": 1}


@pytest.mark.parametrize("topic", [TOPICS.raft("n3", "n2"), "tomq/other/node/n1/raft/n2", TOPICS.node_load("n1")])
def test_a_batch_for_another_inbox_is_ignored_without_a_refusal(inbox, topic):
    transport, batches = inbox
    transport.handle(topic, batch_from("n2", 1))
    assert batches == [] and dict(transport.rejected) == {}


def test_a_batch_signed_by_another_node_than_its_topic_names_is_refused_as_spoofed(inbox):
    transport, batches = inbox
    transport.handle(TOPICS.raft("n1", "n2"), batch_from("n3", 1))
    assert batches == [] and dict(transport.rejected) == {"spoofed": 1}


def test_a_batch_under_a_key_the_receiver_does_not_share_is_refused(inbox):
    transport, batches = inbox
    w = world()
    n2_with_n3 = w.keys["n2"].shared_key(w.keys["n3"].public_key, b"raft batches")  # n2's key with n3, not n1
    transport.handle(TOPICS.raft("n1", "n2"), seal_shared(n2_with_n3, w.keys["n2"].id, seq=1, time_ms=0,
                                                          type="raft", body=body()))
    transport.handle(TOPICS.raft("n1", "n2"), w.sealed("n2", seq=2, type="raft", body=body()))  # signed, no MAC
    assert batches == [] and dict(transport.rejected) == {"BadSignature": 2}


def test_a_changed_byte_or_a_replay_is_refused(inbox):
    transport, batches = inbox
    good = batch_from("n2", 5)
    changed = bytearray(good)
    changed[-1] ^= 1  # the MAC's last byte
    transport.handle(TOPICS.raft("n1", "n2"), bytes(changed))
    transport.handle(TOPICS.raft("n1", "n2"), good)
    transport.handle(TOPICS.raft("n1", "n2"), good)  # the same sequence number again
    assert len(batches) == 1
    assert dict(transport.rejected) == {"BadSignature": 1, "ReplayedEnvelope": 1}


def test_both_nodes_of_a_pair_compute_the_same_key_and_no_third_one_does():
    w = world()
    n1, n2, n3 = (w.keys[name] for name in ("n1", "n2", "n3"))
    assert n1.shared_key(n2.public_key, b"raft batches") == n2.shared_key(n1.public_key, b"raft batches")
    assert n1.shared_key(n2.public_key, b"raft batches") != n3.shared_key(n2.public_key, b"raft batches")
    assert n1.shared_key(n2.public_key, b"raft batches") != n1.shared_key(n2.public_key, b"something else")

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tomq.errors import InvalidTopic
from tomq.topics import Topics, check_segment, default_publish_rights, filter_matches, parse

segment = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,20}", fullmatch=True)
T = Topics("city")


@pytest.mark.parametrize(
    "topic, kind, params",
    [
        (T.device_data("s1"), "device-data", {"device": "s1"}),
        (T.device_cmd("tl1"), "device-cmd", {"device": "tl1"}),
        (T.device_state("s1"), "device-state", {"device": "s1"}),
        (T.raft("n2", "n1"), "raft", {"to": "n2", "from": "n1"}),
        (T.node_load("n1"), "node-load", {"node": "n1"}),
        (T.orch_request(), "orch-request", {}),
        (T.orch_placement("collector"), "orch-placement", {"service": "collector"}),
        (T.service_in("analyser"), "service-in", {"service": "analyser"}),
        (T.service_out("analyser"), "service-out", {"service": "analyser"}),
        (T.ledger_propose("web"), "ledger-propose", {"member": "web"}),
        (T.ledger_block(42), "ledger-block", {"height": "42"}),
        (T.ledger_head(), "ledger-head", {}),
        (T.audit("PROV-DATA"), "audit", {"record_type": "PROV-DATA"}),
    ],
)
def test_every_design_topic_builds_and_parses(topic, kind, params):
    assert topic.startswith("tomq/city/")
    parsed = parse(topic)
    assert (parsed.cluster, parsed.kind, parsed.params) == ("city", kind, params)


def test_topic_strings_match_design():
    assert T.raft("n2", "n1") == "tomq/city/node/n2/raft/n1"
    assert T.raft_inbox("n2") == "tomq/city/node/n2/raft/+"
    assert T.ledger_block(0) == "tomq/city/ledger/block/0"
    assert T.audit_all() == "tomq/city/audit/#"


@given(cluster=segment, device=segment, a=segment, b=segment, height=st.integers(0, 10**18))
def test_round_trip_property(cluster, device, a, b, height):
    topics = Topics(cluster)
    assert parse(topics.device_data(device)).params == {"device": device}
    assert parse(topics.raft(a, b)).params == {"to": a, "from": b}
    assert parse(topics.ledger_block(height)).params == {"height": str(height)}


@pytest.mark.parametrize("bad", ["", "a/b", "+", "#", "a+", "s#", "-lead", "a b", "é", "x" * 65, "a\x00", "$SYS"])
def test_bad_ids_are_refused_everywhere(bad):
    with pytest.raises(InvalidTopic):
        check_segment(bad)
    with pytest.raises(InvalidTopic):
        T.device_data(bad)
    with pytest.raises(InvalidTopic):
        T.raft("n1", bad)
    with pytest.raises(InvalidTopic):
        Topics(bad)


@pytest.mark.parametrize(
    "topic",
    [
        "tomq/city/dev/+/data",
        "tomq/city/audit/#",
        "tomq/city/dev/s1",
        "tomq/city/dev/s1/data/extra",
        "other/city/dev/s1/data",
        "tomq/city/ledger/block/01",
        "tomq/city/ledger/block/-1",
        "tomq/city/unknown",
        "tomq//dev/s1/data",
        "tomq/city/node/n1/raft/",
    ],
)
def test_parse_refuses_wildcards_and_unknown_shapes(topic):
    with pytest.raises(InvalidTopic):
        parse(topic)


def test_ledger_height_must_be_a_non_negative_int():
    for bad in (-1, True, "3", 1.0):
        with pytest.raises(InvalidTopic):
            T.ledger_block(bad)  # type: ignore[arg-type]


def test_publish_rights_follow_design():
    sensor = default_publish_rights("sensor", "s1")
    assert any(filter_matches(f, "dev/s1/data") for f in sensor)
    assert not any(filter_matches(f, "dev/s2/data") for f in sensor)
    assert not any(filter_matches(f, "ledger/propose/s1") for f in sensor)
    node = default_publish_rights("node", "n1")
    assert any(filter_matches(f, "node/n2/raft/n1") for f in node)
    assert not any(filter_matches(f, "node/n2/raft/n3") for f in node)  # no spoofing another node
    assert any(filter_matches(f, "ledger/block/7") for f in node)
    assert default_publish_rights("auditor", "a1") == ()
    with pytest.raises(InvalidTopic):
        default_publish_rights("king", "k")


@pytest.mark.parametrize(
    "topic_filter, topic, expected",
    [
        ("a/#", "a/b/c", True),
        ("a/#", "a", True),  # MQTT 3.1.1 §4.7.1.2: "sport/#" also matches "sport"
        ("a/+/c", "a/b/c", True),
        ("a/+/c", "a/b/d", False),
        ("a/+", "a/b/c", False),
        ("#", "anything/at/all", True),
        ("a/b", "a/b", True),
    ],
)
def test_filter_matching(topic_filter, topic, expected):
    assert filter_matches(topic_filter, topic) is expected

"""`tomq init` and `tomq device add`, run as the installed console script, as an operator would."""

import os
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tomq import certificate, cluster
from tomq.errors import ClusterExistsError, ConfigError
from tomq.identity import SigningKey
from tomq.wire import EnvelopeOpener, seal

TOMQ = Path(sys.executable).with_name("tomq")


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(TOMQ), *args], capture_output=True, text=True, timeout=60)


def test_init_creates_a_complete_cluster(tmp_path):
    directory = tmp_path / "city"
    result = run("init", str(directory), "--nodes", "n1,n2,n3")
    assert result.returncode == 0, result.stderr
    config = tomllib.loads((directory / "cluster.toml").read_text())
    assert config["cluster"]["name"] == "city"
    assert [m["name"] for m in config["members"]] == ["n1", "n2", "n3"]
    operator_key = SigningKey.load(directory / "operator" / "operator.key")
    assert (directory / "operator" / "operator.pub").read_text().strip() == operator_key.public_key.hex()
    for member in config["members"]:
        key_path = directory / "members" / member["name"] / "key"
        assert stat.S_IMODE(os.stat(key_path).st_mode) == 0o600
        key = SigningKey.load(key_path)
        assert key.id == member["id"]
        cert = certificate.decode((key_path.parent / "cert.cbor").read_bytes(), operator_key.public_key)
        assert (cert.name, cert.role, cert.subject_id) == (member["name"], "node", key.id)
        assert cert.may_publish(f"node/n9/raft/{member['name']}")
    assert stat.S_IMODE(os.stat(directory / "broker" / "passwd").st_mode) == 0o600


def test_members_can_sign_and_the_cluster_can_check_them(tmp_path):
    created = cluster.init(tmp_path / "c", ["n1", "n2"])
    cluster.add_member(tmp_path / "c", "s1", "sensor")
    loaded = cluster.load(tmp_path / "c")
    trust = loaded.trust_store()
    assert len(trust) == 3
    wire = seal(loaded.signing_key("s1"), seq=1, time_ms=0, type="reading", body={"v": 1})
    import time

    envelope = EnvelopeOpener(trust).open(wire, time.time())
    assert trust.by_id(envelope.sender).name == "s1"  # type: ignore[union-attr]
    assert created.operator == loaded.operator


def test_broker_passwords_are_derived_from_member_keys(tmp_path):
    cluster.init(tmp_path / "c", ["n1"])
    cluster.add_member(tmp_path / "c", "s1", "sensor")
    loaded = cluster.load(tmp_path / "c")
    lines = dict(line.split(":", 1) for line in (tmp_path / "c" / "broker" / "passwd").read_text().splitlines())
    assert set(lines) == {"n1", "s1"}
    for name in ("n1", "s1"):
        password = cluster.broker_password(loaded.signing_key(name))
        assert cluster.check_mosquitto_password(lines[name], password)
        assert not cluster.check_mosquitto_password(lines[name], password + "x")
    assert cluster.broker_password(loaded.signing_key("n1")) not in (tmp_path / "c" / "broker" / "passwd").read_text()


def test_reinit_refuses_and_keeps_the_keys(tmp_path):
    directory = tmp_path / "c"
    assert run("init", str(directory), "--nodes", "n1").returncode == 0
    before = (directory / "operator" / "operator.key").read_bytes()
    again = run("init", str(directory), "--nodes", "n1,n2")
    assert again.returncode == 2
    assert "already holds a cluster" in again.stderr and len(again.stderr.strip().splitlines()) == 1
    assert (directory / "operator" / "operator.key").read_bytes() == before
    with pytest.raises(ClusterExistsError):
        cluster.init(directory, ["n1"])


def test_device_add_enrols_sensor_and_actuator(tmp_path):
    directory = tmp_path / "c"
    assert run("init", str(directory), "--nodes", "n1").returncode == 0
    assert run("device", "add", str(directory), "--name", "temp1", "--role", "sensor").returncode == 0
    assert run("device", "add", str(directory), "--name", "light1", "--role", "actuator").returncode == 0
    loaded = cluster.load(directory)
    assert {m.name: m.role for m in loaded.members} == {"n1": "node", "temp1": "sensor", "light1": "actuator"}
    assert loaded.certificate("temp1").may_publish("dev/temp1/data")
    assert not loaded.certificate("temp1").may_publish("dev/light1/data")
    duplicate = run("device", "add", str(directory), "--name", "temp1", "--role", "sensor")
    assert duplicate.returncode == 2 and "already exists" in duplicate.stderr
    bad_name = run("device", "add", str(directory), "--name", "a/b", "--role", "sensor")
    assert bad_name.returncode == 2 and "topic segment" in bad_name.stderr
    bad_role = run("device", "add", str(directory), "--name", "x", "--role", "node")
    assert bad_role.returncode != 0


def test_members_listing_json(tmp_path):
    import json

    directory = tmp_path / "c"
    cluster.init(directory, ["n1", "n2"])
    result = run("members", str(directory), "--json")
    assert result.returncode == 0
    listing = json.loads(result.stdout)
    assert [m["name"] for m in listing["members"]] == ["n1", "n2"]
    assert listing["operator"] == cluster.load(directory).operator.id


@pytest.mark.parametrize(
    "nodes, message",
    [("", "at least one node"), ("n1,n1", "repeat"), ("n1,bad/name", "topic segment")],
)
def test_init_refuses_bad_node_lists(tmp_path, nodes, message):
    result = run("init", str(tmp_path / "c"), "--nodes", nodes)
    assert result.returncode == 2 and message in result.stderr


def test_commands_outside_a_cluster_say_how_to_make_one(tmp_path):
    result = run("device", "add", str(tmp_path), "--name", "s1", "--role", "sensor")
    assert result.returncode == 2 and "tomq init" in result.stderr
    with pytest.raises(ConfigError):
        cluster.load(tmp_path)


def test_device_add_refuses_an_operator_key_readable_by_others(tmp_path):
    directory = tmp_path / "c"
    cluster.init(directory, ["n1"])
    os.chmod(directory / "operator" / "operator.key", 0o644)
    result = run("device", "add", str(directory), "--name", "s1", "--role", "sensor")
    assert result.returncode == 2 and "chmod 600" in result.stderr

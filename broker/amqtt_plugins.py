"""tomq's authentication and topic ACL inside an amqtt 0.12 broker, plus the holes amqtt leaves open.

amqtt 0.12 loads plugins from the broker config's `plugins:` mapping of dotted class path to
options; the options are turned into the plugin's nested `Config` dataclass (dacite, strict, so an
unknown key fails at start-up). A plugin that subclasses `BaseAuthPlugin` is asked
`authenticate(session=)` on CONNECT; one that subclasses `BaseTopicPlugin` is asked
`topic_filtering(session=, topic=, action=)` with action PUBLISH (each incoming message),
SUBSCRIBE (each filter; False makes amqtt answer SUBACK 0x80 and not subscribe) and RECEIVE (each
delivery to each subscriber). `TomqAccessPlugin` is both, so one `Policy` answers all of them:

    plugins:
      tomq.broker.amqtt_plugins.TomqAccessPlugin: {cluster_dir: /path/to/DIR}

What amqtt 0.12 lacks and this module adds (each found by reading amqtt/broker.py 0.12.1):
- Password hashes: its FileAuthPlugin reads only argon2/bcrypt (and deprecated `$6$` crypt); the
  `$7$` PBKDF2-SHA512 hashes that tomq and mosquitto share are checked here through the policy.
- Certificate-derived rights: its TopicAccessControlListPlugin takes static per-user lists and
  supports no per-user placeholders; here every decision comes from the member's certificate
  and the RULES table, and the policy is reloaded when cluster.toml or broker/passwd changes,
  so `tomq device add` takes effect without a restart.
- Last will: amqtt publishes a will on abnormal disconnect without asking the topic plugins, so
  a sensor could leave a forged retained `ledger/head` behind. Here a CONNECT whose will topic
  the member may not publish to is refused (mosquitto 2.0.11 accepts it and drops the will).
- Retained messages: on every CONNECT amqtt sends the new client the retained messages matching
  every filter that ANY client holds (a sensor connecting after a node subscribed `tomq/c/#`
  received the node's retained load reports), and neither that path, nor retained messages on
  SUBSCRIBE, nor messages queued for an offline session go through RECEIVE filtering.
  `TomqBroker` sends only what matches the client's own subscriptions and what it may read.
- Session hijack before authentication: amqtt deletes or takes over the existing session with the
  same client id before it looks at the authentication result, so a client with a wrong
  password could disconnect a node and wipe its subscriptions. `TomqBroker` authenticates first,
  and refuses a client id that a session of another member holds, so a device cannot knock a
  node off the broker by reusing its client id (mosquitto cannot express this).

It must never accept a client the policy has not authenticated, never route a message the
policy denies, and never depend on anything but amqtt 0.12's plugin hooks and the private
Broker methods overridden below (the dependency pins amqtt to <0.13 for that reason).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from amqtt.broker import Broker
from amqtt.contexts import Action, BaseContext
from amqtt.errors import AMQTTError, MQTTError, NoDataError
from amqtt.mqtt.connack import NOT_AUTHORIZED, ConnackPacket
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.session import Session
from amqtt.utils import gen_client_id
from prometheus_client import CollectorRegistry, Counter

from tomq.broker.amqtt_broadcast import DirectBroadcast
from tomq.broker.policy import Policy, load_policy
from tomq.refusals import Refusals

log = logging.getLogger(__name__)

# One broker per process: what `tomq broker --metrics-port` serves.
METRICS = CollectorRegistry()
REFUSED = Counter("tomq_broker_refused", "publishes and subscribes the ACL denied, by member (its login name)",
                  ["member", "reason"], registry=METRICS)


class PolicySource:
    """The policy of one cluster directory, reloaded when cluster.toml or broker/passwd changes."""

    def __init__(self, cluster_dir: str | os.PathLike[str]) -> None:
        self.directory = Path(cluster_dir)
        self._lock = threading.Lock()
        self._stamp = self._files_stamp()
        self._policy = self._load()
        self._checked_at = time.monotonic()

    def _files_stamp(self) -> tuple[tuple[int, int], ...]:
        stamps = []
        for path in (self.directory / "cluster.toml", self.directory / "broker" / "passwd"):
            try:
                info = path.stat()
                stamps.append((info.st_mtime_ns, info.st_size))
            except FileNotFoundError:
                stamps.append((0, 0))
        return tuple(stamps)

    def _load(self) -> Policy:
        policy = load_policy(self.directory)
        for name, reason in policy.rejected.items():
            log.warning("member %s of %s gets no broker access: %s", name, self.directory, reason)
        return policy

    def current(self, max_age: float = 0.0) -> Policy:
        """The policy, reloaded first if its files changed. A broken reload keeps the old policy.

        `max_age`: skip looking at the files if they were looked at that recently. Deliveries pass
        RELOAD_CHECK_SECONDS (two stat() calls per delivery were the broker's hot spot); logins pass 0,
        so a member added with `tomq device add` can connect at once.
        """
        now = time.monotonic()
        if now - self._checked_at < max_age:
            return self._policy
        self._checked_at = now
        stamp = self._files_stamp()
        if stamp != self._stamp:
            with self._lock:
                if stamp != self._stamp:
                    try:
                        self._policy = self._load()
                    except Exception:
                        # A half-written cluster.toml must not take the broker down or open it up.
                        log.exception("reloading the broker policy from %s failed; keeping the old one",
                                      self.directory)
                    self._stamp = stamp
        return self._policy


RELOAD_CHECK_SECONDS = 0.5  # how stale the policy may be after `tomq device add`
RECEIVE_CACHE_SECONDS = 1.0  # how long a delivery decision is reused (a certificate may expire meanwhile)
STOP_RETRY_SECONDS = 0.2  # how often a client's reader is cancelled again while its handler stops

_sources: dict[Path, PolicySource] = {}
_sources_lock = threading.Lock()


def policy_source(cluster_dir: str | os.PathLike[str]) -> PolicySource:
    """One PolicySource per cluster directory, shared by the plugin and TomqBroker."""
    key = Path(cluster_dir).resolve()
    with _sources_lock:
        if key not in _sources:
            _sources[key] = PolicySource(key)
        return _sources[key]


def _text(value: str | bytes | None) -> str | None:
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return None
    return value


class TomqAccessPlugin(BaseAuthPlugin, BaseTopicPlugin):
    """Authentication and topic ACL of DESIGN.md §2-3, decided by broker/policy.py."""

    @dataclass
    class Config:
        cluster_dir: str
        """The cluster directory made by `tomq init` (cluster.toml, members/, broker/passwd)."""

    def __init__(self, context: BaseContext) -> None:
        super().__init__(context)
        self.source = policy_source(self.config.cluster_dir)
        self.denials = Refusals("broker request", log,  # by member name: the one it logged in with
                                on_refuse=lambda member, reason: REFUSED.labels(member, reason).inc())

    async def authenticate(self, *, session: Session) -> bool | None:
        policy = self.source.current()
        username = _text(session.username)
        if not policy.may_connect(username, _text(session.password)):
            self.context.logger.info("refused CONNECT from %s as %r: bad credentials", session.client_id, username)
            return False
        # amqtt would publish the will without asking topic_filtering: check it now.
        if session.will_flag and not policy.may_publish(username, _text(session.will_topic) or ""):
            self.context.logger.info("refused CONNECT from %s as %r: may not publish its will to %r",
                                     session.client_id, username, session.will_topic)
            return False
        return True

    async def topic_filtering(
        self, *, session: Session | None = None, topic: str | None = None, action: Action | None = None
    ) -> bool | None:
        if session is None or topic is None:
            return False
        # Checked on every publish: the files are looked at no more than twice a second here (a new
        # member's login, in authenticate above, looks at once, so its first publish sees it).
        policy = self.source.current(RELOAD_CHECK_SECONDS)
        username = _text(session.username)
        match action:
            case Action.PUBLISH:
                allowed = policy.may_publish(username, topic)
            case Action.SUBSCRIBE:
                allowed = policy.may_subscribe(username, topic)
            case Action.RECEIVE:
                allowed = policy.may_receive(username, topic)
            case _:
                allowed = False  # an action this plugin does not know is not an action it allows
        if not allowed and action != Action.RECEIVE:
            # RECEIVE refusals are routine (a node's `tomq/c/#` sees nothing it cannot read, but a
            # session that was taken over would); publish and subscribe refusals are worth a line, and
            # a member hammering a forbidden topic gets a summary every 10 s, not a line per message.
            kind = "publish" if action == Action.PUBLISH else "subscribe"
            self.denials.refuse(username or "(anonymous)", f"{kind} not allowed", f"{kind} {topic[:200]!r}",
                                strike=False)
        return allowed


class _SnapshotDict(dict[str, Any]):
    """amqtt 0.12.1 iterates its subscription table while awaiting plugins (`_run_broadcast`, the
    retained replay on connect); another client's SUBSCRIBE in between changed the table mid-loop
    and "dictionary changed size during iteration" stopped all deliveries (seen with 5 nodes under
    load). Iterating a copy gives each pass one consistent table."""

    def __iter__(self) -> Iterator[str]:
        return iter(list(super().keys()))

    def items(self) -> list[tuple[str, Any]]:  # type: ignore[override]
        return list(super().items())


class TomqBroker(DirectBroadcast, Broker):
    """amqtt's Broker with the delivery and session paths that bypass the plugins closed.

    The overridden methods are private to amqtt 0.12.1; each override says what it changes.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._replays: set[asyncio.Future[Any]] = set()  # queued messages on their way: keep them alive
        table: dict[str, Any] = self._subscriptions
        self._subscriptions = _SnapshotDict(table)

    def _access(self) -> TomqAccessPlugin | None:
        plugin = self.plugins_manager.get_plugin("TomqAccessPlugin")
        return plugin if isinstance(plugin, TomqAccessPlugin) else None

    async def _topic_filtering(self, session: Session, topic: str, action: Action) -> bool:
        """Deliveries (one RECEIVE check per subscriber per message) are decided from the cached table
        below, not through amqtt's plugin round trip: that costs a task per plugin per delivery, and
        under a 5,000-record burst it (with a stat() of the policy files in each) was the broker's
        whole core; messages queued for seconds and Raft heartbeats with them. Publishes and
        subscribes still go through the plugin, which names and counts refusals, but are asked of it
        directly: it is the only topic plugin this broker is configured with (embedded.py), and
        amqtt's round trip schedules a task per plugin for every publish."""
        if action == Action.RECEIVE:
            return self._may_receive(session, topic)
        plugin = self._access()
        if plugin is None:
            return bool(await super()._topic_filtering(session, topic, action))
        return bool(await plugin.topic_filtering(session=session, topic=topic, action=action))

    def _may_receive(self, session: Session, topic: str) -> bool:
        plugin = self._access()
        if plugin is None:
            return False  # without tomq's plugin there is no policy, and nothing is delivered here
        policy = plugin.source.current(RELOAD_CHECK_SECONDS)
        now = time.monotonic()
        # Answers are kept for a second at most: besides the files changing, a member's rights end
        # when its certificate expires, which only asking the policy again notices.
        cache: tuple[Policy, float, dict[tuple[str | None, str], bool]] | None = getattr(self, "_receive_cache", None)
        if cache is None or cache[0] is not policy or now - cache[1] > RECEIVE_CACHE_SECONDS or len(cache[2]) > 50_000:
            cache = (policy, now, {})
            self._receive_cache = cache
        key = (_text(session.username), topic)
        allowed = cache[2].get(key)
        if allowed is None:
            allowed = cache[2][key] = policy.may_receive(key[0], topic)
        return allowed

    async def _initialize_client_session(
        self, reader: Any, writer: Any, remote_address: str, remote_port: int
    ) -> tuple[BrokerProtocolHandler, Session]:
        """amqtt 0.12.1's method with authentication moved before any existing session is touched."""
        try:
            handler, client_session = await BrokerProtocolHandler.init_from_connect(reader, writer, self.plugins_manager)
        except AMQTTError as exc:
            raise AMQTTError(exc) from exc
        except MQTTError as exc:
            await writer.close()
            raise MQTTError(exc) from exc
        except NoDataError as exc:
            raise AMQTTError(exc) from exc

        refusal = await self._refuse_before_session(client_session)
        if refusal is not None:
            connack = ConnackPacket.build(0, NOT_AUTHORIZED)
            await connack.to_stream(writer)
            await writer.close()
            raise AMQTTError(f"CONNECT from {remote_address}:{remote_port} refused: {refusal}")

        # From here on the same as amqtt 0.12.1's _initialize_client_session.
        if client_session.clean_session:
            if client_session.client_id is not None and client_session.client_id != "":
                await self._delete_session(client_session.client_id)
            else:
                client_session.client_id = gen_client_id()
            client_session.parent = 0
        elif client_session.client_id in self._sessions:
            existing, _ = self._sessions[client_session.client_id]
            existing.will_flag = client_session.will_flag
            existing.will_message = client_session.will_message
            existing.will_topic = client_session.will_topic
            existing.will_qos = client_session.will_qos
            existing.will_retain = client_session.will_retain  # amqtt 0.12.1 forgets this one
            existing.keep_alive = client_session.keep_alive
            existing.username = client_session.username
            existing.password = client_session.password
            client_session = existing
            client_session.parent = 1
        else:
            client_session.parent = 0

        timeout_disconnect_delay = self.config.get("timeout-disconnect-delay", 0)
        if client_session.keep_alive > 0 and isinstance(timeout_disconnect_delay, int):
            client_session.keep_alive += timeout_disconnect_delay
        return handler, client_session

    async def _stop_handler(self, handler: BrokerProtocolHandler) -> None:
        """Stop a client's handler, cancelling its reader until it has really ended.

        amqtt 0.12.1 cancels the reader task once and waits for it without a limit. The reader sits
        in asyncio.wait_for, which on Python 3.11 can swallow a cancellation that arrives as a packet
        has just been read (CPython gh-86296); the reader then reads on and the wait never ends. A
        broker stopped while 2,000 messages were in flight hung in shutdown for good.
        """
        stopping = asyncio.ensure_future(handler.stop())
        while not stopping.done():
            await asyncio.wait({stopping}, timeout=STOP_RETRY_SECONDS)
            reader = getattr(handler, "_reader_task", None)
            if not stopping.done() and reader is not None and not reader.done():
                reader.cancel()
        try:
            stopping.result()
        except asyncio.QueueEmpty:  # as amqtt: a failure to stop one handler must not stop the broker
            log.exception("failed to stop a client handler")

    async def _refuse_before_session(self, incoming: Session) -> str | None:
        if not await self._authenticate(incoming, None):
            return "not authenticated"
        held = self._sessions.get(incoming.client_id) if incoming.client_id else None
        if held is not None and _text(held[0].username) != _text(incoming.username):
            # A session of another member holds this client id: taking it over would disconnect
            # that member and hand its subscriptions and queued messages to this one.
            return f"client id {incoming.client_id!r} belongs to another member's session"
        return None

    async def _publish_session_retained_messages(self, session: Session) -> None:
        """Messages queued while the session was offline, each checked against the current reader."""
        handler = self._get_handler(session)
        if handler is None:
            return
        while not session.retained_messages.empty():
            message = await session.retained_messages.get()
            if self._may_receive(session, message.topic):
                # Sent in order but not awaited one by one: a QoS 1 reader may hold its PUBACK until
                # its work is done (a collector acknowledges an input once its record commits), and
                # waiting here, inside amqtt's CONNECT handling, timed out and dropped the reader every
                # few seconds, so a service that took over a session never caught up.
                replay = asyncio.ensure_future(
                    handler.mqtt_publish(message.topic, message.data, message.qos, retain=True))
                self._replays.add(replay)
                replay.add_done_callback(self._replay_done)

    def _replay_done(self, replay: asyncio.Future[Any]) -> None:
        self._replays.discard(replay)
        if not replay.cancelled() and replay.exception() is not None:
            log.warning("a queued message was not acknowledged: %s", replay.exception())

    async def _publish_retained_messages_for_subscription(
        self, subscription: tuple[str, int], session: Session
    ) -> None:
        """Retained messages for one of the session's OWN filters, each checked against its reader.

        amqtt also calls this on CONNECT with every filter any client holds; a filter the session
        does not hold is ignored here, which leaves only its own (resumed) subscriptions.
        """
        topic_filter, qos = subscription
        held = self._subscriptions.get(topic_filter, [])
        if not any(s.client_id == session.client_id for s, _ in held):
            return
        handler = self._get_handler(session)
        if handler is None:
            return
        for topic, retained in list(self._retained_messages.items()):
            if self._matches(topic, topic_filter) and self._may_receive(session, topic):
                await handler.mqtt_publish(
                    retained.topic, retained.data, min(qos, retained.qos or qos), retain=True
                )

"""Kafka plumbing shared by intake, workers and operators: explicit topic creation, producers,
and publishing that counts only what the broker acknowledged.

Topics are created explicitly (never auto-created, which would give them the broker's default
partition count). The idempotent producer is a setting: on for Apache Kafka, off for Tansu.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import struct
import weakref
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any

import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.client import AIOKafkaClient, ConnectionGroup
from aiokafka.errors import NodeNotReadyError, TopicAlreadyExistsError
from aiokafka.partitioner import DefaultPartitioner
from aiokafka.producer.message_accumulator import BatchBuilder
from aiokafka.protocol.produce import ProduceRequest
from aiokafka.record.util import calc_crc32c
from faststream.security import BaseSecurity, SASLPlaintext, SASLScram256, SASLScram512

from runtime.cpu import HEAVY_RECORDS, off_loop
from runtime.settings import KafkaSettings

log = structlog.get_logger("etrm.kafka")

# (topic, key, value, headers)
OutgoingRecord = tuple[str, bytes | None, bytes, Sequence[tuple[str, bytes | None]]]
# (topic, partition, one record batch as the broker takes it, how many records it holds)
BuiltBatch = tuple[str, int, bytes, int]


def client_options(settings: KafkaSettings) -> dict[str, Any]:
    """aiokafka's connection options for the configured security protocol (ETRM_KAFKA_*)."""
    options: dict[str, Any] = {"security_protocol": settings.kafka_security_protocol}
    if settings.kafka_uses_tls:
        options["ssl_context"] = tls_context(settings)
    if settings.kafka_security_protocol.startswith("SASL_"):
        password = settings.kafka_sasl_password
        options.update(
            sasl_mechanism=settings.kafka_sasl_mechanism,
            sasl_plain_username=settings.kafka_sasl_username,
            sasl_plain_password=password.get_secret_value() if password else None,
        )
    return options


def tls_context(settings: KafkaSettings) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=settings.kafka_ssl_cafile)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = settings.kafka_ssl_check_hostname
    if settings.kafka_ssl_certfile:
        context.load_cert_chain(settings.kafka_ssl_certfile, settings.kafka_ssl_keyfile)
    return context


def faststream_security(settings: KafkaSettings) -> BaseSecurity | None:
    """The same options in FastStream's terms (the worker's broker)."""
    protocol = settings.kafka_security_protocol
    if protocol == "PLAINTEXT":
        return None
    context = tls_context(settings) if settings.kafka_uses_tls else None
    if protocol == "SSL":
        return BaseSecurity(ssl_context=context, use_ssl=True)
    username = settings.kafka_sasl_username or ""
    password = (
        settings.kafka_sasl_password.get_secret_value() if settings.kafka_sasl_password else ""
    )
    use_ssl = protocol == "SASL_SSL"
    kind = {
        "PLAIN": SASLPlaintext,
        "SCRAM-SHA-256": SASLScram256,
        "SCRAM-SHA-512": SASLScram512,
    }[settings.kafka_sasl_mechanism]
    return kind(username, password, ssl_context=context, use_ssl=use_ssl)


class PublishFailed(Exception):
    """The broker did not acknowledge every record in time."""


async def ensure_topics(
    bootstrap: str,
    names: Iterable[str],
    partitions: int,
    timeout_s: float = 30.0,
    *,
    security: KafkaSettings | None = None,
) -> None:
    """Create the topics that do not exist yet. Bounded: a broker that takes the connection
    and never answers is a TimeoutError (the callers retry), never a start that hangs.
    `security`: connect as those settings say (ETRM_KAFKA_SECURITY_PROTOCOL and the rest)."""
    options = client_options(security) if security is not None else {}
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10_000, **options)
    try:
        async with asyncio.timeout(timeout_s):
            await admin.start()
            await _create_missing(admin, names, partitions)
    finally:
        await admin.close()


async def _create_missing(
    admin: AIOKafkaAdminClient, names: Iterable[str], partitions: int
) -> list[str]:
    existing = set(await admin.list_topics())
    missing = [n for n in names if n not in existing]
    if missing:
        with contextlib.suppress(TopicAlreadyExistsError):
            await admin.create_topics([NewTopic(n, partitions, 1) for n in missing])
    return missing


class LaneLog:
    """What the broker holds of the lanes against what the workers' group has settled: records
    on the lanes that the group has not committed past. Long-lived clients (they reconnect on
    their own, to a broker that restarted too); topics that went missing are created again,
    explicitly, as at start."""

    def __init__(self, settings: KafkaSettings, group_id: str, lanes: Sequence[str]) -> None:
        self._settings = settings
        self._group = group_id
        self._lanes = list(lanes)
        self._admin: AIOKafkaAdminClient | None = None
        self._offsets: AIOKafkaConsumer | None = None

    async def _clients(self) -> tuple[AIOKafkaAdminClient, AIOKafkaConsumer]:
        if self._admin is None or self._offsets is None:
            options = client_options(self._settings)
            bootstrap = self._settings.kafka_bootstrap_servers
            admin = AIOKafkaAdminClient(
                bootstrap_servers=bootstrap, request_timeout_ms=10_000, **options
            )
            # No group: it only reads where each partition ends, and never joins the workers'.
            offsets = AIOKafkaConsumer(
                bootstrap_servers=bootstrap,
                group_id=None,
                enable_auto_commit=False,
                request_timeout_ms=10_000,
                **options,
            )
            try:
                await admin.start()
                await offsets.start()
            except BaseException:
                await _close(admin, offsets)
                raise
            self._admin, self._offsets = admin, offsets
        return self._admin, self._offsets

    async def unsettled(self) -> dict[str, int]:
        """Records on each lane past the group's committed offsets (0 on every lane: all the
        broker holds has settled). A partition the group never committed counts from its
        start."""
        try:
            return await self._unsettled()
        except BaseException:
            await self.close()  # the next round starts from fresh connections
            raise

    async def _unsettled(self) -> dict[str, int]:
        admin, offsets = await self._clients()
        settings = self._settings
        missing = await _create_missing(admin, settings.all_topics, settings.kafka_partitions)
        if missing:
            log.warning("topics_missing_created_again", topics=missing)
        described = await admin.describe_topics(self._lanes)
        partitions = [
            TopicPartition(t["topic"], p["partition"])
            for t in described
            if not t["error_code"]
            for p in t["partitions"]
        ]
        if len({tp.topic for tp in partitions}) < len(self._lanes):
            raise LookupError("a lane has no partitions yet")
        ends = await offsets.end_offsets(partitions)
        committed = await admin.list_consumer_group_offsets(self._group, partitions=partitions)
        unsettled = dict.fromkeys(self._lanes, 0)
        for tp, end in ends.items():
            done = committed[tp].offset if tp in committed else 0
            unsettled[tp.topic] += max(0, end - max(0, done))
        return unsettled

    async def close(self) -> None:
        admin, offsets = self._admin, self._offsets
        self._admin = self._offsets = None
        await _close(admin, offsets)


async def _close(admin: AIOKafkaAdminClient | None, consumer: AIOKafkaConsumer | None) -> None:
    if consumer is not None:
        with contextlib.suppress(Exception):
            await consumer.stop()
    if admin is not None:
        with contextlib.suppress(Exception):
            await admin.close()


class TopicsHeld:
    """Produce requests go only over connections on which the broker was seen to hold their
    topics. Tansu 0.6 acknowledges a produce to a topic it does not have: after a restart its
    memory storage is empty while a producer's cached metadata still names the lanes, and the
    producer sends (or re-sends a batch it had in flight) at once. Those records cannot be
    fetched, and when the topic is created afterwards its offsets start again under them: later
    produces to that partition fail, and consumers fetching there get nothing, for good.

    So every produce request the producer's client sends over a connection opened since the
    broker was last seen to hold its topics first waits for the broker's topic list (a metadata
    request, which creates nothing) and for missing topics to be created explicitly, as at
    start. Installed on the client's `send`, which the producer's sender uses for every produce
    request, retries included; on a connection already checked it costs a set lookup."""

    def __init__(self, client: AIOKafkaClient, settings: KafkaSettings) -> None:
        self._client = client
        self._settings = settings
        self._send = client.send
        self._held: set[str] = set()
        self._over: weakref.WeakSet[Any] = weakref.WeakSet()  # aiokafka connections checked
        self._lock = asyncio.Lock()
        client.send = self.send

    async def send(
        self, node_id: Any, request: Any, *, group: ConnectionGroup = ConnectionGroup.DEFAULT
    ) -> Any:
        if isinstance(request, ProduceRequest):
            # The request's topics (aiokafka keeps them private); every topic this process
            # publishes to, should that ever change.
            named = getattr(request, "_topics", None)
            topics = {t for t, _ in named} if named else set(self._settings.all_topics)
            if not self._checked(node_id, group, topics):
                try:
                    await self._check(node_id, group, topics)
                except Exception as exc:  # retriable: the sender sends the batch again later
                    raise NodeNotReadyError(f"topics not confirmed: {type(exc).__name__}") from exc
        return await self._send(node_id, request, group=group)

    def _checked(self, node_id: Any, group: ConnectionGroup, topics: set[str]) -> bool:
        conn = self._client._conns.get((node_id, group))
        return conn is not None and conn.connected() and conn in self._over and topics <= self._held

    async def _check(self, node_id: Any, group: ConnectionGroup, topics: set[str]) -> None:
        async with self._lock, asyncio.timeout(self._settings.kafka_publish_timeout_s):
            if self._checked(node_id, group, topics):
                return
            if not await self._client.ready(node_id, group=group):
                raise NodeNotReadyError(f"node {node_id} not ready")
            conn = self._client._conns[(node_id, group)]
            if conn not in self._over:  # a new connection: what was seen before may be gone
                self._held = set()  # (connections to other brokers stay checked)
            while missing := topics - self._held:
                present = (await self._client.fetch_all_metadata()).topics()
                self._held |= topics & present
                if missing - present:
                    log.warning("topics_missing_created_again", topics=sorted(missing - present))
                    await ensure_topics(
                        self._settings.kafka_bootstrap_servers,
                        sorted(missing - present),
                        self._settings.kafka_partitions,
                        security=self._settings,
                    )
                    await asyncio.sleep(0.05)  # until the broker's metadata lists them
            if conn.connected():
                self._over.add(conn)


# Record batches of at most this size (a record larger than it goes in a batch of its own).
# The producer sends one batch per partition per request and encodes each request on the event
# loop: a 5,000-record acceptance in 1 MB batches made one ~3 MB request, ~7 ms of copying on
# the loop while other desks' requests waited; in 128 KB batches it goes as several requests
# of at most ~0.5 MB each (~1 ms each), one after the other.
MAX_BATCH_BYTES = 128 * 1024


def make_producer(settings: KafkaSettings, **overrides: object) -> AIOKafkaProducer:
    options: dict[str, object] = {
        "bootstrap_servers": settings.kafka_bootstrap_servers,
        "acks": "all",
        "enable_idempotence": settings.kafka_enable_idempotence,
        "linger_ms": 0,
        "max_batch_size": MAX_BATCH_BYTES,
        "max_request_size": 4 * 1024 * 1024,
        "request_timeout_ms": max(1000, int(settings.kafka_publish_timeout_s * 1000)),
        **client_options(settings),
    }
    options.update(overrides)
    return AIOKafkaProducer(**options)


class KafkaPublisher:
    """One producer per process, started on first use (the broker may come later)."""

    def __init__(self, settings: KafkaSettings) -> None:
        self._settings = settings
        self.timeout_s = settings.kafka_publish_timeout_s
        self._producer: AIOKafkaProducer | None = None
        self._lock = asyncio.Lock()

    async def _ready(self) -> AIOKafkaProducer:
        if self._producer is not None:
            return self._producer
        async with self._lock:
            if self._producer is None:
                producer = make_producer(self._settings)
                TopicsHeld(producer.client, self._settings)
                try:
                    await producer.start()
                except Exception:
                    with contextlib.suppress(Exception):
                        await producer.stop()
                    raise
                self._producer = producer
            return self._producer

    async def start(self) -> None:
        with contextlib.suppress(Exception):  # the broker may come later; /readyz tells
            async with asyncio.timeout(self.timeout_s):
                await self._ready()

    async def stop(self) -> None:
        if self._producer is not None:
            with contextlib.suppress(Exception):
                await self._producer.stop()
            self._producer = None

    async def ping(self) -> None:
        async with asyncio.timeout(2.0):
            producer = await self._ready()
        async with asyncio.timeout(2.0):
            await producer.client.fetch_all_metadata()

    async def partitions(self, topics: Iterable[str]) -> dict[str, list[int]]:
        """Each topic's partitions, as the producer's own partitioner sees them."""
        producer = await self._ready()
        return {t: list(await producer.partitions_for(t)) for t in topics}

    async def send_all(self, records: Sequence[OutgoingRecord], *, what: str = "") -> None:
        """Send every record and wait until the broker acknowledged all of them (acks=all);
        PublishFailed when that does not happen within the publish timeout."""
        if not records:
            return

        async def send(producer: AIOKafkaProducer) -> list[asyncio.Future[Any]]:
            if len(records) > HEAVY_RECORDS and all(r[1] is not None for r in records):
                # A big request's records as a few record batches built off the event loop:
                # the encoding and the CRCs are CPU the loop would otherwise spend in 5,000
                # `send` calls while other desks wait.
                partitions = await self.partitions({r[0] for r in records})
                built = await off_loop(True, lambda: build_batches(records, partitions))
                return await _send_built(producer, built)
            # The producer batches records per partition; one awaited ack per batch.
            return [
                await producer.send(topic, value=value, key=key, headers=list(headers))
                for topic, key, value, headers in records
            ]

        await self._acknowledged(send, len(records), what)

    async def send_built(self, batches: Sequence[BuiltBatch], *, what: str = "") -> None:
        """Send record batches built elsewhere (`build_batches`, in a worker process for a big
        request) and wait until the broker acknowledged all of them, as `send_all` does."""
        if batches:
            await self._acknowledged(
                lambda producer: _send_built(producer, batches), sum(b[3] for b in batches), what
            )

    async def _acknowledged(
        self,
        send: Callable[[AIOKafkaProducer], Awaitable[list[asyncio.Future[Any]]]],
        records: int,
        what: str,
    ) -> None:
        try:
            async with asyncio.timeout(self.timeout_s):
                acks = await send(await self._ready())
                if len(acks) == 1:  # a single record: no gathering future for one ack
                    await acks[0]
                else:
                    await asyncio.gather(*acks)
        except Exception as exc:
            log.warning("publish_failed", error=type(exc).__name__, records=records, what=what)
            raise PublishFailed(type(exc).__name__) from None


# -- record batches built away from the producer -----------------------------------------------


def build_batches(
    records: Sequence[OutgoingRecord], partitions: Mapping[str, Sequence[int]]
) -> list[BuiltBatch]:
    """Records (each with a key) laid into record batches of at most MAX_BATCH_BYTES, without a
    producer: the partition of each is the producer's own partitioner over the same partition
    list (`KafkaPublisher.partitions`), so a contract lands where a single send would put it;
    records keep their order within each partition, and so do the batches of a partition in the
    list. A plain function of picklable values: a worker process can do it."""
    choose = DefaultPartitioner()
    open_batches: dict[tuple[str, int], BatchBuilder] = {}
    built: list[BuiltBatch] = []

    def close(tp: tuple[str, int], builder: BatchBuilder) -> None:
        built.append((tp[0], tp[1], bytes(builder._build()), builder.record_count()))

    for topic, key, value, headers in records:
        tp = (topic, choose(key, partitions[topic], partitions[topic]))
        fields = {"timestamp": None, "key": key, "value": value, "headers": list(headers)}
        builder = open_batches.get(tp)
        if builder is None or builder.append(**fields) is None:
            if builder is not None:
                close(tp, builder)
            builder = open_batches[tp] = BatchBuilder(MAX_BATCH_BYTES, NO_COMPRESSION)
            if builder.append(**fields) is None:
                raise PublishFailed("a record larger than a record batch")
    for tp, builder in open_batches.items():
        close(tp, builder)
    return built


NO_COMPRESSION = 0  # the producer's default (make_producer sets no compression_type)
# Where a v2 record batch keeps its producer id, epoch and base sequence, and its CRC-32C (over
# everything from the attributes on): aiokafka's DefaultRecordBatch layout.
# (baseOffset, length, partitionLeaderEpoch, magic, crc, attributes, lastOffsetDelta,
# firstTimestamp, maxTimestamp, then producerId, producerEpoch, baseSequence)
_CRC_OFFSET = struct.calcsize(">qiib")
_ATTRIBUTES_OFFSET = struct.calcsize(">qiibI")
_PRODUCER_STATE_OFFSET = struct.calcsize(">qiibIhiqq")


class _Built:
    """A record batch built by `build_batches`, in the shape the producer's accumulator takes
    a BatchBuilder (`send_batch`): closed, and stamped with the producer id, epoch and sequence
    when the producer is idempotent, as aiokafka stamps the batches it builds itself."""

    def __init__(self, buffer: bytes, count: int) -> None:
        self._buffer: bytes | bytearray = buffer  # sent as it is unless it must be stamped
        self._count = count

    def append(self, **_: object) -> object | None:
        return None  # closed: the producer's own sends go into a batch of their own

    def close(self) -> None:
        return None

    def closed(self) -> bool:
        return True

    def size(self) -> int:
        return len(self._buffer)

    def record_count(self) -> int:
        return self._count

    def _build(self) -> bytes | bytearray:
        return self._buffer

    def _set_producer_state(
        self, producer_id: int, producer_epoch: int, base_sequence: int
    ) -> None:
        stamped = bytearray(self._buffer)
        struct.pack_into(
            ">qhi", stamped, _PRODUCER_STATE_OFFSET, producer_id, producer_epoch, base_sequence
        )
        struct.pack_into(">I", stamped, _CRC_OFFSET, calc_crc32c(stamped[_ATTRIBUTES_OFFSET:]))
        self._buffer = stamped


async def _send_built(
    producer: AIOKafkaProducer, batches: Sequence[BuiltBatch]
) -> list[asyncio.Future[Any]]:
    by_partition: dict[tuple[str, int], list[_Built]] = {}
    for topic, partition, buffer, count in batches:
        by_partition.setdefault((topic, partition), []).append(_Built(buffer, count))

    async def in_order(tp: tuple[str, int], built: list[_Built]) -> list[Any]:
        return [await producer.send_batch(b, tp[0], partition=tp[1]) for b in built]

    sent = await asyncio.gather(*(in_order(tp, b) for tp, b in by_partition.items()))
    return [future for futures in sent for future in futures]

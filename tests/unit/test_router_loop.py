"""RouterLoop without a broker: what goes into a transaction, what an abort rewinds, what
stops the process. Fake clients record the calls the loop makes."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException, Message, TopicPartition

from pipeline.router.handler import Output
from pipeline.router.handling import HoldingRouter
from pipeline.router.loop import RouterLoop, transactional_id
from pipeline.serialization import RegistryUnavailableError
from pipeline.settings import HeraldSettings


class FakeProducer:
    def __init__(self, commit_error: KafkaError | None = None) -> None:
        self.calls: list[str] = []
        self.produced: list[tuple[str, bytes | None]] = []
        self.offsets: list[tuple[list[TopicPartition], Any]] = []
        self.commit_error = commit_error
        self.refuse: KafkaError | None = None  # a delivery report with this error
        self._reports: list[Any] = []

    def begin_transaction(self) -> None:
        self.calls.append("begin")

    def produce(self, topic: str, value: bytes | None, key: bytes | None, **kw: Any) -> None:
        self.produced.append((topic, value))
        self._reports.append(kw["on_delivery"])

    def poll(self, timeout: float) -> int:
        self._serve()
        return 0

    def flush(self, timeout: float) -> int:
        self._serve()
        return 0

    def _serve(self) -> None:
        reports, self._reports = self._reports, []
        for report in reports:
            report(self.refuse, Message(topic="out", partition=0, offset=0))

    def send_offsets_to_transaction(self, offsets: list[TopicPartition], meta: Any, t: float):
        self.calls.append("send_offsets")
        self.offsets.append((offsets, meta))

    def commit_transaction(self, timeout: float) -> None:
        self._serve()
        self.calls.append("commit")
        if self.commit_error is not None:
            raise KafkaException(self.commit_error)

    def abort_transaction(self, timeout: float) -> None:
        self.calls.append("abort")


class FakeConsumer:
    def __init__(self, batches: list[list[Message]], assigned: list[tuple[str, int]]) -> None:
        self.batches = batches
        self.assigned = assigned
        self.seeks: list[tuple[str, int, int]] = []
        self.commits: list[list[TopicPartition]] = []
        self.closed = False

    def poll(self, timeout: float) -> Message | None:
        return self.batches.pop(0)[0] if self.batches else None

    def consume(self, n: int, timeout: float) -> list[Message]:
        return []

    def consumer_group_metadata(self) -> str:
        return "group-metadata"

    def assignment(self) -> list[TopicPartition]:
        return [TopicPartition(t, p) for t, p in self.assigned]

    def seek(self, tp: TopicPartition) -> None:
        self.seeks.append((tp.topic, tp.partition, tp.offset))

    def commit(self, offsets: list[TopicPartition], asynchronous: bool) -> None:
        self.commits.append(offsets)

    def close(self) -> None:
        self.closed = True


class FakeHandler:
    """Two intents per record; the registry can be made unavailable."""

    def __init__(self) -> None:
        self.registry_down = False

    def handle(self, **record: Any) -> list[Output]:
        if self.registry_down:
            raise RegistryUnavailableError("decoding", ConnectionRefusedError())
        value = f"{record['partition']}@{record['offset']}".encode()
        return [Output("intents", b"k", value, []), Output("intents", b"k", value + b"!", [])]


def msg(partition: int, offset: int) -> Message:
    return Message(topic="events.user", partition=partition, offset=offset, key=b"k", value=b"")


BATCH = [msg(0, 10), msg(1, 4), msg(0, 11), msg(0, 12)]


def make_loop(
    tmp_path: Path, guarantee: str = "exactly_once", **producer: Any
) -> tuple[RouterLoop, FakeConsumer, FakeProducer, list[tuple[BaseException, str]]]:
    settings = HeraldSettings(processing_guarantee=guarantee, router_data_dir=tmp_path)
    failures: list[tuple[BaseException, str]] = []
    loop = RouterLoop(
        settings,
        HoldingRouter(FakeHandler(), backoff_s=0.01),  # type: ignore[arg-type]
        on_unexpected=lambda e, where: failures.append((e, where)),
    )
    consumer = FakeConsumer([], [("events.user", 0), ("events.user", 1)])
    fake = FakeProducer(**producer)
    loop._consumer, loop._producer = consumer, fake  # type: ignore[assignment]
    return loop, consumer, fake, failures


def offsets(tps: list[TopicPartition]) -> set[tuple[str, int, int]]:
    return {(tp.topic, tp.partition, tp.offset) for tp in tps}


def test_transactional_id_is_kept_in_the_data_dir(tmp_path: Path) -> None:
    one = HeraldSettings(router_app_id="r", router_data_dir=tmp_path / "a")
    other = HeraldSettings(router_app_id="r", router_data_dir=tmp_path / "b")
    first = transactional_id(one)
    assert first.startswith("r-")
    assert transactional_id(one) == first  # a restart replaces (fences) its predecessor
    assert transactional_id(other) != first  # another router does not


async def test_a_batch_and_its_next_offsets_commit_in_one_transaction(tmp_path: Path) -> None:
    loop, consumer, producer, _ = make_loop(tmp_path)
    outputs = await loop._route(BATCH)
    loop._commit(BATCH, outputs)

    assert producer.calls == ["begin", "send_offsets", "commit"]
    assert len(producer.produced) == 2 * len(BATCH)
    [(sent, meta)] = producer.offsets
    assert offsets(sent) == {("events.user", 0, 13), ("events.user", 1, 5)}
    assert meta == "group-metadata"  # fences a router that lost the partitions (KIP-447)
    assert consumer.commits == []  # offsets go with the transaction only
    assert (loop.stats.events, loop.stats.outputs, loop.stats.aborted) == (4, 8, 0)


async def test_an_abortable_commit_aborts_and_reads_the_batch_again(tmp_path: Path) -> None:
    fenced = KafkaError(
        KafkaError.ILLEGAL_GENERATION, "generation moved on", txn_requires_abort=True
    )
    loop, consumer, producer, _ = make_loop(tmp_path, commit_error=fenced)
    consumer.assigned = [("events.user", 0)]  # partition 1 went to another router
    loop._commit(BATCH, await loop._route(BATCH))

    assert producer.calls == ["begin", "send_offsets", "commit", "abort"]
    assert consumer.seeks == [("events.user", 0, 10)]  # the batch's first offset
    assert (loop.stats.events, loop.stats.aborted) == (0, 1)


async def test_a_refused_output_is_not_retried_but_stops_the_router(tmp_path: Path) -> None:
    refused = KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED, "denied")
    abortable = KafkaError(KafkaError._STATE, "a delivery failed", txn_requires_abort=True)
    loop, consumer, producer, _ = make_loop(tmp_path, commit_error=abortable)
    producer.refuse = refused
    with pytest.raises(KafkaException) as raised:
        loop._commit(BATCH, await loop._route(BATCH))
    assert raised.value.args[0].code() == KafkaError.TOPIC_AUTHORIZATION_FAILED
    assert consumer.seeks == []


async def test_at_least_once_commits_offsets_after_the_outputs_are_acknowledged(
    tmp_path: Path,
) -> None:
    loop, consumer, producer, _ = make_loop(tmp_path, "at_least_once")
    loop._commit(BATCH, await loop._route(BATCH))

    assert "begin" not in producer.calls
    assert len(producer.produced) == 8
    [committed] = consumer.commits
    assert offsets(committed) == {("events.user", 0, 13), ("events.user", 1, 5)}


class StartedLoop(RouterLoop):
    """RouterLoop.run() with the fakes in place of real clients."""

    fakes: tuple[FakeConsumer, FakeProducer]

    def _start(self) -> None:
        self._consumer, self._producer = self.fakes  # type: ignore[assignment]


async def test_stop_during_a_hold_leaves_without_producing_or_committing(
    tmp_path: Path,
) -> None:
    handler = FakeHandler()
    handler.registry_down = True
    failures: list[tuple[BaseException, str]] = []
    loop = StartedLoop(
        HeraldSettings(router_data_dir=tmp_path),
        HoldingRouter(handler, backoff_s=0.01, max_backoff_s=0.05),  # type: ignore[arg-type]
        on_unexpected=lambda e, where: failures.append((e, where)),
    )
    consumer = FakeConsumer([BATCH], [("events.user", 0), ("events.user", 1)])
    producer = FakeProducer()
    loop.fakes = (consumer, producer)
    run = asyncio.ensure_future(loop.run())
    while loop.router.held_since is None:
        assert not run.done(), failures
        await asyncio.sleep(0.01)
    loop.stop()
    await asyncio.wait_for(run, 5)

    assert failures == []
    assert producer.calls == [] and producer.produced == []
    assert consumer.closed


async def test_an_unexpected_failure_aborts_the_open_transaction_and_stops(
    tmp_path: Path,
) -> None:
    class Broken(FakeProducer):
        def produce(self, *args: Any, **kw: Any) -> None:
            raise KafkaException(KafkaError(KafkaError._UNKNOWN_TOPIC, "no such topic"))

    failures: list[tuple[BaseException, str]] = []
    loop = StartedLoop(
        HeraldSettings(router_data_dir=tmp_path),
        HoldingRouter(FakeHandler()),  # type: ignore[arg-type]
        on_unexpected=lambda e, where: failures.append((e, where)),
    )
    producer = Broken()
    loop.fakes = (FakeConsumer([BATCH], [("events.user", 0)]), producer)
    with pytest.raises(KafkaException):
        await asyncio.wait_for(loop.run(), 5)

    assert producer.calls == ["begin", "abort"]
    [(error, where)] = failures
    assert isinstance(error, KafkaException)
    assert where == "events.user[0]@10..10"

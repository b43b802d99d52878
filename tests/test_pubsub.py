"""The Pub/Sub intake against the real Pub/Sub emulator, real workers and real databases.

The emulator ships with the Google Cloud CLI; the tests start it themselves (one per
session) and skip without it, except in CI, where its absence fails them.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from conftest import IN_CI, Env, wait_until
from spotrun import chaos
from spotrun.chaos.processes import free_port
from spotrun.intake import events as bus_events
from spotrun.jobs import JobState
from spotrun.store import JobStore

try:
    from google.cloud import pubsub_v1
except ImportError:  # the test extra installs it; CI must not skip silently
    if IN_CI:
        raise
    pytest.skip("google-cloud-pubsub is not installed (pip install -e '.[test]')",
                allow_module_level=True)

SLEEP_FAST = {"pipeline": "sleep", "params": {"seconds": 0, "steps": 1}}


# ------------------------------------------------------------------ emulator


def _emulator_launcher() -> Path | None:
    gcloud = shutil.which("gcloud")
    if gcloud is None:
        return None
    try:
        root = subprocess.run([gcloud, "info", "--format=value(installation.sdk_root)"],
                              capture_output=True, text=True, timeout=60).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return None
    launcher = Path(root) / "platform" / "pubsub-emulator" / "bin" / "cloud-pubsub-emulator"
    return launcher if root and os.access(launcher, os.X_OK) else None


@pytest.fixture(scope="session")
def emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """host:port of a Pub/Sub emulator started for this session."""
    launcher = _emulator_launcher()
    if launcher is None:
        msg = ("the Pub/Sub emulator is not installed (gcloud components install "
               "pubsub-emulator, or the google-cloud-cli-pubsub-emulator package)")
        if IN_CI:
            pytest.fail(msg)
        pytest.skip(msg)
    log_path = tmp_path_factory.mktemp("pubsub") / "emulator.log"
    for _ in range(3):  # a port found free can be taken before the emulator binds it
        port = free_port()
        with open(log_path, "w") as log:
            proc = subprocess.Popen([str(launcher), "--host=127.0.0.1", f"--port={port}"],
                                    stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        give_up = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < give_up:
            if "Server started" in log_path.read_text(errors="replace"):
                break
            time.sleep(0.2)
        if proc.poll() is None and "Server started" in log_path.read_text(errors="replace"):
            break
        _stop(proc)
    else:
        pytest.fail(f"the Pub/Sub emulator did not start:\n{log_path.read_text()[-2000:]}")
    try:
        yield f"127.0.0.1:{port}"
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


# ------------------------------------------------------------ a stream's end

_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_H2_DATA, _H2_HEADERS, _H2_RST_STREAM, _H2_END_STREAM = 0x0, 0x1, 0x3, 0x1


def _read_exactly(sock: socket.socket, n: int) -> bytes | None:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf


def _h2_frames(sock: socket.socket) -> Iterator[tuple[bytes, int, int, int]]:
    """Each HTTP/2 frame read from ``sock``: its bytes, type, flags and stream id."""
    while (head := _read_exactly(sock, 9)) is not None:
        length = int.from_bytes(head[:3], "big")
        payload = _read_exactly(sock, length) if length else b""
        if payload is None:
            return
        yield head + payload, head[3], head[4], struct.unpack(">I", head[5:])[0] & 0x7FFFFFFF


@dataclass
class _H2Streams:
    cond: threading.Condition = field(default_factory=threading.Condition)
    open: set[int] = field(default_factory=set)  # the client has not half-closed them
    ending: set[int] = field(default_factory=set)  # cancelled; the emulator not yet done
    ended: set[int] = field(default_factory=set)  # the emulator has ended them


class StreamEndingProxy:
    """A TCP proxy between an intake and the emulator through which a cancelled stream
    ends in the emulator, as it does in Pub/Sub.

    The emulator (0.8.20) fails on the RST_STREAM that cancels a call (``NoSuchMethodError``
    in ``onRstStreamRead``, in its log), so a streaming pull that a stopped intake
    cancelled goes on taking the subscription's messages every 50 ms, each for the
    stream's ack deadline, until the call's 1800 s deadline: a later intake gets a message
    only once it wins the race for it, 20 s after each loss. The proxy sends the emulator
    a half-close instead (which ends its pull), and holds the client's next calls and
    messages (the nacks of what was in hand) until the emulator has ended that stream.
    """

    def __init__(self, upstream: str, hold_seconds: float = 10.0) -> None:
        host, port = upstream.rsplit(":", 1)
        self._upstream = (host, int(port))
        self._hold = hold_seconds
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.host = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._sockets = [self._listener]
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(self._upstream)
            self._sockets += [client, server]
            streams = _H2Streams()
            for pump in (self._to_emulator, self._to_client):
                threading.Thread(target=pump, args=(client, server, streams),
                                 daemon=True).start()

    def _to_emulator(self, client: socket.socket, server: socket.socket,
                     streams: _H2Streams) -> None:
        try:
            if _read_exactly(client, len(_H2_PREFACE)) != _H2_PREFACE:
                return
            server.sendall(_H2_PREFACE)
            for frame, kind, flags, sid in _h2_frames(client):
                with streams.cond:
                    if kind in (_H2_HEADERS, _H2_DATA):
                        streams.cond.wait_for(lambda: not streams.ending, self._hold)
                        if kind == _H2_HEADERS and not flags & _H2_END_STREAM:
                            streams.open.add(sid)
                        elif flags & _H2_END_STREAM:
                            streams.open.discard(sid)
                    elif kind == _H2_RST_STREAM and sid in streams.open - streams.ended:
                        streams.open.discard(sid)
                        streams.ending.add(sid)
                        # An empty DATA frame that ends the stream from the client's side.
                        frame = bytes([0, 0, 0, _H2_DATA, _H2_END_STREAM]) + struct.pack(
                            ">I", sid)
                server.sendall(frame)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                server.shutdown(socket.SHUT_WR)

    def _to_client(self, client: socket.socket, server: socket.socket,
                   streams: _H2Streams) -> None:
        try:
            for frame, kind, flags, sid in _h2_frames(server):
                if sid and (kind == _H2_RST_STREAM or (
                        kind in (_H2_HEADERS, _H2_DATA) and flags & _H2_END_STREAM)):
                    with streams.cond:
                        streams.ended.add(sid)
                        streams.ending.discard(sid)
                        streams.cond.notify_all()
                client.sendall(frame)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                client.shutdown(socket.SHUT_WR)


# ----------------------------------------------------------------------- bus


@dataclass
class Received:
    """A message pulled from a topic's watch subscription."""

    message_id: str
    ordering_key: str
    attributes: dict[str, str]
    body: Any


@dataclass
class Bus:
    """Topics and subscriptions of one test, in a project of its own on the emulator."""

    host: str
    project: str
    publisher: Any = None
    subscriber: Any = None
    received: dict[str, list[Received]] = field(default_factory=dict)

    def path(self, kind: str, name: str) -> str:
        return f"projects/{self.project}/{kind}/{name}"

    def create(self) -> None:
        self.publisher = pubsub_v1.PublisherClient()
        self.subscriber = pubsub_v1.SubscriberClient()
        for topic in ("requests", "events", "dead-letter"):
            self.publisher.create_topic(name=self.path("topics", topic))
        self.subscriber.create_subscription(request={
            "name": self.path("subscriptions", "intake"),
            "topic": self.path("topics", "requests"), "ack_deadline_seconds": 10,
            "dead_letter_policy": {"dead_letter_topic": self.path("topics", "dead-letter"),
                                   "max_delivery_attempts": 20}})
        for watch, topic in (("events-watch", "events"), ("dead-letter-watch", "dead-letter")):
            self.subscriber.create_subscription(request={
                "name": self.path("subscriptions", watch), "topic": self.path("topics", topic),
                "enable_message_ordering": True})
            self.received[watch] = []

    def publish(self, data: bytes | dict[str, Any], **attributes: str) -> str:
        raw = data if isinstance(data, bytes) else json.dumps(data).encode()
        fut = self.publisher.publish(self.path("topics", "requests"), raw, **attributes)
        return str(fut.result(timeout=60))

    def pull(self, subscription: str, *, ack: bool = True, max_messages: int = 500
             ) -> list[Received]:
        """One synchronous pull (acked unless told otherwise)."""
        path = self.path("subscriptions", subscription)
        try:
            answer = self.subscriber.pull(
                request={"subscription": path, "max_messages": max_messages}, timeout=10)
        except Exception as exc:  # the emulator answers an empty pull with DEADLINE_EXCEEDED
            if "Deadline" in type(exc).__name__ or "504" in str(exc):
                return []
            raise
        got = [Received(m.message.message_id, m.message.ordering_key,
                        dict(m.message.attributes), _json_or_bytes(m.message.data))
               for m in answer.received_messages]
        if ack and answer.received_messages:
            self.subscriber.acknowledge(request={
                "subscription": path, "ack_ids": [m.ack_id for m in answer.received_messages]})
        return got

    def collect(self, watch: str) -> list[Received]:
        """Everything the watch subscription received so far, in arrival order."""
        while True:
            got = self.pull(watch)
            self.received[watch].extend(got)
            if not got:
                return self.received[watch]

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.publisher.stop()
        with contextlib.suppress(Exception):
            self.subscriber.close()


def _json_or_bytes(data: bytes) -> Any:
    try:
        return json.loads(data)
    except ValueError:
        return data


@pytest.fixture
def bus(emulator: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Bus]:
    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", emulator)
    b = Bus(emulator, f"spotrun-{uuid.uuid4().hex[:10]}")
    b.create()
    try:
        yield b
    finally:
        b.close()


# -------------------------------------------------------------------- intake


class IntakeProc:
    """A real ``spotrun intake pubsub`` process, its log in a file."""

    def __init__(self, env: Env, bus: Bus, *args: str, command: tuple[str, ...] = (),
                 host: str | None = None) -> None:
        self.log_path = env.home / f"intake-{uuid.uuid4().hex[:6]}.log"
        cmd = [sys.executable, "-m", "spotrun", *(command or (
            "intake", "pubsub", "--project", bus.project, "--subscription", "intake",
            "--events-topic", "events", *args))]
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in wait()/kill()
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**env.vars,
                                          "PUBSUB_EMULATOR_HOST": host or bus.host})

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, what: str = "intake ready") -> None:
        wait_until(lambda: what in self.log() or self.proc.poll() is not None, 120,
                   "the intake to start", on_fail=self.log)
        assert self.proc.poll() is None, self.log()

    def terminate(self) -> int:
        """SIGTERM, as Kubernetes stops a pod; the exit status."""
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(60)
        self._log.close()
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()


@pytest.fixture
def intakes() -> Iterator[list[IntakeProc]]:
    made: list[IntakeProc] = []
    yield made
    for p in made:
        p.kill()


def _request(i: int) -> dict[str, Any]:
    # Each request's seconds tell its job apart from every other's.
    return {"pipeline": "sleep", "params": {"seconds": round(i * 1e-4, 4), "steps": 1}}


def _request_of(params: dict[str, Any]) -> int:
    return round(float(params["seconds"]) / 1e-4)


def _jobs_by_request(store: JobStore) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for job in store.list_jobs(newest_first=False):
        out.setdefault(_request_of(job.params), []).append(job.id)
    return out


def _missing(store: JobStore, n: int) -> str:
    by_request = _jobs_by_request(store)
    return (f"{store.analytics.count_by_state()}; requests without a job: "
            f"{sorted(set(range(n)) - set(by_request))}\n")


def _all_succeeded(store: JobStore, n: int) -> bool:
    return store.analytics.count_by_state()[JobState.SUCCEEDED.value] >= n


def _check_events_on_topic(bus: Bus, store: JobStore, job_ids: list[str]
                           ) -> dict[str, list[Received]]:
    """Every event of every job reached the events topic, in order per job, with the job
    id as ordering key and the request's message id as attribute. Returns each job's
    events as first received (at least once: a repeat is a later copy of an event)."""
    def complete() -> bool:
        seen = {r.attributes.get("event_id") for r in bus.collect("events-watch")}
        return all(str(i) in seen for i in _store_event_ids(store, job_ids))

    wait_until(complete, 120, "every job's events on the events topic", interval=0.5)
    by_job: dict[str, list[Received]] = {}
    for r in bus.received["events-watch"]:
        if r.attributes.get("kind") != bus_events.REJECTED:
            by_job.setdefault(r.attributes["job_id"], []).append(r)
    out: dict[str, list[Received]] = {}
    for job_id in job_ids:
        firsts: list[Received] = []
        seen: set[str] = set()
        for r in by_job[job_id]:
            if r.attributes["event_id"] not in seen:
                seen.add(r.attributes["event_id"])
                firsts.append(r)
        ids = [int(r.attributes["event_id"]) for r in firsts]
        assert ids == sorted(ids), f"job {job_id}: events out of order: {ids}"
        job = store.get(job_id)
        assert [r.body["kind"] for r in firsts] == [bus_events.bus_kind(e.kind)
                                                   for e in job.events], job_id
        request = store.intake.request(job_id)
        assert request is not None
        for r in firsts:
            assert r.ordering_key == job_id
            assert r.attributes["message_id"] == request[1]
            assert r.attributes.get("idempotency_key") == request[2]
        if job.state is JobState.SUCCEEDED:
            assert firsts[-1].body["result"] == job.result
        out[job_id] = firsts
    return out


def _running_past(store: JobStore, job_id: str, step: int) -> bool:
    job = store.get(job_id, with_events=False)
    return job.state is JobState.RUNNING and job.progress.step >= step


def _store_event_ids(store: JobStore, job_ids: list[str]) -> list[int]:
    wanted = set(job_ids)
    return [eid for eid, job_id, _kind, _url in store.events_after(0, limit=100_000)
            if job_id in wanted]


# ------------------------------------------------------------------- the tests


@pytest.mark.slow
def test_a_burst_with_duplicates_and_invalid_messages_queues_each_request_once(
        bus: Bus, pg_url: str, env_factory: Callable[..., Env],
        intakes: list[IntakeProc]) -> None:
    env = env_factory(pg_url)
    store = env.store()
    intake = IntakeProc(env, bus)
    intakes.append(intake)
    intake.wait_ready()
    for name in ("w1", "w2"):
        env.worker(name, "--concurrency", "4")
    invalid = {
        "not json": (b"{pipeline: sleep", "not JSON"),
        "not an object": (b'["sleep"]', "must be a JSON object"),
        "unknown pipeline": ({"pipeline": "no-such-pipeline"}, "no-such-pipeline"),
        "bad params": ({"pipeline": "sleep", "params": {"steps": 0}}, "steps"),
        "unknown field": ({**SLEEP_FAST, "colour": "red"}, "colour: unknown field"),
    }
    invalid_ids: dict[str, str] = {}
    for i in range(180):
        keyed = i < 40
        attrs = {"idempotency_key": f"request-{i}"} if keyed else {}
        bus.publish(_request(i), **attrs)
        if i < 20:  # a client retrying: the same request again, with the same key
            bus.publish(_request(i), **attrs)
        if i % 36 == 0:
            name = list(invalid)[i // 36]
            invalid_ids[bus.publish(invalid[name][0])] = name

    wait_until(lambda: _all_succeeded(store, 180), 300, "180 jobs to succeed",
               on_fail=intake.log, interval=0.5)
    by_request = _jobs_by_request(store)
    assert sorted(by_request) == list(range(180))
    assert all(len(ids) == 1 for ids in by_request.values()), by_request
    assert store.analytics.count_by_state() == {**{s.value: 0 for s in JobState},
                                      JobState.SUCCEEDED.value: 180}

    def rejections() -> list[Received]:
        return [r for r in bus.collect("events-watch")
                if r.attributes.get("kind") == bus_events.REJECTED]

    wait_until(lambda: len({r.attributes["message_id"] for r in rejections()}) == 5, 60,
               "5 rejected events")
    rejected = {r.attributes["message_id"]: r.body for r in rejections()}
    assert set(rejected) == set(invalid_ids)
    for message_id, name in invalid_ids.items():
        assert rejected[message_id]["message_id"] == message_id
        assert invalid[name][1] in rejected[message_id]["reason"], rejected[message_id]
    # A copy of each on the subscription's dead-letter topic, saying why.
    wait_until(lambda: len(bus.collect("dead-letter-watch")) >= 5, 60, "dead letters")
    dead = {r.attributes["spotrun_message_id"]: r for r in bus.received["dead-letter-watch"]}
    assert set(dead) == set(invalid_ids)
    assert all(r.attributes["spotrun_rejected"] for r in dead.values())

    _check_events_on_topic(bus, store, [i[0] for i in by_request.values()])

    assert intake.terminate() == 0, intake.log()
    log = intake.log()
    lines = [ln for ln in log.splitlines() if " rejected: " in ln]
    assert len(lines) == 5, log
    # Nothing was left unacked: past the ack deadline, nothing is redelivered.
    give_up = time.monotonic() + 12
    while time.monotonic() < give_up:
        assert bus.pull("intake", ack=False) == []
        time.sleep(1)
    store.close()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_an_intake_killed_mid_burst_and_restarted_queues_each_request_once(
        bus: Bus, pg_url: str, env_factory: Callable[..., Env],
        intakes: list[IntakeProc]) -> None:
    env = env_factory(pg_url)
    store = env.store()
    first = IntakeProc(env, bus, "--max-messages", "20")
    intakes.append(first)
    first.wait_ready()
    env.worker("w1", "--concurrency", "4")
    for i in range(80):
        bus.publish(_request(i))
    wait_until(lambda: len(store.list_jobs()) >= 15, 120, "the burst to start",
               on_fail=first.log)
    first.proc.send_signal(signal.SIGKILL)
    first.kill()
    for i in range(80, 120):
        bus.publish(_request(i))
    second = IntakeProc(env, bus, "--max-messages", "20")
    intakes.append(second)
    second.wait_ready()

    # The messages the killed intake held come back once their lease runs out.
    wait_until(lambda: _all_succeeded(store, 120), 600, "120 jobs to succeed",
               on_fail=lambda: _missing(store, 120) + second.log(), interval=0.5)
    by_request = _jobs_by_request(store)
    assert sorted(by_request) == list(range(120))
    assert all(len(ids) == 1 for ids in by_request.values()), by_request
    _check_events_on_topic(bus, store, [ids[0] for ids in by_request.values()])
    assert second.terminate() == 0, second.log()
    store.close()


@pytest.mark.slow
def test_the_database_stopped_during_a_burst_loses_and_duplicates_nothing(
        bus: Bus, env_factory: Callable[..., Env], intakes: list[IntakeProc]) -> None:
    try:
        pg = chaos.PrivatePostgres.locate()
    except chaos.ChaosError as exc:
        if IN_CI:
            pytest.fail(str(exc))
        pytest.skip(str(exc))
    url = pg.create()
    try:
        JobStore.open(url).close()
        env = env_factory(url)
        intake = IntakeProc(env, bus)
        intakes.append(intake)
        intake.wait_ready()
        w = env.worker("w1", "--concurrency", "4")
        total = 100
        published: list[str] = []

        def burst() -> None:
            for i in range(total):
                published.append(bus.publish(_request(i)))
                time.sleep(0.15)

        sender = threading.Thread(target=burst)
        sender.start()
        wait_until(lambda: len(published) >= 15, 60, "the burst to start")
        assert pg.stop("fast"), pg.log_tail()
        time.sleep(10)
        assert intake.proc.poll() is None, intake.log()
        assert pg.start(), pg.log_tail()
        sender.join(120)

        store = JobStore.open(url)
        wait_until(lambda: _all_succeeded(store, total), 150, f"{total} jobs to succeed",
                   on_fail=lambda: f"{store.analytics.count_by_state()}\n{intake.log()[-6000:]}\n"
                   f"{w.log()[-3000:]}", interval=0.5)
        by_request = _jobs_by_request(store)
        assert sorted(by_request) == list(range(total))
        assert all(len(ids) == 1 for ids in by_request.values()), by_request
        assert intake.proc.poll() is None, intake.log()
        assert "nacked, Pub/Sub redelivers it" in intake.log()
        _check_events_on_topic(bus, store, [ids[0] for ids in by_request.values()])
        assert intake.terminate() == 0, intake.log()
        store.close()
    finally:
        for p in intakes:
            p.kill()
        pg.destroy()


@pytest.mark.slow
def test_a_job_preempted_twice_shows_preempted_and_resumed_on_the_topic(
        bus: Bus, sqlite_url: str, env_factory: Callable[..., Env],
        intakes: list[IntakeProc]) -> None:
    env = env_factory(sqlite_url)
    store = env.store()
    intake = IntakeProc(env, bus)
    intakes.append(intake)
    intake.wait_ready()
    message_id = bus.publish({"pipeline": "sleep", "params": {"seconds": 6, "steps": 60}},
                             idempotency_key="preempt-me")
    job_id = wait_until(lambda: next((j.id for j in store.list_jobs()), None), 60,
                        "the job to be queued", on_fail=intake.log)
    last_step = 0
    for round_ in range(2):
        w = env.worker(f"w{round_ + 1}")
        wait_until(functools.partial(_running_past, store, job_id, last_step + 5), 90,
                   "the job to run", on_fail=w.log)
        w.signal(signal.SIGTERM)
        assert w.wait(60) == 0, w.log()
        job = store.get(job_id)
        assert job.state is JobState.QUEUED and job.preemptions == round_ + 1
        last_step = job.progress.step
    env.worker("w3")
    wait_until(lambda: store.get(job_id, with_events=False).state.is_final, 90,
               "the job to end")
    job = store.get(job_id)
    assert job.state is JobState.SUCCEEDED, [e.message for e in job.events]

    on_topic = _check_events_on_topic(bus, store, [job_id])[job_id]
    assert all(r.attributes["message_id"] == message_id for r in on_topic)
    assert all(r.attributes["idempotency_key"] == "preempt-me" for r in on_topic)
    story = [r.body["kind"] for r in on_topic if r.body["kind"] in (
        "queued", "started", "preempted", "resumed", "succeeded")]
    assert story == ["queued", "started", "preempted", "resumed", "preempted", "resumed",
                     "succeeded"], [r.body["kind"] for r in on_topic]
    assert on_topic[-1].body["result"]["resumed_from"] == last_step
    assert intake.terminate() == 0, intake.log()
    store.close()


def test_a_missing_subscription_or_topic_is_one_line_and_a_non_zero_exit(
        bus: Bus, sqlite_url: str, env_factory: Callable[..., Env]) -> None:
    env = env_factory(sqlite_url, PUBSUB_EMULATOR_HOST=bus.host)
    for args, named in ((("--subscription", "no-such-subscription"), "no-such-subscription"),
                        (("--subscription", "intake", "--events-topic", "no-such-topic"),
                         "no-such-topic")):
        proc = env.cli("intake", "pubsub", "--project", bus.project, *args, check=False)
        assert proc.returncode == 2, proc.stderr
        lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("spotrun: ")]
        assert len(lines) == 1 and named in lines[0], proc.stderr
        assert "Traceback" not in proc.stderr


def test_the_server_runs_the_intake_beside_the_api(
        bus: Bus, sqlite_url: str, env_factory: Callable[..., Env],
        intakes: list[IntakeProc]) -> None:
    env = env_factory(sqlite_url, SPOTRUN_PUBSUB_PROJECT=bus.project,
                      SPOTRUN_PUBSUB_SUBSCRIPTION="intake",
                      SPOTRUN_PUBSUB_EVENTS_TOPIC="events", SPOTRUN_PUBSUB_OWNER="backend")
    server = IntakeProc(env, bus, command=("server", "--port", "0"))
    intakes.append(server)
    server.wait_ready("intake: taking jobs from")
    store = env.store()
    message_id = bus.publish(SLEEP_FAST)
    job_id = wait_until(lambda: next((j.id for j in store.list_jobs()), None), 60,
                        "the job to be queued", on_fail=server.log)
    assert store.get(job_id).owner == "backend"
    wait_until(lambda: any(r.attributes.get("job_id") == job_id
                           for r in bus.collect("events-watch")), 60, "its queued event")
    [queued] = [r for r in bus.received["events-watch"] if r.attributes["job_id"] == job_id]
    assert queued.body["kind"] == "queued" and queued.attributes["message_id"] == message_id
    assert server.terminate() == 0, server.log()
    store.close()


@pytest.mark.slow
def test_sigterm_while_the_database_is_down_nacks_what_is_in_hand_and_exits_0(
        bus: Bus, env_factory: Callable[..., Env], intakes: list[IntakeProc]) -> None:
    try:
        pg = chaos.PrivatePostgres.locate()
    except chaos.ChaosError as exc:
        if IN_CI:
            pytest.fail(str(exc))
        pytest.skip(str(exc))
    url = pg.create()
    # The first intake's pull must end in the emulator, or it races the second for the
    # messages it nacks (see StreamEndingProxy).
    proxy = StreamEndingProxy(bus.host)
    try:
        JobStore.open(url).close()
        env = env_factory(url)
        first = IntakeProc(env, bus, host=proxy.host)
        intakes.append(first)
        first.wait_ready()
        assert pg.stop("fast"), pg.log_tail()
        message_ids = [bus.publish(_request(i)) for i in range(10)]
        # Every message in hand (each has failed once; SIGTERM any sooner and one still on
        # its way to the intake stays leased to the stopped stream, as in Pub/Sub).
        wait_until(lambda: all(f"message {m} not taken now" in first.log()
                               for m in message_ids), 60,
                   "the intake to have tried every message", on_fail=first.log)
        assert first.terminate() == 0, first.log()
        assert "intake stopped" in first.log()
        assert pg.start(), pg.log_tail()
        second = IntakeProc(env, bus)
        intakes.append(second)
        second.wait_ready()
        store = JobStore.open(url)
        wait_until(lambda: len(store.list_jobs()) >= 10, 120, "10 jobs",
                   on_fail=lambda: f"{_missing(store, 10)}dead letters: "
                   f"{[r.attributes for r in bus.collect('dead-letter-watch')]}\n"
                   f"{second.log()}")
        by_request = _jobs_by_request(store)
        assert sorted(by_request) == list(range(10))
        assert all(len(ids) == 1 for ids in by_request.values()), by_request
        assert second.terminate() == 0, second.log()
        store.close()
    finally:
        for p in intakes:
            p.kill()
        proxy.close()
        pg.destroy()

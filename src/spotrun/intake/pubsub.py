"""Jobs from Google Cloud Pub/Sub, and their events published back to a topic.

:class:`PubSubIntake` pulls a subscription (streaming pull, flow control bounded by
messages and bytes) and turns each message into a job with :func:`requests.submit`: a
message is acked only once its job is committed; one that can never be a job is acked
after its ``rejected`` event (and a copy on the subscription's dead-letter topic) is
published; one that fails for a passing reason (the database is away) is nacked after a
growing pause, so that Pub/Sub redelivers it later.

:class:`EventPublisher` follows the store's events of the jobs that came in this way and
publishes each, with the job id as ordering key, and moves the job's cursor in the store
only once Pub/Sub has taken the message: at least once, in order per job, and a restart
resumes from the store. One process at a time publishes a source's events (a lease in the
store), whichever replica it runs in.

The client finds the emulator through ``PUBSUB_EMULATOR_HOST``, and Google Cloud through
Application Default Credentials (Workload Identity on GKE).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import logging
import os
import secrets
import signal
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

from spotrun.intake import events as bus_events
from spotrun.intake.requests import IDEMPOTENCY_ATTRIBUTE, IntakeRules, Message, Rejected
from spotrun.intake.requests import submit as submit_request
from spotrun.store import IntakeEvent, JobStore

log = logging.getLogger("spotrun.intake")

ENV_PROJECT = "SPOTRUN_PUBSUB_PROJECT"
ENV_SUBSCRIPTION = "SPOTRUN_PUBSUB_SUBSCRIPTION"
ENV_EVENTS_TOPIC = "SPOTRUN_PUBSUB_EVENTS_TOPIC"
ENV_OWNER = "SPOTRUN_PUBSUB_OWNER"
DEFAULT_OWNER = "pubsub"


class IntakeError(Exception):
    """The intake cannot start; the message says why in one line."""


@dataclass(frozen=True)
class PubSubConfig:
    """Where to pull requests from and publish events to, and how many to hold at once."""

    project: str
    subscription: str
    events_topic: str | None = None
    owner: str = DEFAULT_OWNER
    owner_attribute: str | None = None
    allowed_owners: frozenset[str] = frozenset()
    max_messages: int = 100
    max_bytes: int = 10 << 20
    threads: int = 8
    # The most one lease extension asks for: it bounds how long the messages a crashed
    # intake held stay invisible before Pub/Sub delivers them again.
    lease_extension_seconds: int = 20
    poll_seconds: float = 0.5
    lease_seconds: float = 15.0

    @property
    def subscription_path(self) -> str:
        return _path(self.project, "subscriptions", self.subscription)

    @property
    def events_topic_path(self) -> str | None:
        return None if self.events_topic is None else _path(self.project, "topics",
                                                            self.events_topic)

    @property
    def source(self) -> str:
        """How the store names the jobs that came from this subscription."""
        return f"pubsub:{self.subscription_path}"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> PubSubConfig | None:
        """The intake that ``spotrun server`` runs beside the API, if one is configured."""
        env = os.environ if environ is None else environ
        sub = env.get(ENV_SUBSCRIPTION, "").strip()
        if not sub:
            return None
        project = env.get(ENV_PROJECT, "").strip()
        if not project and not sub.startswith("projects/"):
            raise IntakeError(f"{ENV_SUBSCRIPTION} is set but {ENV_PROJECT} is not")
        return cls(project=project, subscription=sub,
                   events_topic=env.get(ENV_EVENTS_TOPIC, "").strip() or None,
                   owner=env.get(ENV_OWNER, "").strip() or DEFAULT_OWNER)


def _path(project: str, kind: str, name: str) -> str:
    # A full path ("projects/P/topics/T") is taken as it is: a dead-letter topic or an
    # events topic may live in another project.
    if name.startswith("projects/"):
        return name
    return f"projects/{project}/{kind}/{name}"


def _pubsub() -> Any:
    try:
        from google.cloud import pubsub_v1
    except ImportError:
        raise IntakeError("the Pub/Sub intake needs the google-cloud-pubsub client: "
                          "pip install 'spotrun[pubsub]'") from None
    return pubsub_v1


def _first_line(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None) or exc
    text = str(orig).strip().splitlines()
    return f"{type(orig).__name__}: {text[0]}" if text else type(orig).__name__


class Backoff:
    """The pause before nacking after a passing failure: doubles up to ``most``, and starts
    again from ``least`` once a message goes through."""

    def __init__(self, least: float = 0.25, most: float = 5.0) -> None:
        self.least = least
        self.most = most
        self._failures = 0
        self._lock = threading.Lock()

    def failed(self) -> float:
        with self._lock:
            self._failures += 1
            return float(min(self.most, self.least * 2 ** (self._failures - 1)))

    def succeeded(self) -> None:
        with self._lock:
            self._failures = 0


@dataclass
class Counts:
    """What the intake did since it started (for its log and for tests)."""

    queued: int = 0
    rejected: int = 0
    nacked: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, what: str) -> None:
        with self.lock:
            setattr(self, what, getattr(self, what) + 1)


class PubSubIntake:
    """A subscription's messages as jobs in ``store``; their events published back."""

    def __init__(self, store: JobStore, config: PubSubConfig, *,
                 allow_private_callbacks: bool = False) -> None:
        self.store = store
        self.config = config
        self.rules = IntakeRules(source=config.source, owner=config.owner,
                                 owner_attribute=config.owner_attribute,
                                 allowed_owners=config.allowed_owners,
                                 allow_private_callbacks=allow_private_callbacks)
        self.counts = Counts()
        self.dead_letter_topic: str | None = None
        self._stopping = threading.Event()
        self._backoff = Backoff()
        self._subscriber: Any = None
        self._publisher: Any = None
        self._future: Any = None
        self._events: EventPublisher | None = None
        self._resubscribe_at: float | None = None
        self._stop_by = float("inf")

    # ---------------------------------------------------------------- start

    def start(self) -> None:
        """Check the subscription and topics, then start pulling (and publishing).

        Raises :class:`IntakeError` naming what is missing.
        """
        pubsub_v1 = _pubsub()
        from google.api_core import exceptions as gexc
        from google.auth import exceptions as auth_exc

        cfg = self.config
        what = f"the subscription {cfg.subscription_path}"
        try:
            self._subscriber = pubsub_v1.SubscriberClient()
            self._publisher = pubsub_v1.PublisherClient(
                publisher_options=pubsub_v1.types.PublisherOptions(
                    enable_message_ordering=True))
            sub = self._subscriber.get_subscription(
                request={"subscription": cfg.subscription_path}, timeout=30)
            self.dead_letter_topic = sub.dead_letter_policy.dead_letter_topic or None
            if cfg.events_topic_path is not None:
                what = f"the events topic {cfg.events_topic_path}"
                self._publisher.get_topic(request={"topic": cfg.events_topic_path},
                                          timeout=30)
        except gexc.NotFound:
            self._close_clients()
            raise IntakeError(f"{what} does not exist") from None
        except gexc.GoogleAPICallError as exc:
            self._close_clients()
            raise IntakeError(f"cannot read {what}: {exc.message}") from None
        except gexc.GoogleAPIError as exc:  # e.g. Pub/Sub unreachable until the timeout
            self._close_clients()
            raise IntakeError(f"cannot read {what}: {_first_line(exc)}") from None
        except auth_exc.GoogleAuthError as exc:
            self._close_clients()
            raise IntakeError(f"no Google Cloud credentials ({_first_line(exc)}); on GKE "
                              "bind the pod's service account with Workload Identity") from None
        self._subscribe()
        if cfg.events_topic_path is not None:
            self._events = EventPublisher(self.store, self._publisher, cfg.events_topic_path,
                                          cfg.source, poll_seconds=cfg.poll_seconds,
                                          lease_seconds=cfg.lease_seconds)
            self._events.start()
        log.info("taking jobs from %s%s%s", cfg.subscription_path,
                 f", events to {cfg.events_topic_path}" if cfg.events_topic_path else "",
                 f", rejected messages also to {self.dead_letter_topic}"
                 if self.dead_letter_topic else "")

    def _subscribe(self) -> None:
        pubsub_v1 = _pubsub()
        from concurrent.futures import ThreadPoolExecutor

        from google.cloud.pubsub_v1.subscriber.scheduler import ThreadScheduler

        class Scheduler(ThreadScheduler):  # type: ignore[misc]  # untyped client
            """Sets ``pulled`` when the client shuts it down: it does so once the stream
            has stopped receiving, before it waits for the callbacks in hand."""

            def __init__(self, executor: ThreadPoolExecutor, pulled: threading.Event
                         ) -> None:
                super().__init__(executor)
                self.pulled = pulled

            def shutdown(self, await_msg_callbacks: bool = False) -> Any:
                self.pulled.set()
                return super().shutdown(await_msg_callbacks=await_msg_callbacks)

        cfg = self.config
        executor = ThreadPoolExecutor(max_workers=cfg.threads,
                                      thread_name_prefix="spotrun-intake")
        pulled = threading.Event()
        self._future = self._subscriber.subscribe(
            cfg.subscription_path, functools.partial(self._on_message, pulled),
            flow_control=pubsub_v1.types.FlowControl(
                max_messages=cfg.max_messages, max_bytes=cfg.max_bytes,
                max_duration_per_lease_extension=cfg.lease_extension_seconds),
            scheduler=Scheduler(executor, pulled), await_callbacks_on_shutdown=True)

    def watch(self) -> None:
        """Pull again, 5 s after the stream ended on an error Pub/Sub does not retry itself.

        Call it now and then from the main loop; it never blocks.
        """
        future = self._future
        if self._stopping.is_set() or future is None or not future.done():
            return
        now = time.monotonic()
        if self._resubscribe_at is None:
            try:
                future.result(timeout=0)
                why = "it ended"
            except Exception as exc:
                why = _first_line(exc)
            log.warning("the pull of %s stopped (%s); pulling again in 5 s",
                        self.config.subscription_path, why)
            self._resubscribe_at = now + 5.0
        elif now >= self._resubscribe_at:
            self._resubscribe_at = None
            self._subscribe()

    # ------------------------------------------------------------- messages

    def _nack(self, message: Any, pulled: threading.Event) -> None:
        """Nack now; once stopping, only after the stream has stopped receiving.

        A message nacked while its stream still receives is delivered to that stream again
        at once, dropped as the stream closes, and hidden until that delivery's lease runs
        out (each time one more delivery attempt towards the dead-letter policy)."""
        if self._stopping.is_set():
            pulled.wait(max(0.0, self._stop_by - time.monotonic()))
        message.nack()

    def _on_message(self, pulled: threading.Event, message: Any) -> None:
        msg = Message(message.message_id, bytes(message.data), dict(message.attributes))
        if self._stopping.is_set():
            self._nack(message, pulled)
            return
        try:
            job = submit_request(self.store, msg, self.rules)
        except Rejected as exc:
            self._reject(message, msg, exc.reason, pulled)
            return
        except Exception as exc:
            # The database is away, or something else passing: never lose the request.
            self.counts.add("nacked")
            pause = self._backoff.failed()
            log.warning("message %s not taken now (%s); nacked, Pub/Sub redelivers it",
                        msg.message_id, _first_line(exc))
            self._stopping.wait(pause)
            self._nack(message, pulled)
            return
        self._backoff.succeeded()
        message.ack()
        self.counts.add("queued")
        log.debug("message %s: job %s", msg.message_id, job.id)

    def _reject(self, message: Any, msg: Message, reason: str, pulled: threading.Event
                ) -> None:
        log.warning("message %s rejected: %s", msg.message_id, reason)
        key = msg.attributes.get(IDEMPOTENCY_ATTRIBUTE)
        try:
            waits = []
            topic = self.config.events_topic_path
            if topic is not None:
                body, attrs = bus_events.rejected_event(msg.message_id, reason, key,
                                                        dt.datetime.now(dt.UTC))
                waits.append(self._publisher.publish(topic, body, **attrs))
            if self.dead_letter_topic is not None:
                attrs = {**msg.attributes,
                         "spotrun_rejected": bus_events.truncate(reason),
                         "spotrun_message_id": msg.message_id,
                         "spotrun_subscription": self.config.subscription_path}
                waits.append(self._publisher.publish(self.dead_letter_topic, msg.data,
                                                     **attrs))
            for fut in waits:
                fut.result(timeout=60)
        except Exception as exc:
            self.counts.add("nacked")
            log.warning("message %s: cannot report its rejection (%s); nacked",
                        msg.message_id, _first_line(exc))
            self._stopping.wait(self._backoff.failed())
            self._nack(message, pulled)
            return
        message.ack()
        self.counts.add("rejected")

    # ----------------------------------------------------------------- stop

    def stop(self, timeout: float) -> bool:
        """Stop pulling, let the messages in hand finish (or nack them once the stream no
        longer receives, so that Pub/Sub gives them to another subscriber at once), stop
        publishing.

        True if all of it ended inside ``timeout`` seconds.
        """
        give_up = time.monotonic() + timeout
        self._stop_by = give_up
        self._stopping.set()
        clean = True
        if self._future is not None:
            self._future.cancel()
            try:
                self._future.result(timeout=max(0.1, give_up - time.monotonic()))
            except TimeoutError:
                clean = False
            except Exception as exc:
                log.debug("the pull ended with %s", _first_line(exc))
        if self._events is not None:
            clean = self._events.stop(max(0.1, give_up - time.monotonic())) and clean
        self._close_clients()
        log.info("intake stopped: %d queued, %d rejected, %d nacked", self.counts.queued,
                 self.counts.rejected, self.counts.nacked)
        return clean

    def _close_clients(self) -> None:
        if self._publisher is not None:
            with contextlib.suppress(Exception):
                self._publisher.stop()
        if self._subscriber is not None:
            with contextlib.suppress(Exception):
                self._subscriber.close()


class EventPublisher:
    """Publishes the events of one source's jobs to a topic, from the store's cursor."""

    def __init__(self, store: JobStore, publisher: Any, topic: str, source: str, *,
                 poll_seconds: float = 0.5, lease_seconds: float = 15.0) -> None:
        self.store = store
        self.publisher = publisher
        self.topic = topic
        self.source = source
        self.poll_seconds = poll_seconds
        self.lease_seconds = lease_seconds
        self.lease_name = f"events:{source}"
        self.holder = f"{socket.gethostname()[:40]}-{os.getpid()}-{secrets.token_hex(3)}"
        self.published = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="spotrun-intake-events",
                                        daemon=True)
        self._holding = False

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float) -> bool:
        self._stop.set()
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                busy = self.publish_once()
            except Exception as exc:
                log.warning("events: cannot publish now (%s); trying again",
                            _first_line(exc))
                busy = False
            if not busy:
                self._stop.wait(self.poll_seconds)
        if self._holding:
            with contextlib.suppress(Exception):
                self.store.intake.release_lease(self.lease_name, self.holder)

    def publish_once(self) -> bool:
        """Publish one batch of pending events; True if there were any."""
        holding = self.store.intake.take_lease(self.lease_name, self.holder, self.lease_seconds)
        if holding != self._holding:
            log.info("events: %s publishing to %s", "now" if holding else "no longer",
                     self.topic)
            self._holding = holding
        if not holding:
            return False
        pending = self.store.intake.events(self.source)
        if not pending:
            return False
        by_job: dict[str, list[tuple[IntakeEvent, Any]]] = {}
        for ev in pending:
            body, attrs = bus_events.job_event(ev)
            fut = self.publisher.publish(self.topic, body, ordering_key=ev.job_id, **attrs)
            by_job.setdefault(ev.job_id, []).append((ev, fut))
        for job_id, sent in by_job.items():
            last: IntakeEvent | None = None
            for ev, fut in sent:
                try:
                    fut.result(timeout=60)
                except Exception as exc:
                    # Pub/Sub refuses the rest of this ordering key until it is resumed;
                    # the cursor stays, so the next round sends them again, in order.
                    log.warning("events: job %s event %d not published (%s); will retry",
                                job_id, ev.event_id, _first_line(exc))
                    self.publisher.resume_publish(self.topic, job_id)
                    break
                last = ev
            if last is not None:
                self.store.intake.mark_published(job_id, last.event_id,
                                                 done=bus_events.is_final(last))
                self.published += sum(1 for ev, _ in sent if ev.event_id <= last.event_id)
        return True


# ------------------------------------------------------------------ commands


class StopSignals:
    """Counts SIGINT/SIGTERM while installed; the handler does nothing else."""

    def __init__(self) -> None:
        self.count = 0
        self.last: int | None = None
        self._old: dict[int, Any] = {}

    def _record(self, signum: int, _frame: FrameType | None) -> None:
        self.count += 1
        self.last = signum

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._record)

    def restore(self) -> None:
        for signum, old in self._old.items():
            signal.signal(signum, old)


def stop_within(intake: PubSubIntake, budget: float, signals: StopSignals,
                echo: Callable[..., Any]) -> bool:
    """Stop the intake inside ``budget`` seconds; a second signal ends the process now."""
    seen = signals.count
    result: list[bool] = []
    stopper = threading.Thread(target=lambda: result.append(intake.stop(budget)),
                               name="spotrun-intake-stop", daemon=True)
    stopper.start()
    give_up = time.monotonic() + budget
    while stopper.is_alive() and time.monotonic() < give_up:
        if signals.count > seen:
            echo("spotrun: second signal: exiting now", err=True)
            _exit_now(1)
        stopper.join(0.05)
    if stopper.is_alive():
        echo(f"spotrun: the intake did not stop in {budget:g} s: exiting", err=True)
        return False
    return bool(result and result[0])


def _exit_now(code: int) -> None:
    logging.shutdown()
    os._exit(code)


def run(store: JobStore, config: PubSubConfig, *, grace_seconds: float,
        echo: Callable[..., Any], allow_private_callbacks: bool = False) -> int:
    """``spotrun intake pubsub``: take jobs until SIGTERM/SIGINT; the exit status."""
    intake = PubSubIntake(store, config, allow_private_callbacks=allow_private_callbacks)
    signals = StopSignals()
    signals.install()
    try:
        try:
            intake.start()
        except IntakeError as exc:
            echo(f"spotrun: {exc}", err=True)
            return 2
        echo(f"spotrun: intake ready: taking jobs from {config.subscription_path}"
             + (f", events to {config.events_topic_path}" if config.events_topic_path
                else ""))
        while signals.count == 0:
            intake.watch()
            time.sleep(0.1)
        assert signals.last is not None
        echo(f"spotrun: {signal.Signals(signals.last).name} received: stopping the intake")
        # The budget of a notice, less a second to spare, as the worker keeps.
        clean = stop_within(intake, max(1.0, grace_seconds - 1.0), signals, echo)
    finally:
        signals.restore()
    if not clean:
        _exit_now(1)
    echo("spotrun: intake stopped")
    return 0

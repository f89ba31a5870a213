"""A real SMTP server on loopback that keeps what it receives: for `herald demo`, tests
and the fault-injection harness.

Built on aiosmtpd (install the ``demo`` or ``dev`` extra). Failures on demand:
``reject_recipients`` answer 550 (permanent), ``defer_recipients`` answer 451 (transient),
``defer_counts[address] = n`` answers 451 to the next n attempts; ``replies[address]`` answers
whatever it holds (e.g. "550 5.7.1 Refused by policy"). ``fail_rate`` answers 451
and ``drop_rate`` drops the connection, at random, before a message is accepted.
"""

from __future__ import annotations

import email
import email.policy
import random
import threading
import time
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from devtools.procs import free_port as _free_port

__all__ = ["CaughtMessage", "SmtpCatcher"]


@dataclass(frozen=True)
class CaughtMessage:
    mail_from: str
    rcpt_tos: list[str]
    message: EmailMessage

    @property
    def message_id(self) -> str:
        return str(self.message["Message-ID"] or "")

    def text_body(self) -> str:
        part = self.message.get_body(preferencelist=("plain",))
        return str(part.get_content()) if part is not None else ""


class SmtpCatcher:
    def __init__(self, port: int | None = None, id_log: Path | None = None) -> None:
        try:
            from aiosmtpd.controller import Controller
        except ImportError:  # pragma: no cover - depends on the install
            raise RuntimeError(
                "the SMTP catcher needs aiosmtpd: pip install 'herald[demo]'"
            ) from None
        self.port = port or _free_port()
        self.messages: list[CaughtMessage] = []
        self.reject_recipients: set[str] = set()  # 550 5.1.1: the mailbox does not exist
        self.replies: dict[str, str] = {}  # address -> the RCPT answer to give
        self.defer_recipients: set[str] = set()
        self.busy_recipients: set[str] = set()  # 421: the server asks us to slow down
        self.defer_counts: dict[str, int] = {}
        self.fail_rate = 0.0
        self.drop_rate = 0.0
        self.rng = random.Random()  # noqa: S311 - fault injection, not crypto
        self.attempts: dict[str, int] = {}  # RCPT attempts per address
        self.accepted_ids: list[str] = []  # Message-ID of every accepted message, in order
        self.keep_messages = True  # False for long runs: ids only
        self._id_log = id_log.open("a", buffering=1) if id_log is not None else None
        self._cond = threading.Condition()
        self._running = False
        self._controller = Controller(_Handler(self), hostname="127.0.0.1", port=self.port)

    def __enter__(self) -> SmtpCatcher:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self._controller.start()
        self._running = True

    def stop(self) -> None:
        """Stop listening (idempotent): a test can take the server down mid-run."""
        if self._running:
            self._running = False
            self._controller.stop()
        if self._id_log is not None and not self._id_log.closed:
            self._id_log.close()

    def _add(self, msg: CaughtMessage) -> None:
        with self._cond:
            if self.keep_messages:
                self.messages.append(msg)
            self.accepted_ids.append(msg.message_id)
            if self._id_log is not None:
                self._id_log.write(f"{msg.message_id} {','.join(msg.rcpt_tos)}\n")
            self._cond.notify_all()

    def to(self, address: str) -> list[CaughtMessage]:
        with self._cond:
            return [m for m in self.messages if address in m.rcpt_tos]

    def wait_for(
        self, count: int, address: str | None = None, timeout: float = 60.0
    ) -> list[CaughtMessage]:
        """Wait until ``count`` messages (to ``address``, if given) arrived; return them."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = [m for m in self.messages if address is None or address in m.rcpt_tos]
                left = deadline - time.monotonic()
                if len(found) >= count or left <= 0:
                    return found
                self._cond.wait(left)


class _Handler:
    def __init__(self, catcher: SmtpCatcher) -> None:
        self.catcher = catcher

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: Any
    ) -> str:
        c = self.catcher
        c.attempts[address] = c.attempts.get(address, 0) + 1
        if c.drop_rate and c.rng.random() < c.drop_rate:
            server.transport.close()  # an abrupt hang-up before the message is accepted
            return "421 4.4.2 Connection dropped"
        if address in c.replies:
            return c.replies[address]
        if address in c.reject_recipients:
            return "550 5.1.1 Mailbox unavailable"
        if address in c.busy_recipients:
            return "421 4.7.0 Too many messages, slow down"
        if address in c.defer_recipients:
            return "451 4.3.0 Try again later"
        if c.defer_counts.get(address, 0) > 0:
            c.defer_counts[address] -= 1
            return "451 4.3.0 Try again later"
        if c.fail_rate and c.rng.random() < c.fail_rate:
            return "451 4.3.2 System not accepting network messages"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        msg = email.message_from_bytes(envelope.content, policy=email.policy.default)
        assert isinstance(msg, EmailMessage)  # noqa: S101 - guaranteed by policy.default
        self.catcher._add(CaughtMessage(envelope.mail_from, list(envelope.rcpt_tos), msg))
        return "250 2.0.0 Ok: queued"

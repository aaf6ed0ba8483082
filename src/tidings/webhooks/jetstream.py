"""A NATS connection as the webhook store uses JetStream (server 2.9+): requests that fail as
soon as the connection drops, pipelined publishes, purges, and short-lived pull consumers.

Rules:
- Errors are nats-py's (``nats.errors.Error``; ``APIError`` and its subclass by code for an
  error answer), plus ``StreamMissing`` for a stream that is not there and ``Dropped`` for a
  request the connection dropped under. The store turns them into its own errors.
- ``connect`` gives up after ``CONNECT_TIMEOUT``; from then on the client reconnects for ever
  and buffers nothing while disconnected, so a write then fails at once.
- A read is an ephemeral pull consumer (in memory, no acks, dropped by the server if this
  client forgets it), asked for messages with ``no_wait`` in batches of ``FETCH_BATCH``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
from collections.abc import Sequence
from typing import Any, NoReturn

import nats.errors
import nats.js.errors
import orjson
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api

from ..log import natscodec as log_codec

logger = logging.getLogger("tidings.webhooks")

CONNECT_TIMEOUT = 5.0  # seconds ``connect`` tries to reach a server
TIMEOUT = 5.0  # seconds for any answer: an API request, a publish, a batch of a fetch
FETCH_BATCH = 1000  # messages asked for in one pull request

STREAM_CONFIG_DIFFERS = 10058  # "stream name already in use with a different configuration"
STREAM_NOT_FOUND = 10059


class StreamMissing(Exception):
    """No stream takes the subject, or the stream named is not there."""


class Dropped(nats.errors.Error):
    """The connection dropped (or was down) while a request needed it."""

    def __str__(self) -> str:
        return "disconnected; reconnecting"


def _api_error(error: dict[str, Any]) -> NoReturn:
    if error.get("err_code") == STREAM_NOT_FOUND:
        raise StreamMissing
    nats.js.errors.APIError.from_error(error)  # raises the subclass for the code
    raise nats.js.errors.APIError(**error)


def seq_of(msg: Msg) -> int:
    """The stream sequence number of a message a consumer delivered."""
    return log_codec.delivery_seqs(msg.reply)[0]


class _Pull:
    """The messages a pull consumer sends to one subscription, request after request.

    A ``no_wait`` request is answered with the messages at hand, then, when they are fewer
    than asked for, a status (``404``, or ``408`` after some): the consumer has no more now.
    Never ask again after that: a server 2.9 consumer filtered by a wildcard may count messages
    it does not have (see ``webhooks.natscodec``) and then waits for them."""

    def __init__(self) -> None:
        self.msgs: list[Msg] = []
        self.ended = False
        self._until = 0
        self._done: asyncio.Future[None] | None = None

    def expect(self, count: int) -> asyncio.Future[None]:
        """A future done once ``count`` more messages arrived, or the request's status."""
        self._until = len(self.msgs) + count
        self._done = asyncio.get_running_loop().create_future()
        return self._done

    async def arrived(self, msg: Msg) -> None:
        if log_codec.status(msg.headers):
            self.ended = True
        else:
            self.msgs.append(msg)
        done = self._done
        if done is not None and not done.done() and (self.ended or len(self.msgs) >= self._until):
            done.set_result(None)


class JetStream:
    """One connection to the NATS servers ``servers``, named ``name`` on the server."""

    def __init__(self, servers: list[str], name: str) -> None:
        self.servers = servers
        self.name = name
        self.last_error = ""  # the client's last connection error, for messages
        self._nc = Client()
        self._js: JetStreamContext | None = None
        self._dropped: asyncio.Future[None] | None = None  # done when the connection drops

    @property
    def connected(self) -> bool:
        return self._nc.is_connected

    async def connect(self) -> None:
        """Connected; TimeoutError when no server answered within ``CONNECT_TIMEOUT``."""
        self._dropped = asyncio.get_running_loop().create_future()
        # nats-py retries a first connection for ever with max_reconnect_attempts=-1 (which a
        # running node wants), hence the timeout. pending_size=0: a write while disconnected
        # fails at once instead of waiting in a buffer.
        async with asyncio.timeout(CONNECT_TIMEOUT):
            await self._nc.connect(
                self.servers, name=self.name, connect_timeout=2, max_reconnect_attempts=-1,
                reconnect_time_wait=1, pending_size=0, ping_interval=10, max_outstanding_pings=2,
                error_cb=self._on_error, disconnected_cb=self._on_disconnected,
                reconnected_cb=self._on_reconnected,
            )  # fmt: skip
        self._js = self._nc.jetstream(timeout=TIMEOUT)

    async def close(self) -> None:
        with contextlib.suppress(nats.errors.Error, OSError):
            await self._nc.close()

    async def _on_error(self, exc: Exception) -> None:
        self.last_error = " ".join(str(exc).split()) or type(exc).__name__
        logger.debug("webhook store: NATS: %r", exc)

    async def _on_disconnected(self) -> None:
        if self._dropped is not None and not self._dropped.done():
            self._dropped.set_result(None)

    async def _on_reconnected(self) -> None:
        self._dropped = asyncio.get_running_loop().create_future()

    def _up(self) -> asyncio.Future[None]:
        """This connection's drop, once it is up (``Dropped`` when it is not)."""
        if not self._nc.is_connected or self._dropped is None or self._dropped.done():
            raise Dropped
        return self._dropped

    # -- requests ------------------------------------------------------------------------------

    async def request(
        self, subject: str, payload: bytes = b"", headers: dict[str, str] | None = None
    ) -> Msg:
        """One request; fails as soon as the connection drops rather than at the timeout."""
        dropped = self._up()
        answer = asyncio.ensure_future(
            self._nc.request(subject, payload, timeout=TIMEOUT, headers=headers)
        )
        try:
            await asyncio.wait((answer, dropped), return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            answer.cancel()
            raise
        if not answer.done():
            answer.cancel()
            raise Dropped
        return answer.result()

    async def api(self, op: str, body: Any = None) -> dict[str, Any]:
        """One JetStream API request (``$JS.API.<op>``), its answer."""
        payload = b"" if body is None else orjson.dumps(body)
        reply: dict[str, Any] = orjson.loads((await self.request(f"$JS.API.{op}", payload)).data)
        if "error" in reply:
            _api_error(reply["error"])
        return reply

    async def publish(
        self, subject: str, payload: bytes, headers: dict[str, str] | None = None
    ) -> int:
        """Publish to a stream; the message's sequence number once the stream stored it."""
        try:
            msg = await self.request(subject, payload, headers)
        except nats.errors.NoRespondersError:
            raise StreamMissing from None
        reply: dict[str, Any] = orjson.loads(msg.data)
        if "error" in reply:
            _api_error(reply["error"])
        return int(reply["seq"])

    async def publish_all(
        self, messages: Sequence[tuple[str, bytes, dict[str, str]]]
    ) -> list[int | BaseException]:
        """Publish ``messages`` in this order, pipelined; each one's sequence number, or the
        error the stream answered it with. Raises when not every answer came (a dropped
        connection, the timeout): any of them may be stored."""
        dropped = self._up()
        assert self._js is not None
        futures: list[asyncio.Future[api.PubAck]] = []
        try:
            for subject, payload, headers in messages:
                futures.append(await self._js.publish_async(subject, payload, headers=headers))
        except BaseException:
            for future in futures:
                future.cancel()
            raise
        acks = asyncio.gather(*futures, return_exceptions=True)
        try:
            await asyncio.wait((acks, dropped), timeout=TIMEOUT,
                               return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
        except BaseException:
            acks.cancel()
            raise
        if not acks.done():
            acks.cancel()
            raise Dropped if dropped.done() else TimeoutError()
        return [r if isinstance(r, BaseException) else r.seq for r in acks.result()]

    async def purge(self, stream: str, subject: str | None = None, below: int = 0) -> int:
        """Remove the messages on ``subject`` (wildcards allowed), or those below seq
        ``below``; how many went."""
        body: dict[str, Any] = {"filter": subject} if subject is not None else {"seq": below}
        return int((await self.api(f"STREAM.PURGE.{stream}", body)).get("purged", 0))

    # -- streams -------------------------------------------------------------------------------

    async def bucket(self, bucket: str, replicas: int) -> None:
        """The KV bucket ``bucket`` (one revision per key), made when missing."""
        assert self._js is not None
        try:
            await self._js.create_key_value(bucket=bucket, history=1, replicas=replicas)
        except nats.js.errors.BadRequestError as exc:
            if exc.err_code != STREAM_CONFIG_DIFFERS:
                raise
            # Made with other settings (a replica count changed since): usable all the same.

    async def stream(self, config: dict[str, Any]) -> dict[str, Any]:
        """The info of the stream ``config`` describes, made when missing (as it says)."""
        name = config["name"]
        try:
            return await self.api(f"STREAM.INFO.{name}")
        except StreamMissing:
            pass
        try:
            return await self.api(f"STREAM.CREATE.{name}", config)
        except nats.js.errors.BadRequestError as exc:
            if exc.err_code != STREAM_CONFIG_DIFFERS:
                raise
            return await self.api(f"STREAM.INFO.{name}")  # another node made it meanwhile

    # -- reading -------------------------------------------------------------------------------

    async def consumer(
        self, stream: str, subject: str, start: int | None = None, *, headers_only: bool = False
    ) -> tuple[str, int]:
        """A pull consumer of ``stream``'s messages on ``subject``, from seq ``start`` (None:
        each subject's last message, as a KV bucket is read): its name and how many messages
        it has (see ``_Pull`` for when that count is off)."""
        config: dict[str, Any] = {
            "ack_policy": "none", "mem_storage": True, "num_replicas": 1,
            "inactive_threshold": log_codec.nanoseconds(log_codec.INACTIVE),
            "filter_subject": subject, "headers_only": headers_only,
        }  # fmt: skip
        if start is None:
            config["deliver_policy"] = "last_per_subject"
        else:
            config.update(deliver_policy="by_start_sequence", opt_start_seq=max(1, start))
        info = await self.api(
            f"CONSUMER.CREATE.{stream}", {"stream_name": stream, "config": config}
        )
        return info["name"], int(info["num_pending"])

    async def forget(self, stream: str, name: str) -> None:
        """Delete consumer ``name`` without waiting for the answer."""
        with contextlib.suppress(nats.errors.Error):
            await self._nc.publish(f"$JS.API.CONSUMER.DELETE.{stream}.{name}")

    async def fetch(
        self, stream: str, name: str, count: int, *, until: int | None = None
    ) -> list[Msg]:
        """``count`` messages from consumer ``name`` (fewer when it has no more); with
        ``until``, more until one at or past seq ``until`` came (``count`` is then a guess of
        how many there are before it)."""
        pull = _Pull()
        sub = await self._nc.subscribe(self._nc.new_inbox(), cb=pull.arrived)
        try:
            while not pull.ended:
                if until is None:
                    wanted = count - len(pull.msgs)
                elif pull.msgs and seq_of(pull.msgs[-1]) >= until:
                    break
                else:
                    wanted = max(count - len(pull.msgs), 64)
                if wanted <= 0:
                    break
                wanted = min(wanted, FETCH_BATCH)
                dropped = self._up()
                done = pull.expect(wanted)
                await self._nc.publish(
                    f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{name}",
                    orjson.dumps({"batch": wanted, "no_wait": True}),
                    reply=sub.subject,
                )
                async with asyncio.timeout(TIMEOUT):
                    await asyncio.wait((done, dropped), return_when=asyncio.FIRST_COMPLETED)
                if not done.done():
                    raise Dropped
        finally:
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()
        return pull.msgs

    async def read(self, stream: str, subject: str, start: int | None = None) -> list[Msg]:
        """Every message ``consumer`` would have, in stream order."""
        name, pending = await self.consumer(stream, subject, start)
        try:
            return await self.fetch(stream, name, pending) if pending else []
        finally:
            await self.forget(stream, name)

    async def last(self, stream: str, subject: str) -> tuple[int, bytes | None]:
        """The seq and data of the last message on ``subject`` (0 and None: there is none),
        from the stream's leader (a replica's direct get may lag behind it)."""
        try:
            reply = await self.api(f"STREAM.MSG.GET.{stream}", {"last_by_subj": subject})
        except nats.js.errors.NotFoundError:
            return 0, None
        message = reply["message"]
        data = message.get("data")
        return int(message["seq"]), base64.b64decode(data) if data else None

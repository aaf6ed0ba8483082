"""One WebSocket connection, from the upgrade request to the closed socket (docs/websocket.md).

The websockets library's sans-I/O ``ServerProtocol`` parses and checks frames; this class reads
messages into a bounded inbox handled by a short-lived task, writes replies and events itself
(event frames from each event's shared envelope), and keeps the connection's deadlines.

Longer than our usual module: one connection's state (inbox, subscriptions, pending writes,
deadlines) changes from protocol callbacks, tasks and the ticker, and every rule about that
state stays in this one class.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from functools import partial
from typing import TYPE_CHECKING, Any, cast

import orjson
from uvicorn.server import ServerState
from websockets.extensions.permessage_deflate import ServerPerMessageDeflateFactory
from websockets.frames import Frame, Opcode
from websockets.http11 import Request
from websockets.protocol import State
from websockets.server import ServerProtocol

from ... import websocket as wire
from ...auth import Grant
from ...events import Cursor, Event, format_time, parse_patterns
from ...exceptions import (
    DuplicateSubscription,
    Forbidden,
    InvalidMessage,
    NotSubscribed,
    PayloadTooLarge,
    TidingsError,
    TooManyRequests,
    TooManySubscriptions,
    Unauthorized,
)
from ...hub import Subscription
from ...limits import Action, Slot
from ..http import json_draft
from . import handshake

if TYPE_CHECKING:
    from .server import WebSockets

log = logging.getLogger("tidings.ws")

BATCH = 512  # events per subscription per write at most
PUBLISH_WINDOW = 64  # publishes in flight per connection
INBOX = 16  # messages read ahead of the one being handled before reading pauses (or
# websocket.max_message bytes of them, whichever comes first)
CLOSE_TIMEOUT = 5.0  # seconds for the peer to finish a close handshake before the socket drops
MAX_REASON = 123  # bytes in a close frame's reason (RFC 6455 §5.5)

GOING_AWAY = 1001
INTERNAL_ERROR = 1011
LAGGED = 4001
UNAUTHORIZED = 4401
FORBIDDEN = 4403


def _reason(text: str) -> str:
    data = text.encode()
    if len(data) <= MAX_REASON:
        return text
    return data[: MAX_REASON - 3].decode(errors="ignore") + "..."


class Stream:
    """One subscription of a connection: its id and the prefix of its event messages."""

    __slots__ = ("binary", "catching_up", "id", "prefix", "sub")

    def __init__(self, message_id: wire.Id, sub: Subscription, binary: bool) -> None:
        self.id = message_id
        self.sub = sub
        self.binary = binary
        self.prefix = wire.event_prefix(message_id)
        self.catching_up = False  # a task is reading history for it


class Connection(asyncio.Protocol):
    """One WebSocket connection, from the upgrade request to the closed socket. uvicorn
    creates it when a request asks to upgrade; ``sockets`` is set on a per-server subclass."""

    __slots__ = (
        "_window_waiter",
        "_writable_waiter",
        "address",
        "closing",
        "connections",
        "ctx",
        "deflate",
        "fragment_opcode",
        "fragments",
        "grant",
        "inbox",
        "inbox_bytes",
        "last_heard",
        "loop",
        "opened",
        "ping_payload",
        "ping_sent",
        "publishing",
        "reading",
        "ready",
        "settings",
        "slot",
        "streams",
        "transport",
        "working",
        "writable",
        "ws",
    )
    sockets: WebSockets  # a class attribute of the per-server subclass

    def __init__(self, *, server_state: ServerState, **_uvicorn: Any) -> None:
        sockets = self.sockets
        self.ctx = sockets.ctx
        self.settings = sockets.settings
        self.connections = server_state.connections  # uvicorn calls shutdown() on these
        extensions = None
        if self.settings.compression:
            extensions = [ServerPerMessageDeflateFactory()]
        self.ws = ServerProtocol(
            extensions=extensions,
            max_size=self.settings.max_message,
            logger=logging.getLogger("tidings.ws.protocol"),
        )
        self.transport: asyncio.Transport | None = None
        self.loop = asyncio.get_running_loop()
        self.address = "unknown"
        self.slot: Slot | None = None
        self.grant: Grant | None = None  # None: auth is on and no credential came yet
        self.deflate = False
        self.opened: float | None = None  # loop time of the 101
        self.closing: float | None = None  # loop time the close began
        self.last_heard = 0.0
        self.ping_sent: float | None = None
        self.ping_payload = b""
        self.streams: dict[wire.Id, Stream] = {}
        self.ready: dict[Stream, None] = {}  # subscriptions with events to write
        self.inbox: deque[tuple[Opcode, bytes]] = deque()
        self.inbox_bytes = 0
        self.working = False  # a task is handling the inbox
        self.reading = True
        self.writable = True
        self._writable_waiter: asyncio.Future[None] | None = None
        self.publishing = 0
        self._window_waiter: asyncio.Future[None] | None = None
        self.fragments: list[bytes] = []
        self.fragment_opcode = Opcode.TEXT

    # -- asyncio.Protocol ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.connections.add(self)  # type: ignore[arg-type]  # uvicorn: its own protocols

    def data_received(self, data: bytes) -> None:
        ws = self.ws
        ws.receive_data(data)
        for event in ws.events_received():
            if isinstance(event, Request):
                self._handshake(event)
            elif isinstance(event, Frame):
                self._frame(event)
        self._send_protocol_data()

    def eof_received(self) -> bool | None:
        self.ws.receive_eof()
        self._send_protocol_data()
        return None

    def pause_writing(self) -> None:
        self.writable = False

    def resume_writing(self) -> None:
        self.writable = True
        self._release_writers()
        if self.ready:
            self.sockets.schedule(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.connections.discard(self)
        self.sockets.open.discard(self)
        if self.closing is None:
            self.closing = self.loop.time()
        self._end_streams()
        if self.slot is not None:
            self.slot.release()
            self.slot = None
        self.writable = True
        self._release_writers()
        self.inbox.clear()
        self.inbox_bytes = 0

    def shutdown(self) -> None:
        """uvicorn's server is stopping: close, so the client reconnects elsewhere."""
        if self.opened is None:
            self.abort()
        else:
            self.close(GOING_AWAY, "server shutting down: reconnect and resume from your cursors")

    # -- handshake -----------------------------------------------------------------------------

    def _handshake(self, request: Request) -> None:
        assert self.transport is not None
        peer = self.transport.get_extra_info("peername")
        outcome = handshake.admit(self.ctx, self.sockets.origins, self.ws, request, peer)
        if not isinstance(outcome, handshake.Admission):
            self.ws.send_response(outcome)
            return
        self.address, self.slot = outcome.address, outcome.slot
        self.ws.send_response(outcome.response)
        self.deflate = bool(self.ws.extensions)
        self.opened = self.last_heard = self.loop.time()
        self.sockets.open.add(self)
        subscribe = outcome.subscribe
        try:
            auth = self.ctx.auth
            if outcome.token is not None or not auth.enabled:
                self.grant = auth.authenticate(outcome.token)
            # else: it may come in an auth message, within websocket.auth_timeout
            if subscribe is not None:
                if self.grant is None:
                    raise Unauthorized(
                        "a channel in the URL needs a credential with the handshake "
                        "(token parameter or Authorization header)"
                    )
                self.grant.check_subscribe(parse_patterns(subscribe["channels"]))
        except Unauthorized as exc:
            self.close(UNAUTHORIZED, exc.detail)
            return
        except Forbidden as exc:
            self.close(FORBIDDEN, exc.detail)
            return
        if subscribe is not None:
            self._enqueue(Opcode.TEXT, orjson.dumps(subscribe))

    # -- frames in -----------------------------------------------------------------------------

    def _frame(self, frame: Frame) -> None:
        self.last_heard = self.loop.time()
        opcode = frame.opcode
        if opcode is Opcode.TEXT or opcode is Opcode.BINARY:
            if frame.fin:
                self._message(opcode, bytes(frame.data))
            else:
                self.fragment_opcode = opcode
                self.fragments = [bytes(frame.data)]
        elif opcode is Opcode.CONT:
            self.fragments.append(bytes(frame.data))
            if frame.fin:
                data, self.fragments = b"".join(self.fragments), []
                self._message(self.fragment_opcode, data)
        elif opcode is Opcode.PONG:
            if self.ping_sent is not None and frame.data == self.ping_payload:
                self.ping_sent = None
        elif opcode is Opcode.CLOSE:
            # websockets has queued the answering close frame and the end of the stream.
            if self.closing is None:
                self.closing = self.loop.time()
            self._end_streams()

    def _message(self, opcode: Opcode, data: bytes) -> None:
        if self.closing is not None:
            return
        if opcode is Opcode.TEXT:
            try:
                data.decode("utf-8")
            except UnicodeDecodeError as exc:
                self._fail(1007, f"invalid UTF-8 in a text frame at byte {exc.start}")
                return
        self._enqueue(opcode, data)

    def _enqueue(self, opcode: Opcode, data: bytes) -> None:
        self.inbox.append((opcode, data))
        self.inbox_bytes += len(data)
        full = len(self.inbox) >= INBOX or self.inbox_bytes >= self.settings.max_message
        if full and self.reading and self.transport is not None:
            self.reading = False
            self.transport.pause_reading()
        if not self.working:
            self.working = True
            self.sockets.spawn(self._work(), self)

    def _fail(self, code: int, reason: str) -> None:
        if self.closing is None:
            self.closing = self.loop.time()
        self._end_streams()
        self.ws.fail(code, _reason(reason))

    # -- messages ------------------------------------------------------------------------------

    async def _work(self) -> None:
        """Handle queued messages in order, while the client takes the replies."""
        try:
            while self.inbox and self.closing is None:
                if not self.writable:
                    await self._until_writable()
                    continue
                opcode, data = self.inbox.popleft()
                self.inbox_bytes -= len(data)
                drained = self.inbox_bytes <= self.settings.max_message // 2
                if not self.reading and len(self.inbox) <= INBOX // 2 and drained:
                    self.reading = True
                    if self.transport is not None:
                        self.transport.resume_reading()
                await self._handle(opcode, data)
        finally:
            self.working = False

    async def _handle(self, opcode: Opcode, data: bytes) -> None:
        message_id: wire.Id | None = None
        try:
            if opcode is Opcode.BINARY:
                head, raw = wire.split_binary(data)
                message = wire.parse(head, raw)
            else:
                message = wire.parse(data)
            message_id = message.id
            if message.op == "ping":
                self.send(wire.reply("pong", message_id))
            elif message.op == "auth":
                self._auth(message)
            elif self.grant is None:
                raise Unauthorized(
                    'this server requires a credential: send {"op": "auth", "token": "..."} first'
                )
            elif message.op == "subscribe":
                await self._subscribe(message, self.grant)
            elif message.op == "unsubscribe":
                self._unsubscribe(message)
            else:
                await self._publish(message, self.grant)
        except InvalidMessage as exc:  # from wire.parse (with the id it could read), or later
            reply_id = exc.id if exc.id is not None else message_id
            self.send(wire.error(reply_id, exc.code, exc.detail))
        except TidingsError as exc:
            self.send_error(message_id, exc)

    def send_error(self, message_id: wire.Id | None, exc: TidingsError) -> None:
        if isinstance(exc, TooManyRequests):
            retry = round(exc.retry_after, 3)
            self.send(wire.error(message_id, exc.code, exc.detail, retry_after=retry))
        else:
            self.send(wire.error(message_id, exc.code, exc.detail))

    def _limit(self, action: Action, grant: Grant) -> None:
        limits = self.ctx.limits
        now = time.monotonic()
        limits.check_address(action, self.address, now)
        if self.ctx.auth.enabled:
            limits.check_credential(action, grant.subject, now)

    def _auth(self, message: wire.Message) -> None:
        self.ctx.limits.check_address("subscribe", self.address, time.monotonic())
        grant = self.ctx.auth.authenticate(message.fields["token"])
        self.grant = grant
        expires = None if grant.expires is None else format_time(grant.expires)
        self.send(wire.reply("authenticated", message.id, subject=grant.subject, expires=expires))
        for stream in self.streams.values():
            denied = [p for p in stream.sub.patterns if not grant.may_subscribe(p)]
            if denied:
                self.close(
                    FORBIDDEN,
                    f"the new credential may not subscribe to {denied[0].text!r} "
                    f"(subscription {stream.id!r})",
                )
                return

    async def _subscribe(self, message: wire.Message, grant: Grant) -> None:
        sub_id = message.id
        assert sub_id is not None  # wire.parse requires it
        fields = message.fields
        if sub_id in self.streams:
            raise DuplicateSubscription(
                f"subscription {sub_id!r} is open; unsubscribe it first or pick another id"
            )
        if len(self.streams) >= self.settings.max_subscriptions:
            raise TooManySubscriptions(
                f"this connection holds {len(self.streams)} subscriptions, the limit "
                "(websocket.max_subscriptions)"
            )
        channels = fields["channels"]
        limit = self.ctx.settings.limits.max_channels
        if len(channels) > limit:
            raise InvalidMessage(
                f"subscribe.channels holds {len(channels)} patterns; the limit is {limit} "
                "(limits.max_channels)"
            )
        patterns = parse_patterns(channels)
        grant.check_subscribe(patterns)
        since = None if fields.get("since") is None else Cursor.parse(fields["since"])
        self._limit("subscribe", grant)
        sub = await self.ctx.hub.subscribe(patterns, since, "ws")
        if self.closing is not None:
            sub.close()
            return
        stream = Stream(sub_id, sub, bool(fields.get("binary")))
        self.streams[sub_id] = stream
        state: dict[str, Any] = {"cursor": sub.cursor, "recovered": sub.recovered}
        if sub.reason:
            state["reason"] = sub.reason
        self.send(wire.reply("subscribed", sub_id, **state))
        sub.wakeup = partial(self.sockets.wake, self, stream)
        if sub.more:
            self._wake(stream)

    def _unsubscribe(self, message: wire.Message) -> None:
        stream = self.streams.pop(message.fields["sub"], None)
        if stream is None:
            raise NotSubscribed(f"no subscription {message.fields['sub']!r} is open")
        self.ready.pop(stream, None)
        stream.sub.wakeup = None
        stream.sub.close()
        self.send(wire.reply("unsubscribed", message.id, sub=stream.id, cursor=stream.sub.cursor))

    async def _publish(self, message: wire.Message, grant: Grant) -> None:
        draft = json_draft(message.fields, "publish", message.data)
        limit = self.ctx.settings.http.max_event_bytes
        if len(draft.data) > limit:
            raise PayloadTooLarge(
                f"event data is {len(draft.data)} bytes; the limit is {limit} "
                "(http.max_event_bytes)"
            )
        grant.check_publish(draft.channel)
        self._limit("publish", grant)
        while self.publishing >= PUBLISH_WINDOW and self.closing is None:
            self._window_waiter = self.loop.create_future()
            await self._window_waiter
        self.publishing += 1
        self.sockets.spawn(self._append(message.id, draft), self)

    async def _append(self, message_id: wire.Id | None, draft: Any) -> None:
        try:
            [appended] = await self.ctx.hub.publish([draft])
        except TidingsError as exc:
            self.send_error(message_id, exc)
        else:
            replayed = not appended.created
            self.send(
                wire.reply("published", message_id, cursor=appended.event.cursor, replayed=replayed)
            )
        finally:
            self.publishing -= 1
            waiter = self._window_waiter
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

    # -- writing -------------------------------------------------------------------------------

    def send(self, payload: bytes, opcode: int = wire.TEXT) -> None:
        """Write one message now (replies), unless the connection is closing."""
        if self.closing is not None or self.transport is None:
            return
        if self.deflate:
            if opcode == wire.TEXT:
                self.ws.send_text(payload)
            else:
                self.ws.send_binary(payload)
            self._send_protocol_data()
        else:
            self.transport.write(wire.frame_header(len(payload), opcode) + payload)

    def _encode(self, stream: Stream, events: list[Event], parts: list[bytes]) -> None:
        """Frames for ``events`` (the uncommon cases: binary frames, compression)."""
        for event in events:
            opcode, payload = wire.event_message(stream.prefix, event, stream.binary)
            if self.deflate:  # compressed per connection: the library frames it
                if opcode == wire.TEXT:
                    self.ws.send_text(payload)
                else:
                    self.ws.send_binary(payload)
            else:
                parts += (wire.frame_header(len(payload), opcode), payload)
        if self.deflate:
            parts += self.ws.data_to_send()

    def _wake(self, stream: Stream) -> None:
        self.sockets.wake(self, stream)

    # Per-delivery work below is kept flat (locals, no helper calls on the common path): with one
    # event per write it is, with the write itself, all a delivery costs.

    def flush(self) -> int:
        """Write the events of every ready subscription in one write; returns how many."""
        ready = self.ready
        if self.closing is not None or not ready:
            return 0
        if not self.writable:  # events wait in the hub's bounded queues; ends do not wait
            for stream in [s for s in ready if s.sub.ended is not None]:
                del ready[stream]
                self._ended(stream)
            return 0
        self.ready = {}
        parts: list[bytes] = []
        delivered = 0
        plain = not self.deflate
        header = wire.frame_header
        for stream in ready:
            sub = stream.sub
            events = sub.take(BATCH)
            if events:
                delivered += len(events)
                if plain and not stream.binary:
                    prefix = stream.prefix
                    extra = len(prefix) + 1
                    for event in events:
                        envelope = event.json()
                        parts += (header(len(envelope) + extra), prefix, envelope, b"}")
                else:
                    self._encode(stream, events, parts)
                if len(events) == BATCH:  # more may wait: the rest next round
                    self.ready[stream] = None
            elif sub.ended is not None:
                self._ended(stream)
            elif sub.catching_up and not stream.catching_up:
                stream.catching_up = True
                self.sockets.spawn(self._catch_up(stream), self)
        if self.closing is not None or self.transport is None:
            return delivered  # a subscription's end closed the connection
        if parts:
            self.transport.write(b"".join(parts))  # one buffer: uvloop's writelines is slower
        if self.ready:
            self.sockets.schedule(self)
        return delivered

    async def _catch_up(self, stream: Stream) -> None:
        """Write history until the subscription is live, then hand over to ``flush``."""
        sub = stream.sub
        try:
            while sub.catching_up and self.closing is None:
                if not self.writable:
                    await self._until_writable()
                    continue
                page = await sub.poll_batch(BATCH)
                if self.closing is not None or self.streams.get(stream.id) is not stream:
                    return
                if page:
                    parts: list[bytes] = []
                    self._encode(stream, page, parts)
                    assert self.transport is not None
                    self.transport.write(b"".join(parts))
                    self.sockets.delivered.inc(len(page))
        finally:
            stream.catching_up = False
        if self.streams.get(stream.id) is stream:
            self._wake(stream)

    def _ended(self, stream: Stream) -> None:
        if self.streams.get(stream.id) is not stream:
            return  # unsubscribed, or already ended with the connection
        sub = stream.sub
        if sub.ended == "lagged":
            why = sub.ended_why or "its queue overflowed"
            self.close(LAGGED, f"subscription {stream.id!r} lagged ({why}): resume from its cursor")
        elif sub.ended == "shutdown":
            self.close(GOING_AWAY, "server shutting down: reconnect and resume from your cursors")

    async def _until_writable(self) -> None:
        if self.writable:
            return
        if self._writable_waiter is None or self._writable_waiter.done():
            self._writable_waiter = self.loop.create_future()
        await self._writable_waiter

    def _release_writers(self) -> None:
        for waiter in (self._writable_waiter, self._window_waiter):
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

    def _send_protocol_data(self) -> None:
        """Write what websockets queued (handshake answers, pongs, close frames)."""
        transport = self.transport
        if transport is None:
            return
        for data in self.ws.data_to_send():
            if data:
                transport.write(data)
            else:  # end of stream: the close handshake finished, or failed
                transport.close()

    # -- closing -------------------------------------------------------------------------------

    def close(self, code: int, reason: str) -> None:
        """Start the close handshake; the ticker drops the socket if it does not finish."""
        if self.closing is not None:
            return
        self.closing = self.loop.time()
        self._end_streams()
        if self.ws.state is State.OPEN:
            self.ws.send_close(code, _reason(reason))
            self._send_protocol_data()
        elif self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def _end_streams(self) -> None:
        streams, self.streams = self.streams, {}
        self.ready.clear()
        for stream in streams.values():
            stream.sub.wakeup = None
            stream.sub.close()

    def tick(self, now: float, wall: float) -> None:
        """Deadlines, called by the server's ticker about every second."""
        if self.closing is not None:
            if now - self.closing > CLOSE_TIMEOUT:
                self.abort()
            return
        if self.opened is None:
            return
        s = self.settings
        grant = self.grant
        if grant is None:
            if now - self.opened > s.auth_timeout:
                self.close(
                    UNAUTHORIZED,
                    f"no credential within {s.auth_timeout:g} s (websocket.auth_timeout)",
                )
                return
        elif grant.expires is not None and wall >= grant.expires:
            self.close(UNAUTHORIZED, "token expired: send auth with a fresh token before exp")
            return
        if self.ping_sent is not None:
            if now - self.ping_sent > s.ping_timeout:
                self.close(INTERNAL_ERROR, "keepalive ping timeout")
        elif now - self.last_heard >= s.ping_interval:
            self.ping_payload = self.sockets.ping_payload()
            self.ping_sent = now
            self.ws.send_ping(self.ping_payload)
            self._send_protocol_data()

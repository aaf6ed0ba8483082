import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Event(_message.Message):
    __slots__ = ("id", "channel", "type", "source", "time", "datacontenttype", "data", "specversion")
    ID_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    DATACONTENTTYPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SPECVERSION_FIELD_NUMBER: _ClassVar[int]
    id: str
    channel: str
    type: str
    source: str
    time: _timestamp_pb2.Timestamp
    datacontenttype: str
    data: bytes
    specversion: str
    def __init__(self, id: _Optional[str] = ..., channel: _Optional[str] = ..., type: _Optional[str] = ..., source: _Optional[str] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., datacontenttype: _Optional[str] = ..., data: _Optional[bytes] = ..., specversion: _Optional[str] = ...) -> None: ...

class PublishRequest(_message.Message):
    __slots__ = ("channel", "type", "data", "content_type", "idempotency_key")
    CHANNEL_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    CONTENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    channel: str
    type: str
    data: bytes
    content_type: str
    idempotency_key: str
    def __init__(self, channel: _Optional[str] = ..., type: _Optional[str] = ..., data: _Optional[bytes] = ..., content_type: _Optional[str] = ..., idempotency_key: _Optional[str] = ...) -> None: ...

class PublishResponse(_message.Message):
    __slots__ = ("event", "replayed")
    EVENT_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    event: Event
    replayed: bool
    def __init__(self, event: _Optional[_Union[Event, _Mapping]] = ..., replayed: _Optional[bool] = ...) -> None: ...

class PublishBatchRequest(_message.Message):
    __slots__ = ("events",)
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[PublishRequest]
    def __init__(self, events: _Optional[_Iterable[_Union[PublishRequest, _Mapping]]] = ...) -> None: ...

class PublishBatchResponse(_message.Message):
    __slots__ = ("events",)
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[Event]
    def __init__(self, events: _Optional[_Iterable[_Union[Event, _Mapping]]] = ...) -> None: ...

class SubscribeRequest(_message.Message):
    __slots__ = ("channels", "since")
    CHANNELS_FIELD_NUMBER: _ClassVar[int]
    SINCE_FIELD_NUMBER: _ClassVar[int]
    channels: _containers.RepeatedScalarFieldContainer[str]
    since: str
    def __init__(self, channels: _Optional[_Iterable[str]] = ..., since: _Optional[str] = ...) -> None: ...

class Subscribed(_message.Message):
    __slots__ = ("cursor", "recovered", "reason")
    CURSOR_FIELD_NUMBER: _ClassVar[int]
    RECOVERED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    cursor: str
    recovered: bool
    reason: str
    def __init__(self, cursor: _Optional[str] = ..., recovered: _Optional[bool] = ..., reason: _Optional[str] = ...) -> None: ...

class SubscribeResponse(_message.Message):
    __slots__ = ("subscribed", "event")
    SUBSCRIBED_FIELD_NUMBER: _ClassVar[int]
    EVENT_FIELD_NUMBER: _ClassVar[int]
    subscribed: Subscribed
    event: Event
    def __init__(self, subscribed: _Optional[_Union[Subscribed, _Mapping]] = ..., event: _Optional[_Union[Event, _Mapping]] = ...) -> None: ...

class HistoryRequest(_message.Message):
    __slots__ = ("channels", "since", "limit")
    CHANNELS_FIELD_NUMBER: _ClassVar[int]
    SINCE_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    channels: _containers.RepeatedScalarFieldContainer[str]
    since: str
    limit: int
    def __init__(self, channels: _Optional[_Iterable[str]] = ..., since: _Optional[str] = ..., limit: _Optional[int] = ...) -> None: ...

class HistoryResponse(_message.Message):
    __slots__ = ("events", "cursor", "recovered", "reason", "more")
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    CURSOR_FIELD_NUMBER: _ClassVar[int]
    RECOVERED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    MORE_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[Event]
    cursor: str
    recovered: bool
    reason: str
    more: bool
    def __init__(self, events: _Optional[_Iterable[_Union[Event, _Mapping]]] = ..., cursor: _Optional[str] = ..., recovered: _Optional[bool] = ..., reason: _Optional[str] = ..., more: _Optional[bool] = ...) -> None: ...

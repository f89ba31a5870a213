import datetime

from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DeliveryState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DELIVERY_STATE_UNSPECIFIED: _ClassVar[DeliveryState]
    DELIVERY_STATE_SENT: _ClassVar[DeliveryState]
    DELIVERY_STATE_RETRYING: _ClassVar[DeliveryState]
    DELIVERY_STATE_REJECTED: _ClassVar[DeliveryState]
    DELIVERY_STATE_DEAD: _ClassVar[DeliveryState]
DELIVERY_STATE_UNSPECIFIED: DeliveryState
DELIVERY_STATE_SENT: DeliveryState
DELIVERY_STATE_RETRYING: DeliveryState
DELIVERY_STATE_REJECTED: DeliveryState
DELIVERY_STATE_DEAD: DeliveryState

class PublishEventRequest(_message.Message):
    __slots__ = ("event_type", "fields", "json", "producer")
    EVENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    FIELDS_FIELD_NUMBER: _ClassVar[int]
    JSON_FIELD_NUMBER: _ClassVar[int]
    PRODUCER_FIELD_NUMBER: _ClassVar[int]
    event_type: str
    fields: _struct_pb2.Struct
    json: str
    producer: str
    def __init__(self, event_type: _Optional[str] = ..., fields: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., json: _Optional[str] = ..., producer: _Optional[str] = ...) -> None: ...

class PublishEventResponse(_message.Message):
    __slots__ = ("event_id", "topic", "status")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    TOPIC_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    topic: str
    status: str
    def __init__(self, event_id: _Optional[str] = ..., topic: _Optional[str] = ..., status: _Optional[str] = ...) -> None: ...

class SendNotificationRequest(_message.Message):
    __slots__ = ("channel", "recipient", "subject", "body_text", "body_html", "data", "user_id")
    class DataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    CHANNEL_FIELD_NUMBER: _ClassVar[int]
    RECIPIENT_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    BODY_TEXT_FIELD_NUMBER: _ClassVar[int]
    BODY_HTML_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    channel: str
    recipient: str
    subject: str
    body_text: str
    body_html: str
    data: _containers.ScalarMap[str, str]
    user_id: str
    def __init__(self, channel: _Optional[str] = ..., recipient: _Optional[str] = ..., subject: _Optional[str] = ..., body_text: _Optional[str] = ..., body_html: _Optional[str] = ..., data: _Optional[_Mapping[str, str]] = ..., user_id: _Optional[str] = ...) -> None: ...

class SendNotificationResponse(_message.Message):
    __slots__ = ("notification_id", "status")
    NOTIFICATION_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    notification_id: str
    status: str
    def __init__(self, notification_id: _Optional[str] = ..., status: _Optional[str] = ...) -> None: ...

class GetNotificationRequest(_message.Message):
    __slots__ = ("notification_id",)
    NOTIFICATION_ID_FIELD_NUMBER: _ClassVar[int]
    notification_id: str
    def __init__(self, notification_id: _Optional[str] = ...) -> None: ...

class Delivery(_message.Message):
    __slots__ = ("generation", "channel", "recipient", "state", "attempts", "provider_response", "error_class", "first_attempt_at", "updated_at")
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_FIELD_NUMBER: _ClassVar[int]
    RECIPIENT_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_RESPONSE_FIELD_NUMBER: _ClassVar[int]
    ERROR_CLASS_FIELD_NUMBER: _ClassVar[int]
    FIRST_ATTEMPT_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    generation: int
    channel: str
    recipient: str
    state: DeliveryState
    attempts: int
    provider_response: str
    error_class: str
    first_attempt_at: _timestamp_pb2.Timestamp
    updated_at: _timestamp_pb2.Timestamp
    def __init__(self, generation: _Optional[int] = ..., channel: _Optional[str] = ..., recipient: _Optional[str] = ..., state: _Optional[_Union[DeliveryState, str]] = ..., attempts: _Optional[int] = ..., provider_response: _Optional[str] = ..., error_class: _Optional[str] = ..., first_attempt_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., updated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class GetNotificationResponse(_message.Message):
    __slots__ = ("notification_id", "deliveries")
    NOTIFICATION_ID_FIELD_NUMBER: _ClassVar[int]
    DELIVERIES_FIELD_NUMBER: _ClassVar[int]
    notification_id: str
    deliveries: _containers.RepeatedCompositeFieldContainer[Delivery]
    def __init__(self, notification_id: _Optional[str] = ..., deliveries: _Optional[_Iterable[_Union[Delivery, _Mapping]]] = ...) -> None: ...

"""Requests that do not parse, refused as bad input naming the field, not as a server fault.

grpcio parses each request with the method's `FromString` before any handler runs; proto3 `string`
fields must hold UTF-8, so a client sending other bytes got UNKNOWN "DecodeError", which reads
like our bug. `TolerantDecoding` swaps in a deserializer that, on a parse error, parses again with a
twin of the message whose strings are `bytes` (a private descriptor pool, built once per server)
to find the field at fault, and a handler that answers INVALID_ARGUMENT with that field's name.
Nothing changes for requests that parse: the twin is touched only after an error.

With `max_bytes` set, a message over it is refused the same way (INVALID_ARGUMENT, `request: N
bytes is over the limit of L bytes (<config key>)`) before it is parsed at all: grpc-core's own
cap answers RESOURCE_EXHAUSTED, the code of "queue full, retry later", so a server that wants its
size refusals read as final sets grpc-core's cap above `max_bytes` (see `grpc_receive_cap`) and
lets this decide.

Both sides use it: the router's public Generation service and the replica's EngineService.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.descriptor import Descriptor
from google.protobuf.message import DecodeError, Message
from grpc import aio

log = logging.getLogger(__name__)

GRPC_CAP_FACTOR = 16  # grpc-core's receive cap, in multiples of the size limit we enforce ourselves
GRPC_CAP_FLOOR = 32 << 20


def grpc_receive_cap(max_bytes: int) -> int:
    """grpc-core's `grpc.max_receive_message_length` for a server whose own limit is `max_bytes`.

    Up to this cap a too-big message reaches our deserializer and gets our INVALID_ARGUMENT naming
    the size and the limit; past it grpc-core refuses on the message's length prefix, before
    reading the body, with RESOURCE_EXHAUSTED "Received message larger than max (N vs. CAP)".
    The cap is what bounds memory: grpc-core assembles a message whole before handing it to
    Python, and the hop into Python copies it (measured: a 300 MB message peaks the server at
    ~3x its size, freed when the call ends), so one call costs at most ~3 x cap transiently; past
    the cap it costs nothing (measured: no growth for a 300 MB message over a 4 MiB cap). Hence a
    finite cap, not -1: unlimited would let one 4 GiB message (the gRPC length prefix's range)
    take ~12 GB."""
    return max(GRPC_CAP_FACTOR * max_bytes, GRPC_CAP_FLOOR)


@dataclass(frozen=True)
class Undecodable:
    """What the deserializer hands the handler in place of a request that did not parse."""

    field: str
    message: str

    @property
    def details(self) -> str:
        return f"{self.field}: {self.message}"


def _bad_utf8(msg: Message, strings: set[str], prefix: str = "") -> tuple[str, str] | None:
    """(field path as the client names it, reason) of the first string field that is not UTF-8."""
    for fd, value in msg.ListFields():
        path = prefix + fd.name
        if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
            fd = fd.message_type.fields_by_name["value"]  # keys stay strings (see loosen)
            items = [(f'{path}["{key}"]', item) for key, item in value.items()]
        elif fd.is_repeated:
            items = [(f"{path}[{i}]", item) for i, item in enumerate(value)]
        else:
            items = [(path, value)]
        for where, item in items:
            if fd.message_type is not None:
                found = _bad_utf8(item, strings, where + ".")
                if found:
                    return found
            elif fd.full_name in strings:
                try:
                    item.decode("utf-8")
                except UnicodeDecodeError as exc:
                    return where, f"must be UTF-8 text (invalid byte at offset {exc.start})"
    return None


class TolerantDecoding:
    """Every method's request deserializer made tolerant: a request that does not parse is
    refused with INVALID_ARGUMENT naming the field (or `request` when the bytes are not the
    message at all)."""

    def __init__(self, *files: Any, max_bytes: int | None = None, limit_key: str = "") -> None:
        """`files`: the generated modules' file descriptors whose messages the server receives;
        `max_bytes`: the largest message accepted (checked before parsing), `limit_key` the config
        key that sets it, named in the refusal."""
        self.max_bytes = max_bytes
        self.limit_key = limit_key
        self._pool = descriptor_pool.DescriptorPool()
        self._strings: set[str] = set()  # full names of the original string fields
        added: set[str] = set()
        for fd in files:
            self._add(fd, added)
        self._twins: dict[str, type[Message]] = {}

    def _add(self, file: Any, added: set[str]) -> None:
        if file.name in added:
            return
        for dep in file.dependencies:
            self._add(dep, added)
        proto = descriptor_pb2.FileDescriptorProto()
        file.CopyToProto(proto)

        def loosen(messages: Any, scope: str) -> None:
            for m in messages:
                for f in m.field:
                    if m.options.map_entry and f.name == "key":
                        continue  # map keys cannot be bytes; a bad key reads as a bad message
                    if f.type == descriptor_pb2.FieldDescriptorProto.TYPE_STRING:
                        f.type = descriptor_pb2.FieldDescriptorProto.TYPE_BYTES
                        self._strings.add(f"{scope}{m.name}.{f.name}")
                loosen(m.nested_type, f"{scope}{m.name}.")

        loosen(proto.message_type, f"{proto.package}." if proto.package else "")
        self._pool.Add(proto)
        added.add(file.name)

    def _twin(self, desc: Descriptor) -> type[Message]:
        if desc.full_name not in self._twins:
            self._twins[desc.full_name] = message_factory.GetMessageClass(self._pool.FindMessageTypeByName(desc.full_name))
        return self._twins[desc.full_name]

    def diagnose(self, cls: type[Message], data: bytes) -> Undecodable:
        """Why `data` is not a `cls`, naming the field when one is at fault."""
        try:
            twin = self._twin(cls.DESCRIPTOR).FromString(data)
        except (DecodeError, KeyError):
            return Undecodable("request", f"not a valid {cls.DESCRIPTOR.full_name} protobuf message")
        found = _bad_utf8(twin, self._strings)
        if found is None:
            return Undecodable("request", f"not a valid {cls.DESCRIPTOR.full_name} protobuf message")
        return Undecodable(*found)

    def deserializer(self, cls: type[Message]) -> Callable[[bytes], Any]:
        limit, key = self.max_bytes, f" ({self.limit_key})" if self.limit_key else ""

        def parse(data: bytes) -> Any:
            if limit is not None and len(data) > limit:  # refused unparsed: no work in proportion to it
                return Undecodable("request", f"{len(data)} bytes is over the limit of {limit} bytes{key}")
            try:
                return cls.FromString(data)
            except DecodeError:
                try:
                    return self.diagnose(cls, data)
                except Exception:  # noqa: BLE001 - a diagnosis never turns bad input into a server fault
                    log.exception("diagnosing an undecodable %s", cls.DESCRIPTOR.full_name)
                    return Undecodable("request", f"not a valid {cls.DESCRIPTOR.full_name} protobuf message")
        return parse

    def wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        """`handler` with the tolerant deserializer, refusing what did not parse."""
        parse = handler.request_deserializer
        cls = getattr(parse, "__self__", None)  # the generated code passes `Message.FromString`
        if handler.request_streaming or not isinstance(cls, type) or not issubclass(cls, Message):
            return handler
        if handler.response_streaming:
            inner_stream = handler.unary_stream

            async def stream(request: Any, context: aio.ServicerContext):
                if isinstance(request, Undecodable):
                    log.info("refused %s: %s", method, request.details)
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.details)
                async for item in inner_stream(request, context):
                    yield item

            return handler._replace(request_deserializer=self.deserializer(cls), unary_stream=stream)
        inner_unary = handler.unary_unary

        async def unary(request: Any, context: aio.ServicerContext):
            if isinstance(request, Undecodable):
                log.info("refused %s: %s", method, request.details)
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.details)
            return await inner_unary(request, context)

        return handler._replace(request_deserializer=self.deserializer(cls), unary_unary=unary)

    def add_servicer(self, add_to_server: Callable[[Any, Any], None], servicer: Any, server: aio.Server) -> None:
        """What the generated `add_XServicer_to_server(servicer, server)` does, with every handler
        wrapped: resolved once here, not per call as an interceptor would be."""
        captured = _Captured()
        add_to_server(servicer, captured)
        for service, handlers in captured.services.items():
            wrapped = {name: self.wrap(h, f"/{service}/{name}") for name, h in handlers.items()}
            server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, wrapped),))
            server.add_registered_method_handlers(service, wrapped)


class _Captured:
    """Stands in for the server while generated code registers its handlers."""

    def __init__(self) -> None:
        self.services: dict[str, dict[str, grpc.RpcMethodHandler]] = {}

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass  # the same handlers arrive through add_registered_method_handlers

    def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        self.services[service] = dict(handlers)

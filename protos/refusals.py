"""Why the coordinator refuses a request, and how the refusal travels: the Refusal codes, the exception that
carries one with its message, the one table from a code to its gRPC status, and the google.rpc.Status /
ErrorInfo pair a device reads the code back from (it decides by the code, never by the message)."""
from __future__ import annotations

import enum

import grpc


class Refusal(str, enum.Enum):
    """Why the server refuses a request. The value travels to the device as the reason of a google.rpc
    ErrorInfo in the status details (refusal_status below), beside the gRPC status code
    STATUS below maps each code to; a device decides by the code, never by the message."""
    INVALID = "invalid"            # the request is malformed or its payload does not match the plan
    PRECONDITION = "precondition"  # the request does not fit the round as it stands (closed, another round)
    UNKNOWN = "unknown"            # the device is not registered: register again
    EXISTS = "exists"              # the device's update is in or under way already
    EXHAUSTED = "exhausted"        # over a size limit
    UNAVAILABLE = "unavailable"    # the server is shutting down: retry later
    UNAUTHENTICATED = "unauthenticated"  # no or an unknown device token (server.auth)
    FORBIDDEN = "forbidden"        # the token belongs to another device (server.auth)


class UpdateRejected(Exception):
    """A request the server refuses, with its Refusal code and a message that says what was wrong."""

    def __init__(self, code: Refusal | str, message: str) -> None:
        super().__init__(message)
        self.code = Refusal(code)
        self.message = message


# Each refusal code's gRPC status: the one table (the servicer and the auth interceptors use it).
STATUS = {
    Refusal.INVALID: grpc.StatusCode.INVALID_ARGUMENT,
    Refusal.PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
    Refusal.UNKNOWN: grpc.StatusCode.FAILED_PRECONDITION,
    Refusal.EXISTS: grpc.StatusCode.ALREADY_EXISTS,
    Refusal.EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Refusal.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    Refusal.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    Refusal.FORBIDDEN: grpc.StatusCode.PERMISSION_DENIED,
}


# Refusals travel as the ecosystem's rich error model: a google.rpc.Status whose details hold an ErrorInfo
# (reason = the refusal code in upper case, domain "edgelora"), in the grpc-status-details-bin trailer
# (grpcio-status). A device decides by the reason (e.g. UNKNOWN: register again), never by the message text.
ERROR_DOMAIN = "edgelora"


def refusal_status(code: str, status: grpc.StatusCode, message: str) -> grpc.Status:
    """The grpc.Status to abort with (context.abort_with_status) for refusal `code` ("unknown", ...)."""
    from google.protobuf import any_pb2
    from google.rpc import error_details_pb2, status_pb2
    from grpc_status import rpc_status

    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.ErrorInfo(reason=code.upper(), domain=ERROR_DOMAIN))
    return rpc_status.to_status(status_pb2.Status(code=status.value[0], message=message, details=[detail]))


def refusal_code(error) -> str:
    """The refusal code ("unknown", ...) of a grpc.RpcError from the coordinator: its ErrorInfo reason in
    lower case; "" when it carries none (e.g. the channel never connected)."""
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    try:
        status = rpc_status.from_call(error)
    except (AttributeError, ValueError):  # not a call, or a details trailer that disagrees with the status
        return ""
    for detail in status.details if status is not None else ():
        info = error_details_pb2.ErrorInfo()
        if detail.Is(info.DESCRIPTOR) and detail.Unpack(info) and info.domain == ERROR_DOMAIN:
            return info.reason.lower()
    return ""

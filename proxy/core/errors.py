"""The gateway's one error tree.

Every failure a client can see is a `GatewayError`. Each class knows its HTTP status and its
OpenAI-style error `type`/`code`; `to_body()` renders the JSON the client gets, and the same body
becomes an SSE error event once a stream has started. Foreign exceptions (httpx, h11, OS) are
translated into this tree once, at the boundary that meets them (`proxy/transport/upstream.py`).

Two renderings of the same error: `to_body()` is OpenAI's shape (every endpoint but one);
`to_anthropic_body()` is Anthropic's `{"type": "error", "error": {"type", "message"}}`, used on
`/v1/messages` so the `anthropic` SDK raises its own matching exception class.

Retry classification lives in one place, `proxy.routing.policy.classify`. Anthropic's
`overloaded_error` (HTTP 529, or an `error` event mid-stream) becomes an `UpstreamStatusError`
with `upstream_status = 529`: the client sees 502 like any provider 5xx, and the router retries it
exactly like a 503.

    GatewayError                      500 api_error
    ├── ConfigError                   (not an HTTP error: raised at start, names key/value/expected)
    ├── InvalidRequest                400 invalid_request_error
    ├── AuthenticationFailed          401 invalid_api_key
    ├── Forbidden                     403 forbidden
    │   ├── ModelNotAllowed           403 model_not_allowed (not in the virtual key's models)
    │   └── AdminOnly                 403 admin_only (a virtual key on /admin/*)
    ├── NotFound                      404 not_found
    │   └── ModelNotFound             404 model_not_found
    ├── MethodNotAllowed              405
    ├── PayloadTooLarge               413
    ├── UpstreamError                 502 upstream_error (provider 5xx, connect failure, bad stream)
    │   ├── UpstreamStatusError       provider's own 4xx/5xx passed through with its status
    │   │   └── UpstreamRateLimited   429 passed through with its Retry-After
    │   ├── ToolArgumentsInvalid      a finished tool call's arguments fail its schema (tool_arguments = "validate")
    │   └── UpstreamTimeout           504 (connect, first byte or read took too long)
    │       └── FirstTokenTimeout     no first token within ttft_timeout (the router fails over)
    ├── Saturated                     429 gateway_saturated (a deployment's max_concurrency stayed full)
    ├── NoHealthyDeployment           503 no_healthy_deployment (or 429 when only rate-limit cooling)
    ├── RateLimitExceeded             429 rate_limit_exceeded (a key's rpm/tpm/max_parallel), Retry-After
    ├── BudgetExceeded                429 budget_exceeded (kill_at reached or no room to reserve), Retry-After
    ├── StoreUnavailable              503 store_unavailable (keys/spend store down: fail closed)
    ├── ClientStalled                 (a write to the client stayed pending past write_timeout)
    └── ShuttingDown                  503 (the drain timeout ended the stream)

Echoed input is bounded: a value a client or provider sent that a message repeats goes through
`clip` (MAX_ECHO characters), and every message, param, type and code is cut at MAX_MESSAGE
whatever built it, so no error body or log line grows with what was sent (a 1 MB model name).
"""

from __future__ import annotations

import math
from typing import Any


# HTTP status -> Anthropic error type (docs.anthropic.com/en/api/errors).
ANTHROPIC_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                         403: "permission_error", 404: "not_found_error", 405: "invalid_request_error",
                         413: "request_too_large", 429: "rate_limit_error", 500: "api_error",
                         502: "api_error", 503: "overloaded_error", 504: "api_error",
                         529: "overloaded_error"}


MAX_ECHO = 200  # characters of an echoed value (a model name, a path, a header)
MAX_MESSAGE = 1000  # characters of any error message, param, type or code


def clip(value: object, limit: int = MAX_ECHO) -> str:
    """`value` as text of at most about `limit` characters, marked where it was cut."""
    text = value if isinstance(value, str) else str(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}…[{len(text) - limit} more characters]"


def retry_after_header(seconds: float) -> list[tuple[bytes, bytes]]:
    """Retry-After in whole seconds, at least 1 (0 would invite an immediate retry storm)."""
    return [(b"retry-after", str(max(1, math.ceil(seconds))).encode())]


class GatewayError(Exception):
    status = 500
    type = "api_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        message = clip(message, MAX_MESSAGE)
        super().__init__(message)
        self.message = message
        self.param = None if param is None else clip(param, MAX_ECHO)
        if code is not None:
            self.code = clip(code, MAX_ECHO)

    def headers(self) -> list[tuple[bytes, bytes]]:
        """Extra response headers this error carries (e.g. Retry-After)."""
        return []

    def to_body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    @property
    def anthropic_type(self) -> str:
        return ANTHROPIC_ERROR_TYPES.get(self.status, "api_error")

    def to_anthropic_body(self) -> dict[str, Any]:
        return {"type": "error", "error": {"type": self.anthropic_type, "message": self.message}}


class ConfigError(GatewayError):
    def __init__(self, key: str, value: object, expected: str):
        super().__init__(f"config: {key} = {value!r}: expected {expected}")
        self.key = key
        self.value = value
        self.expected = expected


class InvalidRequest(GatewayError):
    status = 400
    type = "invalid_request_error"


class AuthenticationFailed(GatewayError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class Forbidden(GatewayError):
    status = 403
    type = "invalid_request_error"
    code = "forbidden"


class NotFound(GatewayError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class MethodNotAllowed(GatewayError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"

    def __init__(self, message: str, *, allow: str):
        super().__init__(message)
        self.allow = allow

    def headers(self) -> list[tuple[bytes, bytes]]:
        return [(b"allow", self.allow.encode())]


class PayloadTooLarge(GatewayError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class UpstreamError(GatewayError):
    status = 502
    type = "api_error"
    code = "upstream_error"


class UpstreamStatusError(UpstreamError):
    """The provider answered with an error status; the client sees that status and message."""

    def __init__(self, message: str, *, status: int, type: str | None = None,
                 code: str | None = None, param: str | None = None):
        super().__init__(message, param=param, code=code)
        # A provider 5xx is our 502: the client's request was fine, the hop behind us failed.
        self.status = status if status < 500 else 502
        self.upstream_status = status
        if type:
            self.type = clip(type)

    @property
    def anthropic_type(self) -> str:
        # The provider's own status decides: a 529 stays "overloaded_error" although we answer 502.
        return ANTHROPIC_ERROR_TYPES.get(self.upstream_status,
                                         ANTHROPIC_ERROR_TYPES.get(self.status, "api_error"))


class UpstreamRateLimited(UpstreamStatusError):
    def __init__(self, message: str, *, retry_after: str | None, **kw: Any):
        super().__init__(message, status=429, **kw)
        self.retry_after = retry_after

    def headers(self) -> list[tuple[bytes, bytes]]:
        if self.retry_after is None:
            return []
        return [(b"retry-after", self.retry_after.encode("latin-1"))]


class ToolArgumentsInvalid(UpstreamError):
    """The model produced a tool call whose arguments are not valid for the tool's schema.

    Retryable: another sample may well be valid. Raised only with `tool_arguments = "validate"`.
    """

    code = "tool_arguments_invalid"


class UpstreamTimeout(UpstreamError):
    status = 504
    type = "api_error"
    code = "upstream_timeout"


class ClientStalled(GatewayError):
    code = "client_stalled"


class ShuttingDown(GatewayError):
    status = 503
    type = "api_error"
    code = "server_shutting_down"


class Saturated(GatewayError):
    """A deployment's or a provider's max_concurrency stayed full for queue_timeout (our admission
    control)."""

    status = 429
    type = "rate_limit_error"
    code = "gateway_saturated"

    def headers(self) -> list[tuple[bytes, bytes]]:
        return [(b"retry-after", b"1")]


class NoHealthyDeployment(GatewayError):
    """Every deployment of the model and its fallbacks is open or cooling down (503), or only
    cooling down after provider 429s with a long Retry-After (429)."""

    status = 503
    type = "api_error"
    code = "no_healthy_deployment"

    def __init__(self, message: str, *, retry_after: float | None = None, rate_limited: bool = False):
        super().__init__(message)
        self.retry_after = retry_after
        if rate_limited:  # only cooling after providers' 429s: say so, as the provider would
            self.status, self.type, self.code = 429, "rate_limit_error", "rate_limit_exceeded"

    def headers(self) -> list[tuple[bytes, bytes]]:
        return [] if self.retry_after is None else retry_after_header(self.retry_after)


class FirstTokenTimeout(UpstreamTimeout):
    code = "first_token_timeout"


class RequestTimeout(UpstreamTimeout):
    """The request's whole time (`router.request_timeout`, retries and streaming included) ran
    out. The failover says so with the figures; no verdict on the deployment that was serving."""


# -- virtual keys, limits and budgets (proxy/keys) --

class ModelNotAllowed(Forbidden):
    """The virtual key's `models` list does not cover the model asked for."""

    code = "model_not_allowed"


class AdminOnly(Forbidden):
    """A client (virtual) key on an /admin/* endpoint: only the master key administers."""

    code = "admin_only"


class _RetryAfter(GatewayError):
    status = 429
    type = "rate_limit_error"

    def __init__(self, message: str, *, retry_after: float, param: str | None = None):
        super().__init__(message, param=param)
        self.retry_after = retry_after

    def headers(self) -> list[tuple[bytes, bytes]]:
        return retry_after_header(self.retry_after)


class RateLimitExceeded(_RetryAfter):
    """A key's rpm, tpm or max_parallel would be passed by this request."""

    code = "rate_limit_exceeded"


class BudgetExceeded(_RetryAfter):
    """A key's, team's or the global budget reached kill_at, or cannot hold this request's reservation."""

    code = "budget_exceeded"


class StoreUnavailable(GatewayError):
    """The key/spend store cannot be reached (fail closed: nothing is served unaccounted)."""

    status = 503
    type = "api_error"
    code = "store_unavailable"

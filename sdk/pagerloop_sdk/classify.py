"""How a failed call is counted: the contract's statuses from exceptions, HTTP codes and names."""

from __future__ import annotations

# Exception class names (as the SDK raises them and as OTel's `error.type` reports them)
# with the status and HTTP code they stand for.
_BY_NAME: dict[str, tuple[str, int | None]] = {
    "RateLimitError": ("rate_limited", 429),
    "InternalServerError": ("server_error", 500),
    "APITimeoutError": ("timeout", None),
    "Timeout": ("timeout", None),
    "TimeoutError": ("timeout", None),
    "ReadTimeout": ("timeout", None),
    "ConnectTimeout": ("timeout", None),
    # The provider could not be reached: for outage detection this is the server's failure.
    "APIConnectionError": ("server_error", None),
    "BadRequestError": ("error", 400),
    "AuthenticationError": ("error", 401),
    "PermissionDeniedError": ("error", 403),
    "NotFoundError": ("error", 404),
    "ConflictError": ("error", 409),
    "UnprocessableEntityError": ("error", 422),
    # Error codes in a Responses API body (`status: failed`) or stream `error` event.
    "server_error": ("server_error", None),
    "rate_limit_exceeded": ("rate_limited", 429),
}


def status_for_http(code: int) -> str:
    if code == 429:
        return "rate_limited"
    if code == 408:
        return "timeout"
    if code >= 500:
        return "server_error"
    if code >= 400:
        return "error"
    return "success"


def status_for_error_type(error_type: str) -> tuple[str, int | None]:
    """`openai.RateLimitError`, `RateLimitError` or `429` → (status, HTTP code)."""
    name = error_type.rsplit(".", 1)[-1]
    if name.isdigit():
        code = int(name)
        return status_for_http(code), code
    return _BY_NAME.get(name, ("error", None))


def classify_exception(exc: BaseException) -> tuple[str, int | None]:
    """(status, HTTP code) for an exception the OpenAI SDK raised."""
    code = getattr(exc, "status_code", None)
    if isinstance(code, int):
        return status_for_http(code), code
    for cls in type(exc).__mro__:
        if cls.__name__ in _BY_NAME:
            return _BY_NAME[cls.__name__]
    return "error", None

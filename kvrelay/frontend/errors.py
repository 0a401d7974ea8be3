"""OpenAI-style API errors: the status code table and the JSON error body.

Owns: `ApiError` (raised anywhere in the frontend, rendered by the app) and the mapping from
worker-side `WireError` kinds and typed kvrelay errors to HTTP statuses. Imports L0 only.

| status | when                                                                  |
| ------ | --------------------------------------------------------------------- |
| 400    | malformed JSON, bad parameter values, prompt over the context length, |
|        | unsupported options (logprobs, tools, ...), invalid token ids         |
| 401    | --api-key set and the Bearer token is missing or wrong                |
| 404    | unknown model or route                                                |
| 413    | request body larger than the limit                                    |
| 422    | JSON of the wrong shape: missing field, wrong type                    |
| 503    | no live worker, all saturated (with Retry-After), a worker failed     |
"""

from __future__ import annotations

from typing import Any

from kvrelay.errors import InvalidRequestError, PromptTooLongError, ServiceUnavailableError
from kvrelay.protocol import WireError

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    500: "internal_error",
    503: "service_unavailable",
}


class ApiError(Exception):
    """An error the client gets as `{"error": {...}}` with `status`."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        retry_after_s: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.retry_after_s = retry_after_s

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": ERROR_TYPES.get(self.status, "error"),
                "param": self.param,
                "code": self.code,
            }
        }

    def headers(self) -> dict[str, str]:
        return {} if self.retry_after_s is None else {"Retry-After": str(self.retry_after_s)}


def from_wire(error: WireError, worker_id: str) -> ApiError:
    """A worker-reported failure as the error the client sees."""
    if error.kind == "prompt_too_long":
        return ApiError(400, error.message, code="context_length_exceeded")
    if error.kind in ("invalid_request", "invalid_sampling"):
        return ApiError(400, error.message, code=error.kind)
    if error.kind == "draining":
        return ApiError(
            503, f"worker {worker_id} is shutting down", code="worker_draining", retry_after_s=1
        )
    return ApiError(503, f"worker {worker_id} failed: {error.message}", code="worker_failed")


def from_exception(exc: Exception) -> ApiError:
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, PromptTooLongError):
        return ApiError(400, str(exc), code="context_length_exceeded")
    if isinstance(exc, InvalidRequestError):
        return ApiError(400, str(exc))
    if isinstance(exc, ServiceUnavailableError):
        code = getattr(exc, "code", "service_unavailable")
        return ApiError(503, str(exc), code=code, retry_after_s=1)
    return ApiError(500, f"internal error: {type(exc).__name__}: {exc}", code="internal_error")

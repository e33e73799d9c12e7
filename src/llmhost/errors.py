"""One error hierarchy for llmhost: each error carries a user-facing message, an HTTP status and
an OpenAI-style error type, so the CLI prints one line and the API answers with a proper body.

    LlmhostError
    ├── ConfigError(ValueError)               bad settings or flags              (CLI exit 2)
    ├── InvalidRequest(ValueError)            400 invalid_request_error
    │   ├── ContextLengthExceeded             400 code=context_length_exceeded
    │   ├── PayloadTooLarge                   413 code=request_too_large
    │   └── UriTooLong                        414 code=uri_too_long
    ├── AuthenticationError                   401 authentication_error
    ├── PermissionDenied                      403 permission_error
    ├── NotFound(LookupError)                 404 not_found_error
    │   └── ModelNotFound                     404 code=model_not_found
    ├── Conflict                              409 conflict (e.g. unloading a busy model)
    ├── RateLimited                           429 rate_limit_error (retry_after seconds)
    ├── ServiceUnavailable                    503 service_unavailable
    │   ├── EngineNotReady                    503 code=engine_not_ready
    │   └── Overloaded                        503 code=overloaded
    ├── EngineError(RuntimeError)             500 engine_error
    │   └── ModelLoadError                    500 code=model_load_error
    ├── DownloadError(OSError)                a remote source failed after retries
    ├── InsufficientStorage(OSError)          not enough free disk for a download
    ├── IntegrityError                        a file failed its checksum, layout or authentication
    │   └── DecryptionError                   wrong key, tampered or truncated ciphertext
    ├── BackupError                           a backup is missing, damaged or cannot be restored
    └── DeployError                           a deploy did not go live (smoke test, rollback)
"""

from __future__ import annotations


class LlmhostError(Exception):
    """Base of every error llmhost raises on purpose."""

    status_code: int = 500
    error_type: str = "internal_error"
    code: str | None = None
    exit_code: int = 1

    def __init__(self, message: str, *, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.param = param

    def to_openai(self) -> dict:
        """The body OpenAI clients expect: {"error": {"message", "type", "param", "code"}}."""
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        }


class ConfigError(LlmhostError, ValueError):
    status_code = 500
    error_type = "configuration_error"
    exit_code = 2


class InvalidRequest(LlmhostError, ValueError):
    status_code = 400
    error_type = "invalid_request_error"


class ContextLengthExceeded(InvalidRequest):
    code = "context_length_exceeded"


class PayloadTooLarge(InvalidRequest):
    status_code = 413
    code = "request_too_large"


class UriTooLong(InvalidRequest):
    status_code = 414
    code = "uri_too_long"


class AuthenticationError(LlmhostError):
    status_code = 401
    error_type = "authentication_error"


class PermissionDenied(LlmhostError):
    status_code = 403
    error_type = "permission_error"


class NotFound(LlmhostError, LookupError):
    status_code = 404
    error_type = "not_found_error"


class ModelNotFound(NotFound):
    code = "model_not_found"


class Conflict(LlmhostError):
    status_code = 409
    error_type = "conflict_error"


class RateLimited(LlmhostError):
    status_code = 429
    error_type = "rate_limit_error"

    def __init__(self, message: str, *, retry_after: float = 1.0, code: str | None = None):
        super().__init__(message, code=code)
        self.retry_after = retry_after


class ServiceUnavailable(LlmhostError):
    status_code = 503
    error_type = "service_unavailable"

    def __init__(self, message: str, *, retry_after: float | None = None, code: str | None = None):
        super().__init__(message, code=code)
        self.retry_after = retry_after


class EngineNotReady(ServiceUnavailable):
    code = "engine_not_ready"


class Overloaded(ServiceUnavailable):
    code = "overloaded"


class EngineError(LlmhostError, RuntimeError):
    status_code = 500
    error_type = "engine_error"


class ModelLoadError(EngineError):
    code = "model_load_error"


class DownloadError(LlmhostError, OSError):
    status_code = 502
    error_type = "download_error"


class InsufficientStorage(LlmhostError, OSError):
    status_code = 507
    error_type = "insufficient_storage"


class IntegrityError(LlmhostError):
    status_code = 500
    error_type = "integrity_error"


class DecryptionError(IntegrityError):
    code = "decryption_failed"


class BackupError(LlmhostError):
    """A backup that is missing, damaged, or cannot be restored as asked."""


class DeployError(LlmhostError):
    """A deploy that did not go live: smoke test failed, rolled back, router unreachable."""

import pytest

from llmhost import errors as E


@pytest.mark.parametrize(
    "exc, status, type_, code",
    [
        (E.InvalidRequest("x"), 400, "invalid_request_error", None),
        (E.ContextLengthExceeded("x"), 400, "invalid_request_error", "context_length_exceeded"),
        (E.AuthenticationError("x"), 401, "authentication_error", None),
        (E.PermissionDenied("x"), 403, "permission_error", None),
        (E.ModelNotFound("x"), 404, "not_found_error", "model_not_found"),
        (E.RateLimited("x", retry_after=2), 429, "rate_limit_error", None),
        (E.Overloaded("x"), 503, "service_unavailable", "overloaded"),
        (E.EngineNotReady("x"), 503, "service_unavailable", "engine_not_ready"),
        (E.EngineError("x"), 500, "engine_error", None),
        (E.ModelLoadError("x"), 500, "engine_error", "model_load_error"),
    ],
)
def test_status_and_openai_body(exc, status, type_, code):
    assert exc.status_code == status
    body = exc.to_openai()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"] == "x"
    assert body["error"]["type"] == type_
    assert body["error"]["code"] == code


def test_two_bases_let_callers_catch_either():
    with pytest.raises(LookupError):
        raise E.ModelNotFound("m")
    with pytest.raises(ValueError):
        raise E.InvalidRequest("bad")
    with pytest.raises(ValueError):
        raise E.ConfigError("bad")
    with pytest.raises(RuntimeError):
        raise E.EngineError("boom")
    assert issubclass(E.ContextLengthExceeded, E.InvalidRequest)


def test_explicit_code_and_param_override():
    e = E.InvalidRequest("m", code="c", param="p")
    assert e.to_openai()["error"]["code"] == "c"
    assert e.to_openai()["error"]["param"] == "p"

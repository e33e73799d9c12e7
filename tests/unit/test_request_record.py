"""The per-request record the serving layer fills and the audit, limits and metrics read."""

from llmhost.api.record import RECORD_KEY, RequestRecord, request_record
from llmhost.types import Usage


def test_tokens_are_the_final_usage_else_so_far_else_those_sent():
    rec = RequestRecord(tokens_sent=3)
    assert rec.tokens() == Usage(0, 3)  # an engine that reports usage only at the end
    rec.usage_so_far = Usage(5, 2)
    assert rec.tokens() == Usage(5, 2)  # a stream cut midway
    rec.usage = Usage(5, 4)
    assert rec.tokens() == Usage(5, 4)
    assert RequestRecord(usage=Usage(0, 0), usage_so_far=Usage(5, 2)).tokens() == Usage(0, 0)


def test_one_record_per_scope_made_on_first_use():
    scope: dict = {"type": "http"}
    rec = request_record(scope)
    assert scope["state"][RECORD_KEY] is rec
    assert request_record(scope) is rec
    assert request_record({"type": "http"}) is not rec

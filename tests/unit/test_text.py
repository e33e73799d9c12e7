import pytest

from llmhost.engines.base import StopMatcher, check_context
from llmhost.engines.chat_template import FALLBACK_TEMPLATE, render_chat
from llmhost.errors import ContextLengthExceeded, InvalidRequest


def run(stops, pieces):
    m = StopMatcher(stops)
    out = []
    for p in pieces:
        text, hit = m.feed(p)
        out.append(text)
        if hit:
            return "".join(out), True
    return "".join(out) + m.flush(), False


@pytest.mark.parametrize(
    "stops, pieces, expected",
    [
        ([], ["a", "b"], ("ab", False)),
        (["END"], ["hello ", "E", "N", "D", " more"], ("hello ", True)),
        (["END"], ["hello E", "NX"], ("hello ENX", False)),
        (["\n\n"], ["a\n", "\nb"], ("a", True)),
        (["ab", "b"], ["xa", "b"], ("x", True)),
        (["stop"], ["sto"], ("sto", False)),  # held text is released at the end
        (["aaa"], ["aa", "aa"], ("", True)),
    ],
)
def test_stop_matcher(stops, pieces, expected):
    assert run(stops, pieces) == expected


def test_stop_matcher_never_emits_part_of_a_stop():
    m = StopMatcher(["<|end|>"])
    emitted = ""
    for ch in "answer<|end|>":
        text, hit = m.feed(ch)
        emitted += text
        assert "<" not in emitted
        if hit:
            break
    assert emitted == "answer" and hit


def test_check_context():
    assert check_context(10, 5, 100) == 5
    assert check_context(10, None, 100) == 90
    with pytest.raises(ContextLengthExceeded, match="maximum context length is 100"):
        check_context(100, 1, 100)
    with pytest.raises(ContextLengthExceeded, match="at most 10"):
        check_context(90, 11, 100)
    with pytest.raises(ContextLengthExceeded):
        check_context(0, 1, 100)


def test_fallback_template_is_chatml():
    text = render_chat([{"role": "user", "content": "hi"}], None)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert FALLBACK_TEMPLATE


def test_template_bos_is_not_doubled():
    tpl = "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
    assert render_chat([{"role": "user", "content": "x"}], tpl, bos_token="<s>") == "[user]x"


def test_template_raise_exception_is_a_400():
    tpl = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(InvalidRequest, match="roles must alternate"):
        render_chat([{"role": "user", "content": "x"}], tpl)


def test_template_sandbox_blocks_internals():
    tpl = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(InvalidRequest):
        render_chat([{"role": "user", "content": "x"}], tpl)


def test_broken_template_is_a_400():
    with pytest.raises(InvalidRequest):
        render_chat([{"role": "user", "content": "x"}], "{% for %}")

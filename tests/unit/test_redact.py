import pytest

from llmhost.security.redact import Redactor, luhn_ok, valid_card, valid_cn_id

R = Redactor()
RIP = Redactor(ip=True)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("mail me: zhang.san+llm@example.com.cn", "mail me: [EMAIL]"),
        ("手机 13812345678 或 +86 138-1234-5678", "手机 [PHONE] 或 [PHONE]"),
        ("call +1 (415) 555-2671 now", "call [PHONE] now"),
        ("call +44 20 7946 0958", "call [PHONE]"),
        ("身份证 11010519491231002X 已核验", "身份证 [ID_CN] 已核验"),
        ("id 110105194912310021x", "id 110105194912310021x"),  # 19 chars: not an ID
        ("card 4111 1111 1111 1111 exp", "card [BANK_CARD] exp"),
        ("card 4111-1111-1111-1111", "card [BANK_CARD]"),
        ("unionpay 6222021234567890128", "unionpay [BANK_CARD]"),
        ("password=hunter2&user=bob", "password=[PASSWORD]&user=bob"),
        ('{"api_key": "abc 123 secret"}', '{"api_key": "[PASSWORD]"}'),
        ("密码：abc123", "密码：[PASSWORD]"),
        ("key sk-proj-AbCdEfGhIjKlMnOpQrStUv123", "key [API_KEY]"),
        ("Authorization: Bearer abcdefghijklmnop1234", "Authorization: Bearer [API_KEY]"),
        ("aws AKIAIOSFODNN7EXAMPLE", "aws [API_KEY]"),
        (
            "jwt eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9",
            "jwt [JWT]",
        ),
    ],
)
def test_true_positives(text, expected):
    assert R.redact(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "order 12345 shipped on 2024-01-15 at 10:30",
        "the total is 1234567890123456 units",  # 16 digits, no card prefix
        "4111111111111112",  # Luhn fails
        "timestamp 1700000000000 ms",
        "invoice 123456789012345678",  # 18 digits, no valid birth date
        "ID 110105194912310022",  # check digit wrong
        "version 1.2.3.4 and 10.0.0.1",  # IP addresses are kept unless configured
        "pi is 3.14159265358979323846",
        "year 2023, population 1411750000",
        "price ¥1,000,000 or $12,345.67",
        "user@localhost is not an address",
    ],
)
def test_no_false_positives(text):
    assert R.redact(text) == text


def test_ip_addresses_when_configured():
    assert RIP.redact("from 192.168.1.20 and 2001:db8::8a2e:370:7334") == "from [IP] and [IP]"
    assert RIP.redact("version 1.2.3") == "version 1.2.3"


def test_extra_patterns_and_counts():
    r = Redactor(extra={"employee": r"\bEMP-\d{6}\b"})
    text, counts = r.redact_counted("EMP-123456 wrote to a@b.io and c@d.io")
    assert text == "[EMPLOYEE] wrote to [EMAIL] and [EMAIL]"
    assert counts == {"EMPLOYEE": 1, "EMAIL": 2}


def test_check_digit_helpers():
    assert valid_cn_id("11010519491231002X") and valid_cn_id("11010519491231002x")
    assert not valid_cn_id("11010519491331002X")  # month 13
    assert luhn_ok("79927398713") and not luhn_ok("79927398710")
    assert valid_card("378282246310005") and not valid_card("1234567812345670")


def test_application_logs_are_redacted(capsys):
    import logging

    from llmhost.observability.logs import setup_logging

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        setup_logging("info", "json")
        logging.getLogger("llmhost.test").warning(
            "login by %s with password=%s", "a@b.io", "hunter2"
        )
    finally:
        root.handlers[:], _ = saved[0], root.setLevel(saved[1])
    err = capsys.readouterr().err
    assert "a@b.io" not in err and "hunter2" not in err
    assert "[EMAIL]" in err and "password=[PASSWORD]" in err

"""Log lines lose their secrets (``comfyfleet.redaction``). A rule runs only on lines holding its words, which
must never change a line's redaction: a property test holds :func:`redact` to every rule applied to every line."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from comfyfleet.redaction import _RULES, redact

_PIECES = st.sampled_from(
    [
        "token=", "Token: ", "x-api-key: ", "'secret': '", "password=", "PASSWD=", "sig=", "session_id=",
        "Authorization: ", "Bearer ", "basic ", "BASIC ", "https://", "postgresql://user:", "@host/db", "whsec_",
        "WHSEC_", "abcdefgh1234", "=", ":", " ", "'", '"', "&", "task_id=", "monkey=", "signal=", "/ws?",
        "cookie=", "JWT ", "apikey=", "\u017fecret=", "api_\u212aey=", "s\u0131g=",
    ]
)  # fmt: skip
_LINES = st.lists(st.one_of(_PIECES, st.text(max_size=8)), max_size=14).map("".join)


def _every_rule(text: str) -> str:
    for _, pattern, replacement in _RULES:
        text = pattern.sub(replacement, text)
    return text


@settings(max_examples=400, deadline=None)
@given(_LINES)
def test_skipping_the_rules_whose_words_a_line_lacks_changes_nothing(line: str) -> None:
    assert redact(line) == _every_rule(line)


def test_secrets_are_masked_and_plain_lines_kept() -> None:
    line = "GET https://u:pw@h/x?token=abc&task_id=7 Authorization: Bearer abcdefgh secret whsec_abc="
    assert redact(line) == "GET https://u:***@h/x?token=***&task_id=7 Authorization: *** *** secret whsec_***"
    plain = "task_completed task_id=6701f3a3 worker_id=bench-0 outputs=1"
    assert redact(plain) == plain

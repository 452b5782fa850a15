"""Secrets out of log lines: API keys, webhook secrets, passwords and tokens in URLs and headers.

Our own lines never print a secret on purpose, but others' do: the HTTP server logs a WebSocket handshake with
its query string (``/ws?token=KEY``) even with its access log off, and at debug level the WebSocket library
logs every request header (``Authorization``), the HTTP clients the URLs they fetch (a webhook or an input URL
may carry a token in its query). :class:`RedactingFormatter` is what the CLI formats every log line with,
so whatever the source, the line written is :func:`redact`-ed, tracebacks included.
"""

from __future__ import annotations

import logging
import re

MASK = "***"

# Name parts that make a parameter, field or header a secret: `token`, `api_key`, `X-Amz-Signature`,
# `webhook_secret`, `password`… (a whole part, so `signal` or `monkey` are not).
_SECRET_PARTS = (
    "token|key|apikey|secret|signature|sig|password|passwd|pwd|credential|credentials|auth|authorization|"
    "cookie|session|jwt|bearer"
)
_SECRET_NAME = rf"[\w.-]*?(?<![a-z0-9])(?:{_SECRET_PARTS})(?![a-z0-9])[\w.-]*"

# Each rule: words the line (in lower case) holds whenever the rule can match, its pattern, its replacement.
# A pattern costs tens of microseconds per line; looking for its words, about one. (Replacements add no
# words, so a rule skipped for the line as logged would not have matched the line as the rules before left it.)
_RULES: tuple[tuple[tuple[str, ...], re.Pattern[str], str], ...] = (
    # A URL's user information: scheme://user:password@host.
    (("://",), re.compile(r"(\b[a-z][a-z0-9+.-]*://[^/\s:@]*:)[^/\s@]+@", re.IGNORECASE), rf"\1{MASK}@"),
    # An authorization scheme and its credentials: "Bearer KEY", "Basic dXNlcjpwdw==".
    (
        ("bearer", "basic"),
        re.compile(r"\b(bearer|basic)(\s+)[\w.~+/=-]{6,}", re.IGNORECASE),
        rf"\1\2{MASK}",
    ),
    # A secret header line or field: "authorization: …", "x-api-key: …", "'secret': '…'", "secret=…".
    (
        tuple(_SECRET_PARTS.split("|")),
        re.compile(
            rf"""(?i)(["']?\b{_SECRET_NAME}["']?\s*[:=]\s*)(["']?)(?!{re.escape(MASK)})[^\s"'&,;)}}\]]+"""
        ),
        rf"\1\2{MASK}",
    ),
    # Standard Webhooks secrets, wherever they appear.
    (("whsec_",), re.compile(r"\bwhsec_[A-Za-z0-9+/=]+"), f"whsec_{MASK}"),
)


def redact(text: str) -> str:
    """``text`` with every secret it carries replaced by ``***``."""
    # Case-insensitive patterns match more than lower() shows outside ASCII (a long s, U+017F, is an "s" to
    # them): such a line goes through every rule.
    lowered = text.lower() if text.isascii() else None
    for words, pattern, replacement in _RULES:
        if lowered is None or any(word in lowered for word in words):
            text = pattern.sub(replacement, text)
    return text


class RedactingFormatter(logging.Formatter):
    """A formatter whose every line, traceback included, goes through :func:`redact`."""

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))

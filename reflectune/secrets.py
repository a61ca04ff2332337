"""One redaction for everything recorded from outside: the keys in use and URL user-info.

An endpoint's answer can echo what it was sent (an error body that quotes the Authorization
header), and a URL can carry a password. Whatever the run records from an answer, an error or
a URI passes `redact` first: the secrets registered here (the API keys the engines hold, the
S3 and hub credentials in the environment), bearer and basic credentials, and the user part
of URLs are replaced.
"""

from __future__ import annotations

import os
import re

MASK = "[redacted]"
_known: set[str] = set()
# credentials a run reads from the environment
ENVIRONMENT = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "HF_TOKEN", "OPENAI_API_KEY", "ANTHROPIC_API_KEY")
_PATTERNS = [
    (re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]{8,}"), r"\1 " + MASK),
    (re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s@]+@"), r"\1"),  # scheme://user:password@host
]


def register(secret: str | None) -> None:
    """A secret to remove wherever it appears (values shorter than 8 characters are not
    secrets worth the name, and would mask common words)."""
    if secret and len(secret) >= 8:
        _known.add(secret)


def redact(text: str | None) -> str | None:
    if not text:
        return text
    for name in ENVIRONMENT:
        register(os.environ.get(name))
    for secret in sorted(_known, key=len, reverse=True):
        text = text.replace(secret, MASK)
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def has_userinfo(url: str | None) -> bool:
    """Whether a URL carries a user name or password (`scheme://user:pw@host/...`)."""
    if not url or "://" not in url:
        return False
    netloc = url.split("://", 1)[1].split("/", 1)[0]
    return "@" in netloc

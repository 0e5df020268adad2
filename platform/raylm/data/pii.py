"""Redaction of personal data in text: email addresses, IP addresses and phone numbers, with counts.

Patterns are deliberately narrow, so that ordinary prose, dates, years, version numbers and
verse are left alone: an IPv4 address needs four dot-separated octets of at most 255 (and is
not part of a longer dotted number), an IPv6 address at least three colon-separated hex groups
with a `::` or all eight groups, and a phone number a leading `+` and country code or the
North-American `(555) 555-5555` / `555-555-5555` shapes, 9 to 15 digits in all.
"""

from __future__ import annotations

import re

from raylm.data.config import PiiConfig

PLACEHOLDERS = {"email": "<EMAIL>", "ip_address": "<IP_ADDRESS>", "phone_number": "<PHONE_NUMBER>"}

_EMAIL = re.compile(r"(?<![\w.+-])[\w.+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}(?![\w-])")
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_IPV4 = re.compile(rf"(?<![\d.]){_OCTET}(?:\.{_OCTET}){{3}}(?![\d.]|\.\d)")
_HEX = r"[0-9A-Fa-f]{1,4}"
_IPV6 = re.compile(
    rf"(?<![\w:])(?:(?:{_HEX}:){{7}}{_HEX}|(?:{_HEX}:){{1,6}}:(?:{_HEX}(?::{_HEX}){{0,5}})?|::(?:{_HEX}:){{1,6}}{_HEX})(?![\w:])"
)
_PHONE = re.compile(
    r"(?<![\w+])(?:\+\d{1,3}[ .-]?(?:\(\d{1,4}\)[ .-]?)?\d{1,4}(?:[ .-]?\d{2,4}){2,4}"
    r"|\(\d{3}\)[ .-]?\d{3}[ .-]\d{4}|\d{3}[.-]\d{3}[.-]\d{4})(?!\w)"
)


def _digits(s: str) -> int:
    return sum(c.isdigit() for c in s)


def redact_pii(text: str, cfg: PiiConfig) -> tuple[str, dict[str, int]]:
    """`text` with each enabled kind of personal data replaced by its placeholder, and how many of each."""
    counts = {kind: 0 for kind in PLACEHOLDERS}
    if not cfg.enabled:
        return text, counts

    def sub(pattern: re.Pattern, kind: str, text: str, valid=lambda m: True) -> str:
        def replace(m: re.Match) -> str:
            if not valid(m.group(0)):
                return m.group(0)
            counts[kind] += 1
            return PLACEHOLDERS[kind]

        return pattern.sub(replace, text)

    if cfg.emails:
        text = sub(_EMAIL, "email", text)
    if cfg.ip_addresses:
        text = sub(_IPV4, "ip_address", text)
        text = sub(_IPV6, "ip_address", text, valid=lambda s: s.count(":") >= 2 and any(c.isdigit() for c in s))
    if cfg.phone_numbers:
        text = sub(_PHONE, "phone_number", text, valid=lambda s: 9 <= _digits(s) <= 15)
    return text, counts

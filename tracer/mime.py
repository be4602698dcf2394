"""E-mail text extraction shared by the mail sinks (the SMTP receiver and the IMAP mailbox).

Why parse, not grep: mailers hide the needle. The trace id may sit in an RFC 2047 encoded
subject, in a quoted-printable part where a soft line break splits it, or in a base64 HTML
part. Every leaf part is decoded with the stdlib ``email`` package (``policy.default``) before
matching, and HTML entities are unescaped. One module so both sinks find exactly the same ids.

Parsing is CPU work (a large HTML mail takes milliseconds): callers run ``read`` off the event
loop (``asyncio.to_thread`` or their own worker thread) so it never delays another sighting.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from email.utils import getaddresses
from typing import Literal

from tracer import clock

Where = Literal["subject", "headers", "body"]
WHERE: tuple[Where, ...] = ("subject", "headers", "body")


@dataclass(frozen=True)
class MailText:
    """The decoded places a trace id may appear, and who the mail is addressed to."""

    sections: dict[str, str]  # "subject" | "headers" | "body" -> decoded text
    recipients: frozenset[str]  # To and Cc addresses, lower-case
    message_id: str


def read(raw: bytes) -> MailText:
    """Decode one RFC 5322 message. Raises only on mail the lenient parser cannot read at all."""
    msg = BytesParser(policy=policy.default).parsebytes(raw)
    assert isinstance(msg, EmailMessage)
    sections = {"subject": subject(msg), "headers": headers(msg), "body": body(msg)}
    return MailText(sections, frozenset(recipients(msg)), str(msg.get("message-id", "")))


def subject(msg: EmailMessage) -> str:
    return str(msg.get("subject", ""))  # policy.default decodes RFC 2047 encoded words


def headers(msg: EmailMessage) -> str:
    """Every header but Subject, decoded, one per line."""
    return "\n".join(f"{name}: {value}" for name, value in msg.items() if name.lower() != "subject")


def body(msg: EmailMessage, deadline: float | None = None) -> str:
    """Text of every leaf part, transfer-decoded (base64, quoted-printable) and charset-decoded.
    ``deadline`` (a ``clock.now()`` value): raise ``TimeoutError`` past it, part by part."""
    texts = []
    for part in msg.walk():
        if deadline is not None and clock.now() > deadline:
            raise TimeoutError
        if part.is_multipart():
            continue
        try:
            text = part.get_content() if part.get_content_maintype() == "text" else None
        except (LookupError, ValueError, UnicodeError):  # unknown charset or a broken encoding
            text = None
        if not isinstance(text, str):
            payload = part.get_payload(decode=True)
            text = payload.decode("utf-8", "replace") if isinstance(payload, bytes) else ""
        if part.get_content_subtype() == "html":
            text = html.unescape(text)
        texts.append(text)
    return "\n".join(texts)


def recipients(msg: EmailMessage) -> set[str]:
    values = [str(v) for v in msg.get_all("to", []) + msg.get_all("cc", [])]
    return {addr.lower() for _, addr in getaddresses(values) if addr}

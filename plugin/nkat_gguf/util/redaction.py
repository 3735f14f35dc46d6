"""Database URLs without their passwords, for messages, summaries and reproducing commands.

SQLAlchemy parses the URL (a password may hold '/', ':' or '#', or stand without a user);
`password=` in the query string (libpq's way) is hidden too. A URL that does not parse is
shown only up to its scheme.
"""

from __future__ import annotations

from urllib.parse import unquote

HIDDEN = "***"
_SECRET_KEYS = ("password", "passwd", "pwd", "sslpassword")


def _parse(url: str):
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url)
    except (ArgumentError, ValueError, TypeError):
        return None


def redact_url(url: str) -> str:
    """`url` with every password replaced by ***."""
    parsed = _parse(url)
    if parsed is None:
        scheme = url.split("://", 1)[0] if "://" in url else ""
        return f"{scheme}://{HIDDEN}" if scheme else HIDDEN
    marker = "nkatHIDDENnkat"  # rendered as is, unlike *** (which the query encoding escapes)
    query = {k: (marker if k.lower() in _SECRET_KEYS else v) for k, v in parsed.query.items()}
    return parsed.set(query=query).render_as_string(hide_password=True).replace(marker, HIDDEN)


def secrets_of(url: str) -> list[str]:
    """The password strings in `url` (raw and decoded), to scrub from driver error messages."""
    parsed = _parse(url)
    found = []
    if parsed is not None:
        if parsed.password:
            found.append(str(parsed.password))
        for k, v in parsed.query.items():
            if k.lower() in _SECRET_KEYS:
                found.extend([v] if isinstance(v, str) else list(v))
    return [s for s in {*found, *(unquote(s) for s in found)} if s]


def scrub(text: str, url: str) -> str:
    """`text` (e.g. a driver's error message) with `url`'s passwords replaced by ***."""
    text = text.replace(url, redact_url(url))
    for secret in sorted(secrets_of(url), key=len, reverse=True):
        text = text.replace(secret, HIDDEN)
    return text

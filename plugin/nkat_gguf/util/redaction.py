"""Database URLs without their passwords, for messages, summaries and reproducing commands.

SQLAlchemy parses the URL (a password may hold '/', ':' or '#', or stand without a user);
`password=` in the query string (libpq's way) is hidden too. A URL that does not parse is
shown only up to its scheme. A URL with more than one '@' before its query is ambiguous (an
unescaped '@' in the user name or password: SQLAlchemy splits at the first, so part of the
password would pass for the host): everything between '://' and the last '@' is hidden, and
storage.open_storage refuses it.
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


def ambiguous_userinfo(url: str) -> str | None:
    """What stands between '://' and the last '@' when it holds another '@' (an unescaped '@' in the
    user name or password), else None. SQLite URLs are file paths and never ambiguous."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower().startswith("sqlite"):
        return None
    head = rest.split("?", 1)[0]
    userinfo = head.rpartition("@")[0]
    return userinfo if "@" in userinfo else None


def redact_url(url: str) -> str:
    """`url` with every password replaced by ***."""
    userinfo = ambiguous_userinfo(url)
    if userinfo is not None:  # nothing of it may show: the password's pieces are in there
        scheme, _, rest = url.partition("://")
        return redact_url(f"{scheme}://{rest[len(userinfo) + 1:]}").replace("://", f"://{HIDDEN}@", 1)
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
    userinfo = ambiguous_userinfo(url)
    if userinfo is not None:  # the password and its pieces (a parser may take one for the host)
        password = userinfo.partition(":")[2]
        found += [userinfo, password, *(p for p in password.split("@") if len(p) > 1)]
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

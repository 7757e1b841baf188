"""URLs that may carry a password (the server view's, the pooler console's, the pooler metrics
endpoint's, the broker's): parsed so that no character of the password breaks them, shown with
the password masked and the port kept, and a redactor that takes the password out of any text
(a driver's error quotes what it was given).

A password may hold any of ``/ ? # @ % :`` as typed: the credentials end at the last ``@`` that
a host (and port) follows. A ``@`` in the path or query of a URL with credentials must then be
written ``%40``. Percent escapes in the user and password are decoded (``%40`` is ``@``); a
``%`` that starts no escape stays as it is.
"""

from __future__ import annotations

import re
import urllib.parse
from dataclasses import dataclass

#: a host (a name, IPv4, or [IPv6]) and an optional port, followed by the end, ``/``, ``?`` or ``#``
_HOST = re.compile(r"(\[[0-9A-Fa-f:.]*\]|[^/?#@\[\]:\s]*)(?::(\d*))?(?=[/?#]|$)")
#: ``password=...`` (and ``sslpassword=``) in a URL's query or a libpq key/value string, quoted
#: or not: libpq accepts a password in either place
PASSWORD_PARAM = re.compile(r"(?i)(\b(?:\w*password|passwd)\s*=\s*)('(?:[^'\\]|\\.)*'?|[^&\s;]*)")
DEFAULT_PORTS = {"http": 80, "https": 443, "postgresql": 5432, "postgres": 5432, "redis": 6379, "rediss": 6379}
MASK = "***"


@dataclass(frozen=True)
class Url:
    scheme: str
    user: str | None  # decoded
    password: str | None  # decoded
    host: str
    port: int | None
    rest: str  # path, query and fragment as given (starts with / ? # or is empty)

    @property
    def path(self) -> str:
        return urllib.parse.urlsplit("x://h" + self.rest).path

    @property
    def query(self) -> str:
        return urllib.parse.urlsplit("x://h" + self.rest).query

    def netloc(self) -> str:
        return self.host + (f":{self.port}" if self.port is not None else "")

    def origin(self) -> tuple[str, str, int | None]:
        """Scheme, host and port (the scheme's default when none is given): credentials go to
        this origin only."""
        scheme = self.scheme.lower().split("+", 1)[0]
        return scheme, self.host.lower(), self.port if self.port is not None else DEFAULT_PORTS.get(scheme)

    def without_credentials(self) -> str:
        return f"{self.scheme}://{self.netloc()}{self.rest}"

    def shown(self) -> str:
        """The URL as logs and errors may show it: the password masked, the port kept."""
        auth = ""
        if self.user is not None or self.password is not None:
            user = urllib.parse.quote(self.user or "", safe="")
            auth = f"{user}:{MASK}@" if self.password is not None else f"{user}@"
        rest = PASSWORD_PARAM.sub(r"\1" + MASK, self.rest.split("#", 1)[0])
        return f"{self.scheme}://{auth}{self.netloc()}{rest}"

    def secrets(self) -> list[str]:
        """What must never appear in a text: the password as typed, decoded and encoded, and
        each piece of it between URL delimiters (a parser that split it shows the pieces)."""
        if not self.password:
            return []
        raw = self.password
        forms = {raw, urllib.parse.quote(raw, safe=""), urllib.parse.quote(raw)}
        for piece in re.split(r"[/?#@:]", raw):
            if len(piece) >= 4:
                forms.add(piece)
        return sorted(forms, key=len, reverse=True)


def parse(url: str) -> Url:
    """``scheme://[user[:password]@]host[:port][/path][?query][#fragment]``; raises ValueError
    (without the URL's text: it may hold a password) when it is not of that form."""
    scheme, sep, rest = str(url).strip().partition("://")
    if not sep or not re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*", scheme):
        raise ValueError("not a URL of the form scheme://host")
    auth: str | None = None
    hostpart = rest
    for at in reversed([i for i, ch in enumerate(rest) if ch == "@"]):
        if _HOST.match(rest, at + 1):
            auth, hostpart = rest[:at], rest[at + 1 :]
            break
    m = _HOST.match(hostpart)
    if m is None:
        raise ValueError("the host part of the URL cannot be read")
    host, port_text = m.group(1), m.group(2)
    port: int | None = None
    if port_text:
        port = int(port_text)
        if not 0 < port < 65536:
            raise ValueError(f"port {port} is out of range")
    user = password = None
    if auth is not None:
        u, colon, p = auth.partition(":")
        user = urllib.parse.unquote(u)
        password = urllib.parse.unquote(p) if colon else None
    return Url(scheme, user, password, host, port, hostpart[m.end() :])


def shown(url: str | None) -> str:
    """A URL as it may be shown; one that cannot be parsed is not shown at all."""
    if not url:
        return ""
    try:
        return parse(url).shown()
    except ValueError:
        return "<a URL that cannot be parsed>"


def redact(text: str, *urls: str | None) -> str:
    """``text`` with every password of ``urls`` (in any form or piece) and every URL password
    or ``password=`` parameter masked."""
    out = str(text)
    for url in urls:
        if not url:
            continue
        try:
            secrets = parse(url).secrets()
        except ValueError:
            continue
        for secret in secrets:
            out = out.replace(secret, MASK)
    return mask_text(out)


def mask_text(text: str) -> str:
    """Every ``scheme://user:secret@host`` in ``text`` -> ``scheme://user:***@host``, and every
    ``password=secret`` (a URL's query or a libpq key/value string) -> ``password=***``."""
    text = PASSWORD_PARAM.sub(r"\1" + MASK, str(text))

    def one(m: re.Match[str]) -> str:
        try:
            return parse(m.group(0)).shown()
        except ValueError:
            return m.group(0)

    # a URL with credentials: up to the last "@" a host follows, then the host, port and path
    return re.sub(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"]*@[^\s'\"@]*", one, text)

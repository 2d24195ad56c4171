"""Who may use the app, and proof that a form was sent by the app's own page.

- Binding: loopback by default. Any other address lets the network in, so it needs an access token (run_app
  refuses to start without one). With a token, every request must carry it: as the cookie the login form sets
  (an HMAC of the token, not the token itself) or as `Authorization: Bearer <token>`. Without a token, only
  requests whose Host header is a loopback name are served (a DNS-rebinding page cannot reach the app).
- CSRF: double submit. Every page sets a random per-browser token in an HttpOnly, SameSite=Strict cookie and
  puts the same value in its forms (hidden field) and a <meta> tag (the page's fetch calls send it as a header);
  every POST must carry both, equal. All comparisons use hmac.compare_digest.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

from tunelab.errors import ConfigError, TunelabError

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
CSRF_COOKIE, CSRF_HEADER = "tunelab_csrf", "x-csrf-token"
AUTH_COOKIE = "tunelab_auth"


class CsrfError(Exception):
    """A POST without the page's CSRF token (answered 403)."""


def check_token(token: str | None) -> None:
    """Refuse an empty access token: no token (None) means "loopback only", a token means "ask for it", and an
    empty one (`--token ""`, `TUNELAB_APP_TOKEN=`) would be neither: the login asks nothing (an empty token counts
    as none) while the Host check is off (a token was given), which opens the app to DNS rebinding."""
    if token is not None and not token.strip():
        raise ConfigError(
            'app: the access token is empty (--token "" or an empty TUNELAB_APP_TOKEN): give a real token, or none '
            "at all to serve this machine only"
        )


def check_binding(host: str, token: str | None) -> None:
    """Refuse to listen beyond this machine without an access token."""
    if host not in LOOPBACK_HOSTS and not token:
        raise TunelabError(
            f"app: --host {host} lets other machines in: also pass --token (or set TUNELAB_APP_TOKEN), "
            "or keep the default --host 127.0.0.1"
        )


def new_csrf_token() -> str:
    return secrets.token_urlsafe(32)


def same_token(expected: str | None, given: str | None) -> bool:
    """Constant-time equality of two tokens; False when either is missing."""
    if not expected or not given:
        return False
    return hmac.compare_digest(expected.encode(), given.encode())


def session_value(token: str) -> str:
    """What the login cookie holds: derived from the token, so the cookie never carries the token itself."""
    return hmac.new(token.encode(), b"tunelab-app-session", hashlib.sha256).hexdigest()


def is_authenticated(token: str | None, cookie: str | None, authorization: str | None) -> bool:
    """True when no token is required, or the request carries it (login cookie or bearer header)."""
    if not token:
        return True
    if same_token(session_value(token), cookie):
        return True
    scheme, _, value = (authorization or "").partition(" ")
    return scheme.lower() == "bearer" and same_token(token, value.strip())


def host_allowed(host_header: str | None) -> bool:
    """The Host header names this machine (loopback), with or without a port."""
    if not host_header:
        return False
    host = host_header.strip()
    if host.startswith("["):  # [::1]:7860
        host = host[1:].partition("]")[0]
    elif host.count(":") == 1:
        host = host.partition(":")[0]
    return host in LOOPBACK_HOSTS

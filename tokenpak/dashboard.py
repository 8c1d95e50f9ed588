"""GET /dashboard: the page, shipped as package data (dashboard.html), and its headers.

The page is a static shell: it holds no figures, and reads them from `/stats` (JSON) with
its own script, so the same rules guard the data either way: the Host check against DNS
rebinding, and proxy.auth_token, which the page sends in X-TokenPak-Auth. It is answered
without the token (a browser cannot add a header to the address it opens); the token
reaches the page through the address's fragment (`/dashboard#token=...`), which browsers
never send to the server, so it never reaches a request line or a log, or through the form
the page shows when /stats answers 401.

The Content-Security-Policy allows exactly what the page is: one inline script and one
inline style, named by their SHA-256 (no 'unsafe-inline'), requests to its own origin
only, and `data:` images (the empty favicon that stops the browser asking /favicon.ico,
which would be forwarded and recorded as a request). Should anything ever slip an element
into the page, it could neither run nor load or send anything elsewhere.
"""

import base64
import hashlib
import os
import re

PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dashboard.html")
_INLINE = re.compile(r"<(script|style)>(.*?)</\1>", re.S)
_page = None  # (body, headers), read once


def _sha256(text):
    return "'sha256-%s'" % base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode()


def policy(html):
    """The Content-Security-Policy for `html`: its inline script and style by hash."""
    hashes = {"script": [], "style": []}
    for kind, body in _INLINE.findall(html):
        hashes[kind].append(_sha256(body))
    return ("default-src 'none'; script-src %s; style-src %s; connect-src 'self'; "
            "img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
            % (" ".join(hashes["script"]) or "'none'", " ".join(hashes["style"]) or "'none'"))


def page():
    """(body bytes, headers) of GET /dashboard."""
    global _page
    if _page is None:
        with open(PATH, encoding="utf-8") as handle:
            html = handle.read()
        _page = (html.encode("utf-8"), [
            ("Content-Type", "text/html; charset=utf-8"),
            ("Content-Security-Policy", policy(html)),
            ("X-Content-Type-Options", "nosniff"),
            ("X-Frame-Options", "DENY"),
            ("Referrer-Policy", "no-referrer"),
            ("Cache-Control", "no-store")])
    return _page

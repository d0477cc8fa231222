"""Comparing secrets without telling a guesser how close they came.

``==`` on strings stops at the first differing character, so its time says how long a prefix
was right. ``same_secret`` is the one comparison used for the server secret and user secrets.
"""

import hashlib
import hmac


def same_secret(given, known):
    """True when ``given`` equals ``known``; takes the same time wherever they differ.

    Both are hashed first: ``hmac.compare_digest`` is constant-time only for equal lengths, and
    the digests always are, so the time says nothing about the length of the known secret either.
    A missing secret (None) never matches."""
    if given is None or known is None:
        return False
    return hmac.compare_digest(_digest(given), _digest(known))


def _digest(secret):
    if isinstance(secret, str):
        # surrogatepass: a JSON "\ud800" is a legal secret; it must compare, not raise
        secret = secret.encode("utf-8", "surrogatepass")
    return hashlib.sha256(secret).digest()

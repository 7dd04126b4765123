"""HMAC signing of job specs (``GANGWAY_SECRET``): who holds the secret may run code on the fleet.

The producer signs the canonical JSON of the spec. The spec names the ``train_func`` blob by its
SHA-256 (``functions/<sha256>.pkl``), so the signature covers the code too: the worker refuses a
blob whose bytes do not hash to the name the signed spec gives.
"""
from __future__ import annotations

import hashlib
import hmac
import json

from common.errors import SecurityError

__all__ = ["SecurityError", "sign", "verify", "verify_blob"]


def _canonical(spec: dict) -> bytes:
    return json.dumps({k: v for k, v in spec.items() if k != "signature"}, sort_keys=True,
                      separators=(",", ":")).encode()


def sign(secret: str, spec: dict) -> str:
    return hmac.new(secret.encode(), _canonical(spec), hashlib.sha256).hexdigest()


def verify(secret: str, spec: dict) -> None:
    """Raise SecurityError unless ``spec`` carries a valid signature (no-op without a secret)."""
    if not secret:
        return
    got = spec.get("signature") or ""
    if not got:
        raise SecurityError(f"job {spec.get('job_id')!r} is unsigned but GANGWAY_SECRET is set: refused")
    if not hmac.compare_digest(got, sign(secret, spec)):
        raise SecurityError(f"job {spec.get('job_id')!r} has a signature that does not match its content: "
                            "refused (tampered, or signed with another GANGWAY_SECRET)")


def verify_blob(data: bytes, key: str) -> None:
    """The blob's SHA-256 must be the one in its content-addressed name."""
    want = key.rsplit("/", 1)[-1].split(".", 1)[0]
    got = hashlib.sha256(data).hexdigest()
    if got != want:
        raise SecurityError(f"code blob {key!r} hashes to {got[:16]}…, not to its name: refused (tampered)")

"""``gangway flower``: Celery Flower on the fleet's broker, knowing gangway's task routes.

``celery -A workers.flower:app flower`` loads :data:`app` from here; :func:`flower_command` builds
that command line and the environment it needs. Without credentials Flower's HTTP API is opened
read-only and only on a loopback address; with ``--basic-auth`` it is Flower's full API.
"""
from __future__ import annotations

import importlib.metadata
import ipaddress
import socket
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from celery import Celery

from common.errors import ConfigurationError
from common.settings import Settings

APP = "workers.flower:app"
# Flower reads its options from FLOWER_<OPTION> too; these mean someone already configured auth.
AUTH_ENV = ("FLOWER_BASIC_AUTH", "FLOWER_AUTH", "FLOWER_AUTH_PROVIDER")
AUTH_ARGS = ("auth", "auth_provider")
OWN_ARGS = ("address", "port", "read_only", "basic_auth", "unix_socket")   # gangway flower's own flags decide these


@dataclass(frozen=True)
class FlowerCommand:
    """What to exec: ``argv`` with ``env`` laid over the caller's environment."""

    argv: list[str]
    env: dict[str, str] = field(repr=False)   # holds the broker URL and any credentials
    authenticated: bool
    read_only: bool


def flower_command(settings: Settings, *, port: int = 5555, address: str = "127.0.0.1",
                   basic_auth: Sequence[str] = (), read_only: bool = False, extra: Sequence[str] = (),
                   environ: Mapping[str, str] | None = None) -> FlowerCommand:
    """The ``celery flower`` command for ``settings``.

    Unauthenticated (no ``basic_auth``, no Flower auth in ``environ`` or ``extra``): the API is
    opened with ``FLOWER_UNAUTHENTICATED_API``, Flower runs ``--read_only`` (no revoke, shutdown
    or send-task from anyone who reaches the port) and ``address`` must be a loopback address.
    Credentials go through ``FLOWER_BASIC_AUTH``, never argv (``ps`` shows argv to every user).
    """
    for cred in basic_auth:
        user, sep, password = cred.partition(":")
        if not (user and sep and password) or "," in cred:
            raise ConfigurationError(f"--basic-auth must look like 'user:password' without commas, got user "
                                     f"{user!r} and {'a' if password else 'no'} password")
    names = [a.partition("=")[0].lstrip("-").replace("-", "_") for a in extra if a.startswith("--")]
    if set(names) & set(OWN_ARGS):
        raise ConfigurationError(f"Flower options {sorted(set(names) & set(OWN_ARGS))} after -- are set by gangway "
                                 "flower itself: use its --port, --address, --read-only, --basic-auth")
    environ = environ or {}
    authenticated = bool(basic_auth) or any(environ.get(k) for k in AUTH_ENV) or \
        any(n in AUTH_ARGS for n in names)
    if not authenticated and not _is_loopback(address):
        raise ConfigurationError(f"gangway flower without --basic-auth opens its HTTP API to anyone who reaches "
                                 f"--address {address!r}; bind a loopback address (127.0.0.1) or pass "
                                 "--basic-auth user:password")
    read_only = read_only or not authenticated
    _check_flower(read_only)
    # Flower needs the broker and nothing else: no job secret, no S3 keys in its environment.
    env = {"GANGWAY_BROKER_URL": settings.broker_url, "PYTHONUNBUFFERED": "1"}
    if basic_auth:
        env["FLOWER_BASIC_AUTH"] = ",".join(basic_auth)
    if not authenticated:
        env["FLOWER_UNAUTHENTICATED_API"] = "true"
    argv = [sys.executable, "-m", "celery", "-A", APP, "flower", f"--port={port}", f"--address={address}"]
    if read_only:
        argv.append("--read_only=True")
    return FlowerCommand(argv + list(extra), env, authenticated, read_only)


def _check_flower(read_only: bool) -> None:
    try:
        version = importlib.metadata.version("flower")
        from flower.options import default_options
    except (ImportError, importlib.metadata.PackageNotFoundError) as exc:
        raise ConfigurationError(f"gangway flower needs Flower ({exc}): pip install 'flower>=2.2'") from exc
    # Flower drops options it does not know without a word: an old one would serve an open API with control.
    if read_only and not hasattr(default_options, "read_only"):
        raise ConfigurationError(f"Flower {version} has no --read_only, which an API without auth needs: "
                                 "pip install 'flower>=2.2', or pass --basic-auth user:password")


def _is_loopback(address: str) -> bool:
    try:
        return all(ipaddress.ip_address(info[4][0]).is_loopback
                   for info in socket.getaddrinfo(address, None, proto=socket.IPPROTO_TCP))
    except (OSError, ValueError):
        return False


def __getattr__(name: str) -> Celery:
    # The app is built on first use (by ``celery -A``), so importing this module reads no environment.
    if name != "app":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from workers.celery_app import make_app
    app = make_app(Settings.from_env())
    globals()["app"] = app
    return app

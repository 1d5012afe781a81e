"""TLS from the options ``certfile``, ``keyfile``, ``ca_certs`` and ``cert_reqs``.

Each worker builds its own :class:`ssl.SSLContext` when it starts, from the files as they are
then: a rolling reload (``aiocluster reload``) starts workers that read renewed certificates,
with no request dropped. The primary builds one at start only to check the files, so that a
missing, unreadable or mismatched file is one line and exit status 2 instead of workers that
fail one by one. The handshake always happens in the worker that serves the connection.
"""

from __future__ import annotations

import ssl

from aiocluster._config import ClusterConfig
from aiocluster._errors import ConfigError

__all__ = ["check_tls", "server_context"]

_VERIFY = {
    "none": ssl.CERT_NONE,
    "optional": ssl.CERT_OPTIONAL,
    "required": ssl.CERT_REQUIRED,
}


def server_context(config: ClusterConfig) -> ssl.SSLContext | None:
    """A server-side context from ``config``'s TLS files, or None if it names no certfile.

    Raises :class:`ConfigError` saying which file cannot be used and why.
    """
    if config.certfile is None:
        return None
    for what, path in (
        ("certificate (certfile)", config.certfile),
        ("key (keyfile)", config.keyfile),
        ("CA certificates (ca_certs)", config.ca_certs),
    ):
        if path is not None:
            _readable(what, path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(config.certfile, config.keyfile)
    except ssl.SSLError as err:
        key = config.keyfile or config.certfile
        raise ConfigError(
            f"cannot use the TLS certificate {config.certfile} with the key {key}: "
            f"{_reason(err)} (both PEM; does the key belong to the certificate?)"
        ) from None
    if config.ca_certs is not None:
        try:
            context.load_verify_locations(cafile=config.ca_certs)
        except ssl.SSLError as err:
            raise ConfigError(
                f"cannot use the CA certificates in {config.ca_certs}: {_reason(err)}"
            ) from None
    context.verify_mode = _VERIFY[config.cert_reqs]
    return context


def check_tls(config: ClusterConfig, ssl_context: ssl.SSLContext | None = None) -> None:
    """In the primary at start: raise :class:`ConfigError` if the TLS files cannot be used,
    or if both ``ssl_context`` and a certfile are given."""
    if ssl_context is not None and config.certfile is not None:
        raise ConfigError("give ssl_context or certfile, not both")
    server_context(config)


def _readable(what: str, path: str) -> None:
    try:
        with open(path, "rb"):
            pass
    except OSError as err:
        raise ConfigError(f"cannot read the TLS {what} {path}: {err.strerror}") from None


def _reason(err: ssl.SSLError) -> str:
    # OpenSSL's reason code (KEY_VALUES_MISMATCH), without its source file and line.
    if err.reason == "PEM_LIB" or err.reason is None:
        return "not a PEM certificate and key OpenSSL can read"
    return str(err.reason).replace("_", " ").lower()

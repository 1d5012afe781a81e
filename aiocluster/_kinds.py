"""What kind of application an object is: an aiohttp Application, an ASGI 3 app, or a factory.

Pure: it only inspects the object (no aiohttp, no uvicorn import), so that the command line,
the zygote and a worker can each tell, before any socket is served, what they were given, and
say in one line what is wrong with what cannot be served.
"""

from __future__ import annotations

import inspect
import sys
from typing import Any, Literal

from aiocluster._errors import AppLoadError

__all__ = [
    "INTERFACES",
    "AppKind",
    "Interface",
    "check_interface",
    "classify",
    "is_aiohttp_app",
    "is_asgi3",
    "name_of",
]

#: What ``--interface`` / ``interface=`` may say APP is; ``auto`` tells by looking at it.
Interface = Literal["auto", "aiohttp", "asgi", "protocol"]
INTERFACES: tuple[Interface, ...] = ("auto", "aiohttp", "asgi", "protocol")

#: What an object is found to be: an app to serve as it is, or a factory to call for one.
AppKind = Literal["aiohttp", "asgi", "factory"]

_ASGI2_HINT = (
    "aiocluster serves ASGI 3 applications (async def app(scope, receive, send)); wrap it with "
    "asgiref.compatibility.guarantee_single_callable(app)"
)


def name_of(obj: object) -> str:
    """A short name for ``obj`` in an error: its qualified name, or its type's."""
    name = getattr(obj, "__qualname__", None)
    return str(name) if isinstance(name, str) else f"a {type(obj).__name__}"


def is_aiohttp_app(obj: object) -> bool:
    """True for an aiohttp ``web.Application`` (without importing aiohttp: an Application's
    module has loaded it already)."""
    web = sys.modules.get("aiohttp.web")
    return web is not None and isinstance(obj, web.Application)


def _takes(obj: Any, count: int) -> bool | None:
    """Whether ``obj`` can be called with ``count`` positional arguments (None: cannot tell)."""
    try:
        signature = inspect.signature(obj)
    except (TypeError, ValueError):  # builtins and some C callables have none
        return None
    try:
        signature.bind(*([None] * count))
    except TypeError:
        return False
    return True


def _is_async(obj: Any) -> bool:
    # An instance (a Starlette app) is async if its class's __call__ is.
    call = type(obj).__call__
    return inspect.iscoroutinefunction(obj) or (
        not inspect.isroutine(obj) and inspect.iscoroutinefunction(call)
    )


def is_asgi3(obj: object) -> bool:
    """An ASGI 3 application: an async callable of ``(scope, receive, send)`` (a function, or an
    instance whose ``__call__`` is one, as a Starlette or FastAPI app)."""
    if inspect.isclass(obj) or not callable(obj):
        return False
    return _is_async(obj) and _takes(obj, 3) is not False


def classify(obj: object, what: str | None = None) -> AppKind:
    """What ``obj`` is; :class:`AppLoadError` (one line) if it is nothing aiocluster serves.

    ``what`` names it in errors (``main:app``); by default its qualified name.
    """
    what = what or name_of(obj)
    if is_aiohttp_app(obj):
        return "aiohttp"
    if not callable(obj):
        raise AppLoadError(
            f"{what} is a {type(obj).__name__}, not an aiohttp Application, an ASGI application "
            "or a factory returning one"
        )
    if is_asgi3(obj):
        return "asgi"
    if _takes(obj, 0) is not False:
        return "factory"
    if _is_async(obj):
        raise AppLoadError(
            f"{what} is an async callable that takes neither (scope, receive, send), as an "
            "ASGI 3 application does, nor nothing, as a factory does"
        )
    if _takes(obj, 1):
        raise AppLoadError(
            f"{what} looks like an ASGI 2 application (called with the scope); {_ASGI2_HINT}"
        )
    if _takes(obj, 3):
        raise AppLoadError(
            f"{what} is a synchronous callable of (scope, receive, send): an ASGI application "
            "must be async (async def app(scope, receive, send))"
        )
    raise AppLoadError(
        f"{what} is a callable that is neither an ASGI 3 application nor a factory taking no "
        "arguments"
    )


def check_interface(kind: AppKind, interface: Interface, what: str) -> None:
    """:class:`AppLoadError` if an app of ``kind`` is not what ``interface`` asked for."""
    if kind != "factory" and interface not in ("auto", kind):
        label = "an ASGI" if kind == "asgi" else "an aiohttp"
        raise AppLoadError(
            f"{what} is {label} application, not the {interface} one --interface asks for "
            f"(drop --interface, or say --interface {kind})"
        )

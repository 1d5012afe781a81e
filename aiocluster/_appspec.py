"""Application specs ``module:attribute``: checked in the primary, imported in workers."""

from __future__ import annotations

import ast
import functools
import importlib
import importlib.util
import os
from dataclasses import dataclass, field
from typing import Any

from aiocluster._errors import AppLoadError, ConfigError
from aiocluster._kinds import Interface, check_interface, classify

__all__ = [
    "AppSpec",
    "NotImported",
    "check_kind",
    "check_module",
    "load_app",
    "parse_spec",
    "split_spec",
]


@dataclass(frozen=True, slots=True)
class AppSpec:
    """``module:attribute``, or ``module:factory(args...)`` with literal arguments."""

    module: str
    attr: str
    #: The factory's arguments, if the spec calls it (as gunicorn's ``app:create("x")``).
    args: tuple[Any, ...] | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def calls(self) -> bool:
        """True if the spec calls the attribute: it is a factory, with these arguments."""
        return self.args is not None


def parse_spec(spec: str) -> AppSpec:
    """Parse ``module:attribute`` or ``module:factory(...)``, without importing anything.

    The arguments must be literals (strings, numbers, True/False/None, and tuples, lists,
    dicts and sets of them), read with :func:`ast.literal_eval`: nothing in APP is run.
    """
    module, sep, rest = spec.partition(":")
    if not sep or not module or not rest:
        raise ConfigError(f"APP must look like module:attribute (e.g. myapp:app), not {spec!r}")
    attr, paren, _ = rest.partition("(")
    attr = attr.strip()
    names = [*module.split("."), *attr.split(".")]
    if not all(name.isidentifier() for name in names):
        raise ConfigError(f"APP {spec!r} is not a valid module:attribute path")
    if not paren:
        return AppSpec(module, attr)
    try:
        call = ast.parse(rest.strip(), mode="eval").body
    except SyntaxError:
        raise ConfigError(
            f'APP {spec!r}: the call is not valid Python syntax (e.g. {module}:{attr}("x", '
            "debug=True))"
        ) from None
    if not isinstance(call, ast.Call) or ast.unparse(call.func) != attr:
        raise ConfigError(f'APP {spec!r}: expected one call of {attr}, like {attr}("x")')
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    for position, node in enumerate(call.args, 1):
        args.append(_literal(spec, f"argument {position}", node))
    for keyword in call.keywords:
        if keyword.arg is None:
            raise ConfigError(f"APP {spec!r}: **mappings are not allowed, only name=literal")
        kwargs[keyword.arg] = _literal(spec, f"argument {keyword.arg}", keyword.value)
    return AppSpec(module, attr, tuple(args), kwargs)


def _literal(spec: str, what: str, node: ast.expr) -> Any:
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        raise ConfigError(
            f"APP {spec!r}: {what} ({ast.unparse(node)}) is not a literal (strings, numbers, "
            "True/False/None, and lists, tuples, dicts or sets of them; nothing in APP is run)"
        ) from None


def split_spec(spec: str) -> tuple[str, str]:
    """Split ``module:attribute`` (or ``module:factory(...)``) and check both halves, without
    importing anything."""
    parsed = parse_spec(spec)
    return parsed.module, parsed.attr


def check_module(module: str) -> None:
    """Raise :class:`ConfigError` if ``module`` cannot be found (it is not imported here)."""
    try:
        found = importlib.util.find_spec(module)
    except (ImportError, ValueError) as err:
        raise ConfigError(f"cannot find module {module!r}: {err}") from None
    if found is None:
        raise ConfigError(
            f"cannot find module {module!r} (looked in {os.getcwd()} and sys.path); "
            "run aiocluster from the directory that holds it"
        )


def load_app(spec: str) -> Any:
    """Import ``module:attribute`` and return the attribute; :class:`AppLoadError` if not.

    The error of a module that raised while it was imported keeps that exception as its
    ``__cause__`` (its traceback is worth showing); a module or attribute that is not there
    needs no traceback.
    """
    module_name, attr = split_spec(spec)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name == module_name:
            raise AppLoadError(f"cannot import module {module_name!r}: {err}") from None
        raise AppLoadError(f"importing {module_name!r} failed: {err!r}") from err
    except Exception as err:
        raise AppLoadError(f"importing {module_name!r} failed: {err!r}") from err
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise AppLoadError(f"module {module_name!r} has no attribute {attr!r}") from None
    return obj


def check_kind(target: Any, spec: str, *, factory: bool, interface: Interface) -> Any:
    """Check that what ``spec`` names is what ``--factory``/``--interface`` said it is."""
    if interface == "protocol" or factory:
        if not callable(target):
            what = "protocol factory" if interface == "protocol" else "factory"
            raise AppLoadError(f"{spec} is a {type(target).__name__}, not a callable {what}")
        if interface == "protocol":
            return target
    kind = classify(target, spec)
    if factory and kind != "factory":
        label = "an ASGI" if kind == "asgi" else "an aiohttp"
        raise AppLoadError(f"{spec} is {label} application itself, not a factory: drop --factory")
    if kind == "factory" and not factory:
        raise AppLoadError(
            f"{spec} is a {type(target).__name__}, not an aiohttp Application or an ASGI "
            "application; "
            "pass --factory if it builds one, or --interface protocol if it is an asyncio "
            "protocol factory"
        )
    check_interface(kind, interface, spec)
    return target


class NotImported:
    """Stands for the application in the primary, which never imports it."""

    def __init__(self, spec: str, *, factory: bool = False, interface: Interface = "auto") -> None:
        self.spec = spec
        self.factory = factory
        self.interface = interface

    def load(self) -> Any:
        """Import the application (in a worker, or in the zygote) and check its kind.

        A spec that calls a factory (``make_app("x")``) gives the factory with its arguments
        bound: each worker calls it, as for ``--factory``.
        """
        parsed = parse_spec(self.spec)
        target = check_kind(
            load_app(self.spec),
            self.spec,
            factory=self.factory or parsed.calls,
            interface=self.interface,
        )
        if parsed.args is not None:
            return functools.partial(target, *parsed.args, **parsed.kwargs)
        return target

    def __call__(self) -> None:  # pragma: no cover - never called in the primary
        raise AssertionError("the primary does not build the application")

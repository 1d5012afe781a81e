"""The option table: every option reaches its keyword, its flag, its variable and ``--help``.

Most tests here are generated from :data:`aiocluster._options.OPTIONS`: an option added to the
table is tested by them once it has a sample below (a test fails until it has).
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import signal
import subprocess
import sys
from typing import Any, NamedTuple

import pytest

import aiocluster
from aiocluster import ClusterConfig, ConfigError
from aiocluster._options import (
    OPTIONS,
    Option,
    Scope,
    arguments,
    boolean,
    default_workers,
    environment,
    option,
    resolve,
    run_settings,
)
from aiocluster.cli import build_parser
from aiocluster.cli import command_settings as cli_settings
from aiocluster.wire.address import Address

from .conftest import StartCluster
from .harness import APPS, cli

EMPTY_TOML = APPS / "empty.toml"


class Sample(NamedTuple):
    """A good value: as text (flag, variable), as a Python keyword, and what both mean."""

    text: str
    keyword: object
    value: object


SAMPLES: dict[str, Sample] = {
    "interface": Sample("asgi", "asgi", "asgi"),
    "factory": Sample("1", True, True),
    "protocol": Sample("yes", True, True),
    "workers": Sample("3", 3, 3),
    "bind": Sample(
        "127.0.0.1:9001",
        ["127.0.0.1:9001"],
        (Address.tcp("127.0.0.1", 9001),),
    ),
    "backlog": Sample("64", 64, 64),
    "policy": Sample("rr", "rr", "rr"),
    "balance": Sample("least-conn", "least-conn", "least-conn"),
    "sticky": Sample("on", True, True),
    "no_uvloop": Sample("true", True, True),
    "graceful_timeout": Sample("2.5", 2.5, 2.5),
    "cleanup_timeout": Sample("4", 4, 4.0),
    "ws_grace": Sample("0.5", 0.5, 0.5),
    "timeout": Sample("7", 7, 7.0),
    "max_requests": Sample("100", 100, 100),
    "max_requests_jitter": Sample("10", 10, 10),
    "max_memory": Sample("512M", "512M", 512 << 20),
    "start": Sample("spawn", "spawn", "spawn"),
    "reload_batch": Sample("2", 2, 2),
    "name": Sample("blue", "blue", "blue"),
    "control": Sample("off", "off", "off"),
    "admin": Sample("127.0.0.1:9100", "127.0.0.1:9100", Address.tcp("127.0.0.1", 9100)),
    "log_level": Sample("WARNING", "warning", "warning"),
    "access_log": Sample("1", True, True),
    "certfile": Sample("/srv/tls/cert.pem", "/srv/tls/cert.pem", "/srv/tls/cert.pem"),
    "keyfile": Sample("/srv/tls/key.pem", "/srv/tls/key.pem", "/srv/tls/key.pem"),
    "ca_certs": Sample("/srv/tls/ca.pem", "/srv/tls/ca.pem", "/srv/tls/ca.pem"),
    "cert_reqs": Sample("required", "required", "required"),
    "proxy_headers": Sample("off", False, False),
    "forwarded_allow_ips": Sample(
        "10.0.0.0/8, 127.0.0.1", ["10.0.0.0/8", "127.0.0.1"], ("10.0.0.0/8", "127.0.0.1")
    ),
    "config": Sample(str(EMPTY_TOML), str(EMPTY_TOML), str(EMPTY_TOML)),
    "user": Sample("nobody", "nobody", "nobody"),
    "group": Sample("0", 0, "0"),
    "umask": Sample("027", 0o27, 0o27),
    "chdir": Sample("/srv/app", "/srv/app", "/srv/app"),
    "pid": Sample("/run/app.pid", "/run/app.pid", "/run/app.pid"),
    "reload": Sample("1", True, True),
    "reload_dir": Sample("src", ["src"], ("src",)),
    "reload_include": Sample("*.html", ["*.html"], ("*.html",)),
    "reload_exclude": Sample("tests/*", ["tests/*"], ("tests/*",)),
    "keep_alive": Sample("0.5", 0.5, 0.5),
    "limit_request_line": Sample("4094", 4094, 4094),
    "limit_request_fields": Sample("100", 100, 100),
    "limit_request_field_size": Sample("2048", 2048, 2048),
}

#: A bad value as text for each command-line option, and what the error must say.
BAD: dict[str, tuple[str, str]] = {
    "interface": ("wsgi", "'wsgi'"),
    "factory": ("perhaps", "expected 1/0, true/false"),
    "protocol": ("perhaps", "expected 1/0, true/false"),
    "workers": ("0", "must be at least 1, not 0"),
    "bind": ("::1:80", "IPv6 addresses in brackets"),
    "backlog": ("many", "'many' is not a whole number"),
    "policy": ("fast", "must be one of shared, rr, reuseport"),
    "balance": ("random", "must be one of round-robin, least-conn"),
    "sticky": ("perhaps", "expected 1/0, true/false"),
    "no_uvloop": ("perhaps", "expected 1/0, true/false"),
    "graceful_timeout": ("-1", "must be a finite number >= 0"),
    "cleanup_timeout": ("later", "'later' is not a number of seconds"),
    "ws_grace": ("-2", "must be a finite number >= 0"),
    "timeout": ("soon", "'soon' is not a number of seconds"),
    "max_requests": ("-1", "must be at least 0"),
    "max_requests_jitter": ("1.5", "'1.5' is not a whole number"),
    "max_memory": ("lots", "a memory size must be bytes"),
    "start": ("vfork", "must be one of fork, spawn"),
    "reload_batch": ("0", "must be at least 1"),
    "name": ("a/b", "cluster name 'a/b' may use only"),
    "admin": ("127.0.0.1:http", "is not a number"),
    "log_level": ("loud", "must be one of debug, info, warning"),
    "access_log": ("perhaps", "expected 1/0, true/false"),
    "cert_reqs": ("maybe", "must be one of none, optional, required"),
    "proxy_headers": ("perhaps", "expected 1/0, true/false"),
    "forwarded_allow_ips": ("10.0.0.300", "'10.0.0.300' is not an IP address or network"),
    "user": ("no-such-user-x", "no user 'no-such-user-x' on this system"),
    "group": ("no-such-group-x", "no group 'no-such-group-x' on this system"),
    "umask": ("0o999", "is not an octal umask like 027"),
    "reload": ("perhaps", "expected 1/0, true/false"),
    "keep_alive": ("0", "must be more than 0 seconds, not 0"),
    "limit_request_line": ("0", "must be at least 1"),
    "limit_request_fields": ("many", "'many' is not a whole number"),
    "limit_request_field_size": ("-5", "must be at least 1"),
}
#: Options for which no text is wrong (an empty variable counts as unset; files, paths and
#: patterns are read or checked when used).
ANY_TEXT = {
    "control",
    "certfile",
    "keyfile",
    "ca_certs",
    "config",
    "chdir",
    "pid",
    "reload_dir",
    "reload_include",
    "reload_exclude",
}

CLI_OPTIONS = [opt for opt in OPTIONS if opt.cli]
#: What ClusterConfig.build needs besides the option tested (balance and sticky need rr).
COMPANIONS: dict[str, dict[str, object]] = {
    "balance": {"policy": "rr"},
    "sticky": {"policy": "rr"},
    "keyfile": {"certfile": "/srv/tls/cert.pem"},
    "ca_certs": {"certfile": "/srv/tls/cert.pem"},
    "cert_reqs": {"certfile": "/srv/tls/cert.pem", "ca_certs": "/srv/tls/ca.pem"},
}


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No AIOCLUSTER_* option variable of the test run itself leaks into these tests."""
    for opt in OPTIONS:
        if opt.env is not None:
            monkeypatch.delenv(opt.env, raising=False)


def parse_run(*args: str) -> Any:
    return build_parser().parse_args(["run", "mod:app", *args])


def flag_args(opt: Option, text: str) -> list[str]:
    if opt.kind == "switch":
        return [opt.flag] if boolean(text) else ["--no-" + opt.flag.removeprefix("--")]
    return [opt.flag] if opt.kind == "flag" else [opt.flag, text]


def by_keyword(opt: Option, value: object) -> Any:
    scopes: tuple[Scope, ...] = (opt.scope,)
    return resolve(arguments({opt.name: value}, scopes), scopes=scopes)[opt.name]


# -- the table itself -------------------------------------------------------------------------


def test_every_option_has_a_sample_and_a_bad_value() -> None:
    assert set(SAMPLES) == {opt.name for opt in CLI_OPTIONS}
    assert set(BAD) | ANY_TEXT == {opt.name for opt in CLI_OPTIONS}


def test_names_flags_and_variables_are_unique_and_derived() -> None:
    names = [opt.name for opt in OPTIONS]
    flags = [flag for opt in OPTIONS for flag in opt.flags]
    assert len(set(names)) == len(names)
    assert len(set(flags)) == len(flags)
    for opt in CLI_OPTIONS:
        assert opt.flag == "--" + opt.name.replace("_", "-")
        assert opt.env == "AIOCLUSTER_" + opt.name.upper()
    # Python-only keywords have neither a flag nor a variable.
    assert {opt.name for opt in OPTIONS if not opt.cli} == {
        "host",
        "port",
        "path",
        "argv",
        "ssl_context",
    }
    assert all(opt.env is None and not opt.flags for opt in OPTIONS if not opt.cli)


@pytest.mark.parametrize("opt", OPTIONS, ids=lambda opt: opt.name)
def test_defaults_pass_their_own_check(opt: Option) -> None:
    default = opt.default_value()
    if default is not None:
        assert opt.parse(default) == default


@pytest.mark.parametrize("opt", CLI_OPTIONS, ids=lambda opt: opt.name)
def test_checks_accept_what_they_return(opt: Option) -> None:
    # The command line checks a flag's text once in argparse and again in resolve().
    value = opt.parse(SAMPLES[opt.name].text)
    assert opt.parse(value) == value


def test_cluster_config_fields_are_the_config_options() -> None:
    fields = {field.name for field in dataclasses.fields(ClusterConfig)}
    assert fields == {opt.name for opt in OPTIONS if opt.scope == "config"} | {"binds"}


def test_run_options_are_keywords_of_run() -> None:
    parameters = inspect.signature(aiocluster.run).parameters
    for opt in OPTIONS:
        if opt.scope == "run":
            # The one inverted name: --no-uvloop is run(use_uvloop=False).
            assert ("use_uvloop" if opt.name == "no_uvloop" else opt.name) in parameters


def test_the_table_loads_nothing_of_the_primary_or_aiohttp() -> None:
    code = (
        "import sys, aiocluster._options, aiocluster._config\n"
        "print(sorted(m for m in sys.modules if m.startswith("
        "('aiocluster.primary', 'aiocluster.ops', 'aiohttp'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# -- parity: flag, variable and keyword mean the same ------------------------------------------


@pytest.mark.parametrize("opt", CLI_OPTIONS, ids=lambda opt: opt.name)
def test_flag_variable_and_keyword_agree(opt: Option) -> None:
    sample = SAMPLES[opt.name]
    from_flag = cli_settings(parse_run(*flag_args(opt, sample.text)), {})
    from_env = cli_settings(parse_run(), {opt.env or "": sample.text})
    assert from_flag[opt.name] == from_env[opt.name] == sample.value
    assert (from_flag.origins[opt.name], from_env.origins[opt.name]) == (
        "command line",
        "environment",
    )
    assert by_keyword(opt, sample.keyword) == sample.value
    if opt.scope == "config":
        config = ClusterConfig.build(**{opt.name: sample.keyword, **COMPANIONS.get(opt.name, {})})
        assert getattr(config, opt.name) == sample.value
    elif opt.scope == "address":
        assert ClusterConfig.build(**{opt.name: sample.keyword}).binds == sample.value
    elif opt.scope == "run":
        assert run_settings(**{opt.name: sample.keyword})[opt.name] == sample.value
    else:  # what APP names: the command line's only
        with pytest.raises(ConfigError, match="command-line option"):
            ClusterConfig.build(**{opt.name: sample.keyword})


def test_every_variable_applies_to_build_and_to_the_command_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    wanted = {opt.name: SAMPLES[opt.name] for opt in CLI_OPTIONS if opt.scope != "command"}
    for name, sample in wanted.items():
        monkeypatch.setenv(option(name).env or "", sample.text)
    monkeypatch.setenv("AIOCLUSTER_BALANCE", "round-robin")  # sticky excludes least-conn
    from_api = ClusterConfig.build()
    from_cli = ClusterConfig.from_settings(cli_settings(parse_run()))
    assert from_api == from_cli
    assert from_api.binds == SAMPLES["bind"].value
    for name, sample in wanted.items():
        if option(name).scope == "config" and name != "balance":
            assert getattr(from_api, name) == sample.value, name
    own = run_settings()
    assert (own["no_uvloop"], own["log_level"], own["access_log"]) == (True, "warning", True)


# -- precedence: argument > environment > default ----------------------------------------------


def test_precedence_in_build(monkeypatch: pytest.MonkeyPatch) -> None:
    assert ClusterConfig.build().workers == default_workers()
    monkeypatch.setenv("AIOCLUSTER_WORKERS", "3")
    monkeypatch.setenv("AIOCLUSTER_TIMEOUT", "5")
    assert ClusterConfig.build().workers == 3
    assert ClusterConfig.build(workers=None).workers == 3  # None: not given
    config = ClusterConfig.build(workers=2)
    assert (config.workers, config.timeout) == (2, 5.0)
    monkeypatch.setenv("AIOCLUSTER_WORKERS", "")  # empty: unset
    assert ClusterConfig.build().workers == default_workers()


def test_precedence_on_the_command_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIOCLUSTER_WORKERS", "3")
    monkeypatch.setenv("AIOCLUSTER_STICKY", "1")
    settings = cli_settings(parse_run("-w", "2", "--policy", "rr"))
    assert (settings["workers"], settings["sticky"], settings["policy"]) == (2, True, "rr")
    assert settings.origins["workers"] == "command line"
    assert settings.origins["sticky"] == "environment"
    assert settings.origins["backlog"] == "default"


def test_addresses_in_the_call_replace_the_environments(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIOCLUSTER_BIND", "127.0.0.1:9001, unix:/tmp/aiocluster-x.sock")
    assert ClusterConfig.build().binds == (
        Address.tcp("127.0.0.1", 9001),
        Address.unix("/tmp/aiocluster-x.sock"),
    )
    assert ClusterConfig.build(port=0).binds == (Address.tcp("127.0.0.1", 0),)
    assert ClusterConfig.build(bind="127.0.0.1:9002").binds == (Address.tcp("127.0.0.1", 9002),)
    monkeypatch.delenv("AIOCLUSTER_BIND")
    assert ClusterConfig.build().binds == (Address.tcp("127.0.0.1", 8000),)
    assert ClusterConfig.build(path="/tmp/a.sock", bind=["127.0.0.1:1"]).binds == (
        Address.tcp("127.0.0.1", 1),
        Address.unix("/tmp/a.sock"),
    )


def test_run_level_options_from_argument_environment_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert run_settings()["no_uvloop"] is False
    monkeypatch.setenv("AIOCLUSTER_NO_UVLOOP", "1")
    assert run_settings()["no_uvloop"] is True
    assert run_settings(no_uvloop=None)["no_uvloop"] is True
    assert run_settings(no_uvloop=False)["no_uvloop"] is False


# -- bad values: one line that says where, what and why ----------------------------------------


@pytest.mark.parametrize("name", sorted(BAD))
def test_a_bad_variable_is_one_clear_line(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    opt = option(name)
    text, why = BAD[name]
    monkeypatch.setenv(opt.env or "", text)
    with pytest.raises(ConfigError) as caught:
        resolve(environment())
    message = str(caught.value)
    assert message.startswith(f"{opt.env}={text!r}: ")
    assert why in message and "\n" not in message


@pytest.mark.parametrize("name", sorted(BAD))
def test_a_bad_keyword_is_one_clear_line(name: str) -> None:
    opt = option(name)
    text, why = BAD[name]
    with pytest.raises(ConfigError) as caught:
        by_keyword(opt, text)
    message = str(caught.value)
    assert message.startswith(f"{name}={text!r}: ")
    assert why in message and "\n" not in message


@pytest.mark.parametrize(
    "name", sorted(name for name in BAD if option(name).kind not in ("flag", "switch"))
)
def test_a_bad_flag_is_one_clear_line(capsys: pytest.CaptureFixture[str], name: str) -> None:
    opt = option(name)
    text, why = BAD[name]
    with pytest.raises(SystemExit) as caught:
        parse_run(opt.flag, text)
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("aiocluster: error: argument ") and opt.flag in err
    assert err.count("\n") == 1
    if not opt.choices:  # argparse says "invalid choice" in its own words
        assert why in err


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["-w", "0"], {}, "aiocluster: error: argument -w/--workers: must be at least 1, not 0"),
        ([], {"AIOCLUSTER_TIMEOUT": "soon"}, "aiocluster: error: AIOCLUSTER_TIMEOUT='soon': "),
        (
            ["--protocol"],
            {"AIOCLUSTER_FACTORY": "1"},
            "aiocluster: error: --factory and --protocol exclude each other "
            "(AIOCLUSTER_FACTORY is set, --protocol is given)",
        ),
    ],
)
def test_the_command_says_one_line_and_exits_2(
    args: list[str], env: dict[str, str], message: str
) -> None:
    proc = subprocess.run(
        [*cli("run", "webapp:app", *args)],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", **env},
        timeout=30,
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith(message)
    assert proc.stderr.count("\n") == 1 and not proc.stdout


def test_an_unknown_keyword_names_it_and_its_close_matches() -> None:
    with pytest.raises(ConfigError, match=r"unknown option 'wrokers' \(did you mean 'workers'\?\)"):
        ClusterConfig.build(wrokers=2)
    with pytest.raises(ConfigError, match=r"unknown option 'max_request'.*'max_requests'"):
        ClusterConfig.build(max_request=2)
    with pytest.raises(ConfigError, match=r"unknown option 'zzz'$"):
        ClusterConfig.build(zzz=1)
    with pytest.raises(ConfigError, match=r"'access_log' is not accepted here: .*aiocluster.run"):
        ClusterConfig.build(access_log=True)


# -- --help ------------------------------------------------------------------------------------


def test_help_lists_every_option_with_its_variable_and_default(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as caught:
        build_parser().parse_args(["run", "--help"])
    assert caught.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines anywhere
    for opt in CLI_OPTIONS:
        assert f"{opt.flag}" in text and f"[env: {opt.env}]" in text
        assert opt.group.title + ":" in text
        shown = opt.default_text()
        if shown is not None:
            assert f"(default: {' '.join(shown.split())})" in text
    for opt in OPTIONS:
        if not opt.cli:
            assert opt.flag not in text


# -- run() reads the environment like the command line ------------------------------------------


async def test_run_takes_its_options_from_the_environment(start_cluster: StartCluster) -> None:
    env = {"AIOCLUSTER_WORKERS": "3", "AIOCLUSTER_BIND": "127.0.0.1:0"}
    c = await start_cluster(sys.executable, "env_app.py", env=env)
    assert len(c.worker_pids) == 3
    d = await start_cluster(sys.executable, "env_app.py", "1", env=env)  # the argument wins
    assert len(d.worker_pids) == 1


async def test_run_takes_its_log_level_from_the_environment(start_cluster: StartCluster) -> None:
    env = {"AIOCLUSTER_WORKERS": "1", "AIOCLUSTER_BIND": "127.0.0.1:0"}
    c = await start_cluster(
        sys.executable, "env_app.py", env={**env, "AIOCLUSTER_LOG_LEVEL": "warning"}, ready=False
    )
    await c.wait_for("TEST on_startup")
    c.signal(signal.SIGTERM)
    assert await c.wait() == 0
    assert " INFO " not in c.output


async def test_run_reports_a_bad_variable_in_one_line(start_cluster: StartCluster) -> None:
    c = await start_cluster(
        sys.executable, "env_app.py", env={"AIOCLUSTER_MAX_REQUESTS": "lots"}, ready=False
    )
    assert await asyncio.wait_for(c.wait(), 30) == 2  # as the command line's own
    assert (
        "aiocluster: error: AIOCLUSTER_MAX_REQUESTS='lots': 'lots' is not a whole number"
        in c.output
    )
    assert "Traceback" not in c.output

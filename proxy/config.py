"""Configuration: TOML parsed once, at start, into frozen dataclasses.

Rules: every key is known (a typo is an error, not a silent default); every value is checked for
type and range; an error names the dotted key, the value and what was expected, and is raised
before the server binds a port. Secrets are never stored here: only the *names* of the environment
variables that hold them, read when the app is built (`proxy/app.py`).
"""

from __future__ import annotations

import fnmatch
import math
import os
import tomllib
from dataclasses import dataclass, field, replace
from typing import Any, Callable

from .errors import ConfigError

PROVIDER_KINDS = ("openai",)


@dataclass(frozen=True, kw_only=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    # Seconds one write to a client may stay pending before the stream is dropped.
    write_timeout: float = 10.0
    # Chunks buffered between the upstream reader and the client writer (the relay's only queue).
    stream_buffer: int = 16
    max_body_bytes: int = 10 * 1024 * 1024
    # SSE comment sent while no event has arrived for this long (slow first token).
    keepalive_interval: float = 15.0
    # Largest single SSE event accepted from a provider; bounds one channel slot.
    max_event_bytes: int = 1024 * 1024
    # On SIGTERM/SIGINT: open streams may finish for this long, then they are cancelled.
    drain_timeout: float = 30.0
    # Processes sharing the listening socket (each a trio loop); 1 = no fork.
    workers: int = 1
    certfile: str | None = None
    keyfile: str | None = None


@dataclass(frozen=True, kw_only=True)
class AuthConfig:
    master_key_env: str | None = "PROXY_MASTER_KEY"


@dataclass(frozen=True, kw_only=True)
class ProviderConfig:
    name: str
    kind: str
    base_url: str
    api_key_env: str | None = None
    max_concurrency: int = 1000
    connect_timeout: float = 5.0
    # LLMs think before they speak: the first byte may take long, later gaps are shorter.
    first_byte_timeout: float = 300.0
    read_timeout: float = 120.0


@dataclass(frozen=True, kw_only=True)
class Deployment:
    provider: str
    model: str
    weight: float = 1.0


@dataclass(frozen=True, kw_only=True)
class ModelRoute:
    name: str  # exact name or glob pattern
    deployments: tuple[Deployment, ...]

    @property
    def is_glob(self) -> bool:
        return any(c in self.name for c in "*?[")


@dataclass(frozen=True, kw_only=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    providers: dict[str, ProviderConfig] = field(default_factory=dict)
    models: tuple[ModelRoute, ...] = ()

    def route(self, model: str) -> ModelRoute | None:
        """Exact names win over globs; otherwise the first matching glob in file order."""
        for route in self.models:
            if not route.is_glob and route.name == model:
                return route
        for route in self.models:
            if route.is_glob and fnmatch.fnmatchcase(model, route.name):
                return route
        return None


# -- checking helpers: each returns the value or raises ConfigError naming key/value/expected --

def _table(raw: Any, key: str) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise ConfigError(key, raw, "a table")
    return raw


def _known(raw: dict[str, Any], key: str, allowed: set[str]) -> None:
    for k in raw:
        if k not in allowed:
            where = f"{key}.{k}" if key else k
            raise ConfigError(where, raw[k], f"no such key (known: {', '.join(sorted(allowed))})")


def _number(key: str, value: Any, *, minimum: float, integer: bool = False) -> Any:
    kinds: tuple[type, ...] = (int,) if integer else (int, float)
    what = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value):
        raise ConfigError(key, value, f"{what} >= {minimum}")
    if value < minimum:
        raise ConfigError(key, value, f"{what} >= {minimum}")
    return value


def _string(key: str, value: Any, *, check: Callable[[str], bool] = bool,
            expected: str = "a non-empty string") -> str:
    if not isinstance(value, str) or not check(value):
        raise ConfigError(key, value, expected)
    return value


def _fields(raw: dict[str, Any], prefix: str, spec: dict[str, Callable[[str, Any], Any]]) -> dict:
    _known(raw, prefix, set(spec))
    return {k: spec[k](f"{prefix}.{k}", v) for k, v in raw.items()}


def _positive(key: str, v: Any) -> float:
    return _number(key, v, minimum=0.001)


def _count(key: str, v: Any) -> int:
    return _number(key, v, minimum=1, integer=True)


def _port(key: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 65535:
        raise ConfigError(key, v, "an integer port 0..65535 (0 picks a free one)")
    return v


def _url(key: str, v: Any) -> str:
    return _string(key, v, check=lambda s: s.startswith(("http://", "https://")),
                   expected="an http:// or https:// URL").rstrip("/")


def _env_name(key: str, v: Any) -> str:
    return _string(key, v, check=lambda s: s.replace("_", "").isalnum(),
                   expected="the name of an environment variable")


def _path(key: str, v: Any) -> str:
    _string(key, v)
    if not os.path.isfile(v):
        raise ConfigError(key, v, "a path to a readable file")
    return v


_SERVER_SPEC: dict[str, Callable[[str, Any], Any]] = {
    "host": lambda k, v: _string(k, v),
    "port": _port,
    "write_timeout": _positive,
    "stream_buffer": _count,
    "max_body_bytes": _count,
    "keepalive_interval": _positive,
    "max_event_bytes": lambda k, v: _number(k, v, minimum=1024, integer=True),
    "drain_timeout": lambda k, v: _number(k, v, minimum=0),
    "workers": lambda k, v: _number(k, v, minimum=1, integer=True),
    "certfile": _path,
    "keyfile": _path,
}

_PROVIDER_SPEC: dict[str, Callable[[str, Any], Any]] = {
    "kind": lambda k, v: _string(k, v, check=lambda s: s in PROVIDER_KINDS,
                                 expected=f"one of {', '.join(PROVIDER_KINDS)}"),
    "base_url": _url,
    "api_key_env": _env_name,
    "max_concurrency": _count,
    "connect_timeout": _positive,
    "first_byte_timeout": _positive,
    "read_timeout": _positive,
}


def _provider(name: str, raw: Any) -> ProviderConfig:
    key = f"providers.{name}"
    values = _fields(_table(raw, key), key, _PROVIDER_SPEC)
    for required in ("kind", "base_url"):
        if required not in values:
            raise ConfigError(f"{key}.{required}", None, "a value (this key is required)")
    return ProviderConfig(name=name, **values)


def _deployment(key: str, raw: Any, model_name: str, providers: dict[str, ProviderConfig]) -> Deployment:
    raw = _table(raw, key)
    _known(raw, key, {"provider", "model", "weight"})
    provider = raw.get("provider")
    if provider not in providers:
        raise ConfigError(f"{key}.provider", provider,
                          f"the name of a [providers.*] table ({', '.join(providers) or 'none defined'})")
    model = raw.get("model", model_name)
    if "model" not in raw and any(c in model_name for c in "*?["):
        model = ""  # a glob route forwards the requested name (see router)
    elif not isinstance(model, str) or not model:
        raise ConfigError(f"{key}.model", model, "a non-empty string")
    weight = _number(f"{key}.weight", raw.get("weight", 1), minimum=0)
    return Deployment(provider=provider, model=model, weight=weight)


def _model(name: str, raw: Any, providers: dict[str, ProviderConfig]) -> ModelRoute:
    key = f'models."{name}"'
    raw = _table(raw, key)
    _known(raw, key, {"deployments"})
    deployments = raw.get("deployments")
    if not isinstance(deployments, list) or not deployments:
        raise ConfigError(f"{key}.deployments", deployments, "a non-empty list of {provider=..., model=...}")
    parsed = tuple(_deployment(f"{key}.deployments[{i}]", d, name, providers)
                   for i, d in enumerate(deployments))
    if sum(d.weight for d in parsed) <= 0:
        raise ConfigError(f"{key}.deployments", deployments, "at least one deployment with weight > 0")
    return ModelRoute(name=name, deployments=parsed)


def parse_config(raw: dict[str, Any]) -> Config:
    _known(raw, "", {"server", "auth", "providers", "models"})
    server = ServerConfig(**_fields(_table(raw.get("server", {}), "server"), "server", _SERVER_SPEC))
    if (server.certfile is None) != (server.keyfile is None):
        raise ConfigError("server.certfile", server.certfile, "certfile and keyfile set together")
    auth_raw = _table(raw.get("auth", {}), "auth")
    auth = AuthConfig(**_fields(auth_raw, "auth", {"master_key_env": _env_name}))
    providers = {name: _provider(name, p)
                 for name, p in _table(raw.get("providers", {}), "providers").items()}
    models = tuple(_model(name, m, providers)
                   for name, m in _table(raw.get("models", {}), "models").items())
    if not models:
        raise ConfigError("models", {}, "at least one [models.NAME] table")
    return Config(server=server, auth=auth, providers=providers, models=models)


def with_server_overrides(config: Config, overrides: dict[str, Any]) -> Config:
    """Command-line overrides of [server] keys (--host, --port, --workers), checked like the file's."""
    checked = {k: _SERVER_SPEC[k](f"--{k}", v) for k, v in overrides.items()}
    return replace(config, server=replace(config.server, **checked))


def load_config(path: str) -> Config:
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except OSError as e:
        raise ConfigError("--config", path, f"a readable TOML file ({e.strerror})") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError("--config", path, f"valid TOML ({e})") from None
    return parse_config(raw)


def check_environment(config: Config, environ: dict[str, str] | os._Environ = os.environ) -> None:
    """Fail at start when a provider's key variable is named but not set."""
    for p in config.providers.values():
        if p.api_key_env is not None and not environ.get(p.api_key_env):
            raise ConfigError(f"providers.{p.name}.api_key_env", p.api_key_env,
                              "the name of an environment variable that is set")

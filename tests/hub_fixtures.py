"""Pytest fixtures that point huggingface_hub and transformers at a loopback Hub (`tests/hub_server.py`).

`local_hub` gives each test a fresh server, token and HF_HOME; `module_local_hub` shares one server across a test
module (a model pushed once, pulled by several tests: call `fresh_cache()` for an empty download cache). Load with
`pytest_plugins = ["hub_fixtures"]` in a test module or from conftest.py.

huggingface_hub reads HF_ENDPOINT, the cache paths, HF_HUB_OFFLINE and HF_HUB_DISABLE_XET once, at import, into
`huggingface_hub.constants`, and several objects keep a copy: the module-level `HfApi` behind `huggingface_hub.
create_repo` & co, and transformers' shared `HfApi`. The fixtures patch all of them and undo it afterwards.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import huggingface_hub.constants as hub_constants
import huggingface_hub.hf_api
import huggingface_hub.utils as hub_utils
import pytest
import transformers.utils.hub
from hub_server import HubServer

# The start of a child script run with `python -I` and a cwd outside the repository, where xlstm_hf cannot be
# imported however it is installed (editable finder, site-packages, a path entry): a finder placed first answers every
# `xlstm_hf` import with ModuleNotFoundError, as on a machine without the package.
WITHOUT_THE_PACKAGE = r"""
import json, sys

class NotInstalled:
    def find_spec(self, name, path=None, target=None):
        if name == "xlstm_hf" or name.startswith("xlstm_hf."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, NotInstalled())
try:
    import xlstm_hf
except ImportError:
    pass
else:
    sys.exit(f"xlstm_hf is importable from {xlstm_hf.__file__}")
"""


def run_without_the_package(
    script: str, *args: str, tmp: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Runs a child script that starts with WITHOUT_THE_PACKAGE: `python -I` in `tmp / "no_package"`, stdin closed (a
    trust_remote_code prompt fails instead of waiting). `env` defaults to this process's, offline, with an HF home and
    a remote-code module cache of its own under `tmp`."""
    workdir = tmp / "no_package"
    workdir.mkdir(exist_ok=True)
    if env is None:
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
        env.update(HF_HOME=str(tmp / "hf_home"), HF_MODULES_CACHE=str(tmp / "modules"), HF_HUB_OFFLINE="1")
    return subprocess.run(
        [sys.executable, "-I", "-c", script, *args],
        cwd=workdir,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=240,
    )


TOKEN = "hf_local_test_token"


class LocalHub:
    """A running loopback Hub and the environment that points the Hugging Face libraries at it."""

    def __init__(self, server: HubServer, home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.server = server
        self.home = home
        self._monkeypatch = monkeypatch
        self._caches = 0
        self.cache_dir = self.fresh_cache()

    @property
    def endpoint(self) -> str:
        return self.server.endpoint

    @property
    def token(self) -> str:
        return self.server.token

    def fresh_cache(self) -> Path:
        """Point the download cache at a new empty folder and return it."""
        self._caches += 1
        cache = self.home / f"hub-cache-{self._caches}"
        cache.mkdir(parents=True)
        self._monkeypatch.setenv("HF_HUB_CACHE", str(cache))
        self._monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
        self._monkeypatch.setattr(hub_constants, "HUGGINGFACE_HUB_CACHE", str(cache))
        self.cache_dir = cache
        return cache

    def set_offline(self, offline: bool = True) -> None:
        """HF_HUB_OFFLINE as the libraries see it at call time (the constant) and as a subprocess sees it (env)."""
        self._monkeypatch.setenv("HF_HUB_OFFLINE", "1" if offline else "0")
        self._monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", offline)

    def subprocess_env(self, **extra: str) -> dict[str, str]:
        """The environment for a child process: same endpoint, token and caches, no PYTHONPATH."""
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
        env.update(extra)
        return env


def _patch_environment(monkeypatch: pytest.MonkeyPatch, endpoint: str, token: str, home: Path) -> None:
    env = {
        "HF_ENDPOINT": endpoint,
        "HF_TOKEN": token,
        "HF_HOME": str(home),
        "HF_TOKEN_PATH": str(home / "token"),
        "HF_XET_CACHE": str(home / "xet"),
        "HF_MODULES_CACHE": str(home / "modules"),
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_UPDATE_CHECK": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HUGGINGFACE_HUB_CACHE", "HF_ASSETS_CACHE"):
        monkeypatch.delenv(key, raising=False)

    constants = {
        "ENDPOINT": endpoint,
        "HUGGINGFACE_CO_URL_TEMPLATE": endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HOME": str(home),
        "HF_TOKEN_PATH": str(home / "token"),
        "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
        "HF_XET_CACHE": str(home / "xet"),
        "HF_ASSETS_CACHE": str(home / "assets"),
        "HUGGINGFACE_ASSETS_CACHE": str(home / "assets"),
        # Files answered "lfs" by preupload would otherwise go through Xet (hf_xet is installed), which has no
        # fallback: the loopback Hub speaks the classic LFS batch API instead.
        "HF_HUB_DISABLE_XET": True,
        "HF_HUB_OFFLINE": False,
        "HF_HUB_DISABLE_TELEMETRY": True,
    }
    for key, value in constants.items():
        monkeypatch.setattr(hub_constants, key, value)
    monkeypatch.setattr(huggingface_hub.hf_api.api, "endpoint", endpoint)
    monkeypatch.setattr(transformers.utils.hub, "_hf_api", None)


@contextlib.contextmanager
def local_hub_context(home: Path) -> Iterator[LocalHub]:
    """Start a loopback Hub, point the libraries at it with HF_HOME=`home`, and undo both on exit."""
    bars_were_disabled = hub_utils.are_progress_bars_disabled()
    hub_utils.disable_progress_bars()
    try:
        with HubServer(token=TOKEN) as server, pytest.MonkeyPatch.context() as monkeypatch:
            _patch_environment(monkeypatch, server.endpoint, server.token, home)
            yield LocalHub(server, home, monkeypatch)
    finally:
        if not bars_were_disabled:
            hub_utils.enable_progress_bars()


@pytest.fixture
def local_hub(tmp_path: Path) -> Iterator[LocalHub]:
    with local_hub_context(tmp_path / "hf_home") as hub:
        yield hub


@pytest.fixture(scope="module")
def module_local_hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalHub]:
    with local_hub_context(tmp_path_factory.mktemp("hf_home")) as hub:
        yield hub

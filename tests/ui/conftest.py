"""Session fixtures for the browser tests: one JupyterLab server and one headless Chromium per session.

The server runs on 127.0.0.1 with a random free port and token, with its own config, data, runtime,
settings and workspaces directories in a temporary folder, and with VQLAB_FAST=1 so kernels run the
notebooks in fast mode. Both server and browser are stopped at the end of the session, also on failure.

Environment:
  VQLAB_UI_NOTEBOOKS  folder whose *.ipynb are tested (default: <repo>/notebooks)
  VQLAB_CHROMIUM      Chromium executable (default: /usr/bin/chromium, else `chromium` on PATH)
  VQLAB_UI_REQUIRED=1 fail instead of skip when Chromium / Playwright / JupyterLab are missing
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ui_paths import ARTIFACTS, NOTEBOOK_DIR

CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run", "--disable-quic",
]
ENABLE_HINT = (
    "to enable the browser tests: `sudo apt-get install -y chromium` and `pip install playwright` "
    "(Playwright drives the system Chromium; do not run `playwright install`)"
)
# JupyterLab user settings for the test server: no news/update toast, no autosave (the notebooks under
# test must not be rewritten with outputs), every cell rendered (no windowing), no extension manager.
LAB_SETTINGS = {
    "@jupyterlab/apputils-extension/notification": {"fetchNews": "false", "checkForUpdates": False},
    "@jupyterlab/docmanager-extension/plugin": {"autosave": False},
    "@jupyterlab/notebook-extension/tracker": {"windowingMode": "none", "autoStartDefaultKernel": True},
    "@jupyterlab/extensionmanager-extension/plugin": {"enabled": False},
}


def _missing(reason: str) -> None:
    """Skip (or fail when VQLAB_UI_REQUIRED=1) with a reason that says how to enable the tests."""
    message = f"{reason}; {ENABLE_HINT}"
    if os.environ.get("VQLAB_UI_REQUIRED") == "1":
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def chromium_path() -> str | None:
    """The Chromium executable to drive, or None when there is none."""
    env = os.environ.get("VQLAB_CHROMIUM")
    if env:
        return env if os.access(env, os.X_OK) else None
    if os.access("/usr/bin/chromium", os.X_OK):
        return "/usr/bin/chromium"
    return shutil.which("chromium")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LabServer:
    """A running `jupyter lab`: base URL, token, the folder it serves, and its process."""
    url: str
    token: str
    root: Path
    proc: subprocess.Popen
    tmp: Path
    log_path: Path
    workspace_counter: int = field(default=0)

    def api(self, method: str, path: str, timeout: float = 10.0):
        """Call the server's REST API; returns the decoded JSON (None for an empty body)."""
        req = urllib.request.Request(f"{self.url}{path}", method=method,
                                     headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            body = resp.read()
        return json.loads(body) if body else None

    def notebook_url(self, relpath: str) -> str:
        """URL that opens `relpath` (relative to the served folder) in a fresh, empty workspace."""
        self.workspace_counter += 1
        return f"{self.url}/lab/workspaces/ui{self.workspace_counter}/tree/{relpath}?reset&token={self.token}"

    def shutdown_kernels(self) -> None:
        """Shut down every kernel of this server (frees the CPU between notebooks)."""
        try:
            for kernel in self.api("GET", "/api/kernels"):
                try:
                    self.api("DELETE", f"/api/kernels/{kernel['id']}", timeout=30)
                except (urllib.error.URLError, OSError):
                    pass
        except (urllib.error.URLError, OSError):
            pass

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def _write_settings(settings_dir: Path) -> None:
    for plugin, values in LAB_SETTINGS.items():
        path = settings_dir / f"{plugin}.jupyterlab-settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))


def _kill_leftover_kernels(runtime_dir: Path) -> None:
    """Kill kernels still running from this server (they are launched in their own sessions, so
    killing the server's process group does not reach them): found by their connection file path."""
    proc = Path("/proc")
    if not proc.is_dir():
        return
    marker = str(runtime_dir).encode()
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if marker in cmdline and b"ipykernel" in cmdline:
            try:
                os.kill(int(entry.name), signal.SIGKILL)
            except OSError:
                pass


def _die_with_parent() -> None:
    """Linux: have the child get SIGTERM when the test process dies (even by SIGKILL), so a killed test
    run does not leave a JupyterLab server behind. Runs in the child between fork and exec."""
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _stop_group(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """SIGTERM the process group of `proc` (it leads its own session), SIGKILL it if it lingers."""
    if proc.poll() is not None:
        return
    if not hasattr(os, "killpg"):  # not POSIX: no process groups
        proc.terminate()
        proc.wait(timeout=timeout)
        return
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="session")
def lab_server(chromium_exe):
    """Start `jupyter lab` serving NOTEBOOK_DIR; yield a LabServer; always stop it."""
    try:
        import jupyterlab  # noqa: F401
    except ImportError:
        _missing("JupyterLab is not installed (`pip install jupyterlab`)")
    tmp = Path(tempfile.mkdtemp(prefix="vqlab-ui-"))
    dirs = {name: tmp / name for name in ("config", "data", "runtime", "settings", "workspaces", "ipython", "checkpoints")}
    for d in dirs.values():
        d.mkdir()
    _write_settings(dirs["settings"])
    env = dict(os.environ)
    env.update(
        VQLAB_FAST="1",
        JUPYTER_CONFIG_DIR=str(dirs["config"]),
        JUPYTER_DATA_DIR=str(dirs["data"]),
        JUPYTER_RUNTIME_DIR=str(dirs["runtime"]),
        JUPYTERLAB_SETTINGS_DIR=str(dirs["settings"]),
        JUPYTERLAB_WORKSPACES_DIR=str(dirs["workspaces"]),
        IPYTHONDIR=str(dirs["ipython"]),
        JUPYTER_PLATFORM_DIRS="1",
        PYTHONUNBUFFERED="1",
    )
    env.pop("JUPYTER_PATH", None)
    token = os.urandom(16).hex()
    port = _free_port()
    cmd = [
        sys.executable, "-m", "jupyterlab",
        "--no-browser", "--ip=127.0.0.1", f"--port={port}", "--ServerApp.port_retries=0",
        f"--ServerApp.token={token}", f"--ServerApp.root_dir={NOTEBOOK_DIR}",
        "--ServerApp.terminals_enabled=False", "--LabApp.expose_app_in_browser=True",
        # checkpoints (written when a notebook is opened) go to the temporary folder, not next to it
        f"--FileCheckpoints.checkpoint_dir={dirs['checkpoints']}",
    ]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-root")
    log_path = tmp / "jupyter-lab.log"
    log = open(log_path, "wb")
    proc = subprocess.Popen(cmd, cwd=NOTEBOOK_DIR, env=env, stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True,
                            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
    server = LabServer(url=f"http://127.0.0.1:{port}", token=token, root=NOTEBOOK_DIR, proc=proc,
                       tmp=tmp, log_path=log_path)
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                pytest.fail(f"jupyter lab exited with {proc.returncode}:\n{server.log_tail()}", pytrace=False)
            try:
                server.api("GET", "/api/status", timeout=2)
                break
            except (urllib.error.URLError, OSError):
                if time.monotonic() > deadline:
                    pytest.fail(f"jupyter lab not ready after 90 s:\n{server.log_tail()}", pytrace=False)
                time.sleep(0.25)
        yield server
    finally:
        server.shutdown_kernels()
        _stop_group(proc)
        _kill_leftover_kernels(dirs["runtime"])
        log.close()
        try:
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(log_path, ARTIFACTS / "jupyter-lab.log")
        except OSError:
            pass
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="session")
def chromium_exe() -> str:
    """Chromium's path, after checking that Playwright and Chromium are there (skip with a hint if not)."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        _missing("Playwright for Python is not installed")
    exe = chromium_path()
    if exe is None:
        _missing("Chromium not found (looked for $VQLAB_CHROMIUM, /usr/bin/chromium, `chromium` on PATH)")
    return exe


@pytest.fixture(scope="session")
def browser(chromium_exe, lab_server):
    """Headless system Chromium driven by Playwright; closed at the end of the session.
    (Started after the server: the server is forked before Playwright's helper threads exist.)"""
    from playwright.sync_api import sync_playwright
    pw = sync_playwright().start()
    try:
        browser = pw.chromium.launch(executable_path=chromium_exe, headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()
    finally:
        pw.stop()


@pytest.fixture
def page(lab_server, browser):
    """A fresh browser context and page per notebook; kernels are shut down afterwards."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000}, device_scale_factor=1)
    page = context.new_page()
    page.set_default_timeout(30_000)
    try:
        yield page
    finally:
        context.close()
        lab_server.shutdown_kernels()

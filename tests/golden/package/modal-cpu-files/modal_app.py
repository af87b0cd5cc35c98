"""files on Modal, served by runner over Cog's HTTP API.

Written by `runner package --target modal`; deploy with ./deploy.sh (see README.md).
Modal snapshots the container once runner has loaded the model (CPU memory), so
later cold starts restore the loaded model instead of loading the weights again.
"""

import json
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import modal

APP_NAME = "files"
GPU = None
PORT = 5000
CONCURRENCY = 1
# Seconds an idle container is kept before Modal scales it down.
SCALEDOWN_WINDOW = 300
# Seconds runner may take to load the model (first start, before any snapshot exists).
STARTUP_TIMEOUT = 300

HERE = Path(__file__).resolve().parent
RUNNER = "/opt/runner/bin/runner"
MODEL_DIR = "/opt/runner/model"

image = (
    modal.Image.debian_slim(python_version="3.12")
    .env({"PYTHONUNBUFFERED": "1"})
    # The model (weights included) before the binary: the layer that changes least first.
    .add_local_dir(HERE / "model", MODEL_DIR, copy=True)
    .add_local_file(HERE / "bin" / "runner", RUNNER, copy=True)
)

app = modal.App(APP_NAME)


def _health() -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{PORT}/health-check", timeout=5) as response:
        return json.load(response)


@app.cls(
    image=image,
    gpu=GPU,
    enable_memory_snapshot=True,
    scaledown_window=SCALEDOWN_WINDOW,
    timeout=3600,
)
@modal.concurrent(max_inputs=CONCURRENCY)
class Runner:
    @modal.enter(snap=True)
    def start(self) -> None:
        """Start runner and wait until the model is loaded; Modal snapshots after this."""
        self.process = subprocess.Popen(
            [RUNNER, "serve", MODEL_DIR, "--host", "0.0.0.0", "--port", str(PORT), "--device", "cpu"]
        )
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"runner exited with status {self.process.returncode} while loading the model")
            try:
                health = _health()
            except (urllib.error.URLError, OSError, ValueError):
                health = {}
            status = health.get("status")
            if status in ("READY", "BUSY"):
                return
            if status == "SETUP_FAILED":
                logs = (health.get("setup") or {}).get("logs", "")
                raise RuntimeError(f"runner could not load the model:\n{logs}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"runner was not ready after {STARTUP_TIMEOUT} s")
            time.sleep(0.2)

    @modal.web_server(PORT, startup_timeout=STARTUP_TIMEOUT)
    def serve(self) -> None:
        """Cog's HTTP API (POST /predictions, /openapi.json, ...): runner already listens."""

    @modal.exit()
    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()

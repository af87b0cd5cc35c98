# conformance as a standard Cog predictor that forwards each prediction to runner.
# Written by `runner package --target replicate`. Its signature is the model's, so Cog
# builds the same schema (openapi.json). setup() starts `runner serve` on 127.0.0.1 from
# bin/runner and model/; predict() sends the inputs there and returns runner's output,
# streaming when the model streams. In the image built from Dockerfile this file is not
# used (runner serves directly); it is the predictor of the standard-Cog-project mode.
# Only the Python standard library and Cog are needed.

import base64
import json
import mimetypes
import os
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path as _LocalPath
from typing import List, Optional
from cog import BaseModel, BasePredictor, Input, Path, Secret

_ROOT = _LocalPath(__file__).resolve().parent
_SETUP_TIMEOUT = float(os.environ.get("RUNNER_SETUP_TIMEOUT", "300"))


class _Runner:
    """A `runner serve` child process on a free loopback port."""

    def __init__(self) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        binary = os.environ.get("RUNNER_BIN") or str(_ROOT / "bin" / "runner")
        # runner answers on loopback only (Cog's own server faces the network) and exits
        # if this worker is killed, so a restarted worker never finds the port's twin.
        self.process = subprocess.Popen(
            [binary, "serve", str(_ROOT / "model"), "--host", "127.0.0.1", "--port", str(port), "--exit-with-parent"]
        )
        deadline = time.monotonic() + _SETUP_TIMEOUT
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"runner exited with status {self.process.returncode} while loading the model")
            try:
                health = self._call("GET", "/health-check")
            except (urllib.error.URLError, OSError, ValueError):
                health = {}
            status = health.get("status")
            if status in ("READY", "BUSY"):
                print(f"predict.py: runner (pid {self.process.pid}) serves the model at {self.url}", flush=True)
                return
            if status == "SETUP_FAILED":
                raise RuntimeError("runner could not load the model:\n" + (health.get("setup") or {}).get("logs", ""))
            if time.monotonic() > deadline:
                raise TimeoutError(f"runner was not ready after {_SETUP_TIMEOUT:g} s")
            time.sleep(0.1)

    def _call(self, method: str, path: str, body=None, timeout=10):
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method)
        request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return json.load(response)
        except urllib.error.HTTPError as e:
            # 422 and friends: runner's JSON body says what is wrong.
            raise ValueError(f"runner refused the prediction ({e.code}): {e.read().decode(errors='replace')}") from None

    def predict(self, inputs: dict):
        prediction_id = uuid.uuid4().hex
        try:
            result = self._call("PUT", f"/predictions/{prediction_id}", {"input": inputs}, timeout=None)
        except BaseException:
            self._cancel(prediction_id)
            raise
        print(result.get("logs") or "", end="")
        if result.get("status") != "succeeded":
            raise RuntimeError(result.get("error") or f"prediction {result.get('status')}")
        return result.get("output")

    def stream(self, inputs: dict):
        """Yields output chunks as runner's event stream delivers them."""
        prediction_id = uuid.uuid4().hex
        request = urllib.request.Request(
            f"{self.url}/predictions/{prediction_id}",
            data=json.dumps({"input": inputs}).encode(),
            method="PUT",
            headers={"Content-Type": "application/json", "Accept": "text/event-stream"},
        )
        try:
            with urllib.request.urlopen(request) as response:
                event, data = None, []
                for raw in response:
                    line = raw.decode().rstrip("\r\n")
                    if line.startswith("event:"):
                        event = line[6:].strip()
                    elif line.startswith("data:"):
                        data.append(line[5:].lstrip(" "))
                    elif line == "" and event is not None:
                        payload = json.loads("\n".join(data)) if data else {}
                        if event == "output":
                            yield payload["chunk"]
                        elif event == "log":
                            print(payload.get("data", ""), end="")
                        elif event == "completed":
                            if payload.get("status") != "succeeded":
                                raise RuntimeError(payload.get("error") or f"prediction {payload.get('status')}")
                            return
                        elif event == "error":
                            raise RuntimeError(payload.get("error", "runner's event stream failed"))
                        event, data = None, []
        except urllib.error.HTTPError as e:
            raise ValueError(f"runner refused the prediction ({e.code}): {e.read().decode(errors='replace')}") from None
        except BaseException:
            self._cancel(prediction_id)
            raise

    def _cancel(self, prediction_id: str) -> None:
        try:
            self._call("POST", f"/predictions/{prediction_id}/cancel", {})
        except Exception:
            pass


def _file_to_uri(value) -> str:
    """A Cog Path (a local file) or File (a file object) as a data URI for runner."""
    if hasattr(value, "read"):
        data = value.read()
        name = getattr(value, "name", "")
    else:
        data = _LocalPath(value).read_bytes()
        name = str(value)
    if isinstance(data, str):
        data = data.encode()
    mime = mimetypes.guess_type(str(name))[0] or "application/octet-stream"
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def _encode(value, kind):
    """Inputs in runner's JSON form; `kind` mirrors the input's declared type."""
    if value is None:
        return None
    if kind == "file":
        return _file_to_uri(value)
    if kind == "secret":
        return value.get_secret_value() if hasattr(value, "get_secret_value") else value
    if isinstance(kind, tuple) and kind[0] == "list":
        return [_encode(v, kind[1]) for v in value]
    return value


def _decode(value, kind):
    """runner's output back in Cog's types; files arrive as data URIs."""
    if value is None:
        return None
    if kind == "file":
        header, _, payload = value.partition(",")
        suffix = mimetypes.guess_extension(header[5:].split(";")[0]) or ""
        handle, name = tempfile.mkstemp(suffix=suffix)
        with os.fdopen(handle, "wb") as f:
            f.write(base64.b64decode(payload) if ";base64" in header else payload.encode())
        return Path(name)
    if isinstance(kind, tuple) and kind[0] == "list":
        return [_decode(v, kind[1]) for v in value]
    if isinstance(kind, tuple) and kind[0] == "object":
        return kind[1](**{k: _decode(value.get(k), kind[2].get(k, "value")) for k in value})
    return value


class Output(BaseModel):
    text: str
    count: int
    ratio: float
    flag: bool
    color: str
    size: int
    code: str
    api_key_length: int
    note_given: bool
    tags: List[str]


class Predictor(BasePredictor):
    def setup(self) -> None:
        self.runner = _Runner()

    def predict(
        self,
        text: str = Input(description="Any text, 1 to 200 characters", min_length=1, max_length=200),
        count: int = Input(description="How many times to repeat the text", default=3, ge=1, le=10),
        ratio: float = Input(description="A number from 0 to 1", default=0.5, ge=0.0, le=1.0),
        flag: bool = Input(description="A boolean", default=False),
        color: str = Input(description="A string choice", default="red", choices=["red", "green", "blue"]),
        size: int = Input(description="An integer choice", default=1, choices=[1, 2, 3]),
        code: str = Input(description="Letters then digits", default="ab12", regex="^[a-z]+[0-9]+$"),
        api_key: Secret = Input(description="A secret; only its length is echoed", default=None),
        note: Optional[str] = Input(description="Optional, without a default"),
        tags: List[str] = Input(description="A list with a default", default=["a", "b"]),
        legacy: bool = Input(description="Deprecated; ignored", default=False, deprecated=True),
        sleep: float = Input(description="Seconds to stay busy before answering", default=0.0, ge=0.0, le=600.0),
        fail: bool = Input(description="Fail the prediction on purpose", default=False),
    ) -> Output:
        inputs = {
            "text": _encode(text, "value"),
            "count": _encode(count, "value"),
            "ratio": _encode(ratio, "value"),
            "flag": _encode(flag, "value"),
            "color": _encode(color, "value"),
            "size": _encode(size, "value"),
            "code": _encode(code, "value"),
            "api_key": _encode(api_key, "secret"),
            "note": _encode(note, "value"),
            "tags": _encode(tags, ("list", "value")),
            "legacy": _encode(legacy, "value"),
            "sleep": _encode(sleep, "value"),
            "fail": _encode(fail, "value"),
        }
        inputs = {k: v for k, v in inputs.items() if v is not None}
        return _decode(self.runner.predict(inputs), ("object", Output, {"text": "value", "count": "value", "ratio": "value", "flag": "value", "color": "value", "size": "value", "code": "value", "api_key_length": "value", "note_given": "value", "tags": ("list", "value")}))

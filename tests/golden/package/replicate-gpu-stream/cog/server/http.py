"""`python -m cog.server.http`, answered by runner.

Replicate starts every Cog image with this command and Cog's flags. In this image runner
serves the model, so this module maps the flags onto `runner serve` and execs it: the
process Replicate supervises is runner itself. Written by `runner package`.
"""

import argparse
import os
import sys
from pathlib import Path

# cog/server/http.py -> the package root, which holds bin/runner and model/.
ROOT = Path(__file__).resolve().parent.parent.parent


def flag(value: str) -> bool:
    """Cog's flag parser takes any non-empty value as true; be exact instead."""
    v = value.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def command(argv: list) -> list:
    parser = argparse.ArgumentParser(prog="python -m cog.server.http", description="Cog HTTP server (runner)")
    parser.add_argument("-v", "--version", action="store_true", help="Show version and exit")
    parser.add_argument("--host", default="0.0.0.0", help="Host to bind to")
    parser.add_argument(
        "--await-explicit-shutdown",
        type=flag,
        nargs="?",
        const=True,
        default=False,
        help="Ignore SIGTERM and wait for POST /shutdown (or SIGINT)",
    )
    parser.add_argument("--x-mode", default="predict", choices=["predict", "train"])
    parser.add_argument("--threads", type=int, default=None, help="Accepted for compatibility; runner sizes its own")
    parser.add_argument("--upload-url", default=None, help="PUT file outputs under this URL")
    args = parser.parse_args(argv)

    runner = os.environ.get("RUNNER_BIN") or str(ROOT / "bin" / "runner")
    if args.version:
        return [runner, "--version"]
    if args.x_mode == "train":
        parser.error("--x-mode train: this model has no train() in runner; only predictions are served")
    model = str(ROOT / "model")
    cmd = [runner, "serve", model, "--host", args.host, "--port", os.environ.get("PORT", "5000")]
    if args.upload_url:
        cmd += ["--upload-url", args.upload_url]
    if args.await_explicit_shutdown:
        cmd.append("--await-explicit-shutdown")
    return cmd


def main() -> None:
    cmd = command(sys.argv[1:])
    if not os.access(cmd[0], os.X_OK):
        sys.exit(f"cog.server.http: runner binary {cmd[0]} is missing or not executable")
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(cmd[0], cmd)


if __name__ == "__main__":
    main()

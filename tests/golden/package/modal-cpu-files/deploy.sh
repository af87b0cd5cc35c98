#!/usr/bin/env bash
# Deploy files to Modal. Written by `runner package --target modal`.
#   ./deploy.sh
# Needs the modal client 1.6.4 (pinned: modal_app.py uses that version's API) and
# a Modal account (`python3 -m modal setup` once).
set -euo pipefail
MODAL_VERSION=1.6.4
cd "$(dirname "${BASH_SOURCE[0]}")"

if ! python3 -c "import modal, sys; sys.exit(modal.__version__ != '$MODAL_VERSION')" 2>/dev/null; then
  echo "deploy: needs the modal client $MODAL_VERSION:" >&2
  echo "  python3 -m pip install modal==$MODAL_VERSION && python3 -m modal setup" >&2
  exit 1
fi

# The files must be the ones `runner package` wrote (runner-package.json lists their sha256).
python3 - <<'CHECK'
import hashlib, json, pathlib, sys
bad = [f["path"] for f in json.loads(pathlib.Path("runner-package.json").read_text())["files"]
       if hashlib.sha256(pathlib.Path(f["path"]).read_bytes()).hexdigest() != f["sha256"]]
if bad:
    sys.exit("deploy: these files changed since `runner package` wrote them: " + ", ".join(bad))
CHECK

python3 -m modal deploy modal_app.py
echo "deploy: done. The URL printed above answers Cog's HTTP API, e.g.:"
echo "  curl -s URL/predictions -H 'Content-Type: application/json' -d '{\"input\": {...}}'"

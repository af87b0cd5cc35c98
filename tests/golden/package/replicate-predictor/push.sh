#!/usr/bin/env bash
# Push conformance to Replicate as r8.im/OWNER/NAME. Written by `runner package --target replicate`.
#   ./push.sh OWNER/NAME
# Needs Docker and the Cog CLI 0.23.1 (pinned: the flags below are that version's).
# With REPLICATE_API_TOKEN set, it first creates the model on Replicate when it does not
# exist yet (from replicate-model.json, hardware cpu, private).
set -euo pipefail
COG_VERSION=0.23.1
cd "$(dirname "${BASH_SOURCE[0]}")"

MODEL="${1:-}"
MODEL="${MODEL#r8.im/}"
case "$MODEL" in
  */*) ;;
  *) echo "usage: ./push.sh OWNER/NAME   (the Replicate model to push to, e.g. alice/conformance)" >&2; exit 2 ;;
esac
OWNER="${MODEL%%/*}"
NAME="${MODEL#*/}"

if ! command -v cog >/dev/null 2>&1 || ! cog --version 2>/dev/null | grep -q "cog version $COG_VERSION"; then
  echo "push: this package was written for Cog CLI $COG_VERSION; install it with:" >&2
  echo "  sudo curl -fL -o /usr/local/bin/cog https://github.com/replicate/cog/releases/download/v$COG_VERSION/cog_\$(uname -s)_\$(uname -m) && sudo chmod +x /usr/local/bin/cog" >&2
  exit 1
fi

# The files must be the ones `runner package` wrote (runner-package.json lists their sha256).
python3 - <<'CHECK'
import hashlib, json, pathlib, sys
bad = [f["path"] for f in json.loads(pathlib.Path("runner-package.json").read_text())["files"]
       if hashlib.sha256(pathlib.Path(f["path"]).read_bytes()).hexdigest() != f["sha256"]]
if bad:
    sys.exit("push: these files changed since `runner package` wrote them: " + ", ".join(bad))
CHECK

if [ -n "${REPLICATE_API_TOKEN:-}" ]; then
  status="$(curl -sS -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $REPLICATE_API_TOKEN" \
    "https://api.replicate.com/v1/models/$OWNER/$NAME")"
  if [ "$status" = 404 ]; then
    echo "push: creating model $OWNER/$NAME on Replicate" >&2
    sed -e "s|\"<owner>\"|\"$OWNER\"|" -e "s|\"<name>\"|\"$NAME\"|" replicate-model.json |
      curl -fsS -X POST -H "Authorization: Bearer $REPLICATE_API_TOKEN" -H "Content-Type: application/json" \
        --data-binary @- https://api.replicate.com/v1/models >/dev/null
  fi
fi

cog push --openapi-schema openapi.json "r8.im/$OWNER/$NAME"
echo "push: done. To serve it on dedicated hardware, fill in the version printed above in"
echo "replicate-deployment.json and POST it to https://api.replicate.com/v1/deployments."

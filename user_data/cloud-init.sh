#!/bin/bash
# spotctl user data, rendered by chalicelib/userdata.py: SPOTCTL_PARAMS_B64 gets the job
# (base64 of JSON) or, for a batch request, SPOTCTL_MEMBERS_B85 gets the member table
# (base85 of zlib of JSON; bootstrap.sh keeps the entry at our ami-launch-index), and
# SPOTCTL_BUNDLE_B85 gets bootstrap.sh and agent.py (base85 of bzip2 of JSON). No job
# value is ever parsed by a shell. Unpacked into SPOTCTL_STATE_DIR [/run/spotctl], root
# only (secrets); bootstrap.sh's header lists every override.
set -euo pipefail

SPOTCTL_PARAMS_B64=''
SPOTCTL_MEMBERS_B85=''
SPOTCTL_BUNDLE_B85=''

state_dir="${SPOTCTL_STATE_DIR:-/run/spotctl}"
if [[ (-z $SPOTCTL_PARAMS_B64 && -z $SPOTCTL_MEMBERS_B85) || -z $SPOTCTL_BUNDLE_B85 ]]; then
  echo "spotctl: this is the user data template; render it with chalicelib.userdata" >&2
  exit 1
fi
mkdir -p "$state_dir"
chmod 700 "$state_dir"
if ! "${SPOTCTL_PYTHON:-python3}" -c '
import base64, bz2, json, os, sys, zlib
files = json.loads(bz2.decompress(base64.b85decode(sys.argv[3])))
for stale in ("params.json", "members.json"):
    if os.path.exists(os.path.join(sys.argv[4], stale)):
        os.remove(os.path.join(sys.argv[4], stale))
if sys.argv[1]:
    files["params.json"] = base64.b64decode(sys.argv[1]).decode("utf-8")
else:
    files["members.json"] = zlib.decompress(base64.b85decode(sys.argv[2])).decode("utf-8")
for name, text in files.items():
    fd = os.open(os.path.join(sys.argv[4], name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
' "$SPOTCTL_PARAMS_B64" "$SPOTCTL_MEMBERS_B85" "$SPOTCTL_BUNDLE_B85" "$state_dir"; then
  echo "spotctl: cannot unpack the user data; shutting down" >&2
  shutdown -h now
  exit 1
fi
export SPOTCTL_STATE_DIR="$state_dir"
exec bash "$state_dir/bootstrap.sh"

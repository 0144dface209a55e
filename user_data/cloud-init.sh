#!/bin/bash
# spotctl user data. chalicelib/userdata.py renders it: SPOTCTL_PARAMS_B64 gets the
# job's parameters (base64 of JSON), SPOTCTL_BUNDLE_B85 gets bootstrap.sh and agent.py
# (base85 of bzip2 of JSON {file name: text}). Compressed, the whole instance side fits
# EC2's 16 KB, and no job value is ever parsed by a shell. This unpacks them into
# SPOTCTL_STATE_DIR [/run/spotctl], readable by root only (the parameters hold the
# job's secret), and runs bootstrap.sh; its header lists every override.
set -euo pipefail

SPOTCTL_PARAMS_B64=''
SPOTCTL_BUNDLE_B85=''

state_dir="${SPOTCTL_STATE_DIR:-/run/spotctl}"
if [[ -z $SPOTCTL_PARAMS_B64 || -z $SPOTCTL_BUNDLE_B85 ]]; then
  echo "spotctl: this is the user data template; render it with chalicelib.userdata" >&2
  exit 1
fi
mkdir -p "$state_dir"
chmod 700 "$state_dir"
if ! "${SPOTCTL_PYTHON:-python3}" -c '
import base64, bz2, json, os, sys
files = json.loads(bz2.decompress(base64.b85decode(sys.argv[2])))
files["params.json"] = base64.b64decode(sys.argv[1]).decode("utf-8")
for name, text in files.items():
    fd = os.open(os.path.join(sys.argv[3], name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
' "$SPOTCTL_PARAMS_B64" "$SPOTCTL_BUNDLE_B85" "$state_dir"; then
  echo "spotctl: cannot unpack the user data; shutting down" >&2
  shutdown -h now
  exit 1
fi
export SPOTCTL_STATE_DIR="$state_dir"
exec bash "$state_dir/bootstrap.sh"

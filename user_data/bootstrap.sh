#!/bin/bash
# spotctl instance bootstrap, unpacked and run by cloud-init.sh: find the job's volume,
# format it only if blank, mount and grow it, then exec agent.py. Overrides (SPOTCTL_*)
# and the PATH shims tests use for every external command: docs/workload-contract.md.
set -euo pipefail

# cloud-init runs us without HOME (the AWS CLI wants one) and with a short PATH.
export HOME="${HOME:-/root}"
export PATH="$PATH:/usr/local/bin:/usr/sbin:/sbin"

IMDS_URL="${SPOTCTL_IMDS_URL:-http://169.254.169.254}"
MOUNT_POINT="${SPOTCTL_MOUNT_POINT:-/mnt/data}"
LOG_DIR="${SPOTCTL_LOG_DIR:-/var/log/spotctl}"
STATE_DIR="${SPOTCTL_STATE_DIR:-/run/spotctl}"
PYTHON="${SPOTCTL_PYTHON:-python3}"
VOLUME_WAIT="${SPOTCTL_VOLUME_WAIT_SECONDS:-600}"
VOLUME_POLL="${SPOTCTL_VOLUME_POLL_SECONDS:-2}"
FS_TYPE="${SPOTCTL_FS_TYPE:-ext4}"
SETTLE_SECONDS="${SPOTCTL_SETTLE_SECONDS:-3}"

mkdir -p "$LOG_DIR"
# Keep a copy on stdout: cloud-init puts it in the console output, which outlives the instance.
exec > >(tee -a "$LOG_DIR/agent.log") 2>&1

log() { printf '%(%Y-%m-%dT%H:%M:%S%z)T bootstrap: %s\n' -1 "$*"; }

on_exit() {
  local rc=$?
  if ((rc != 0)); then
    log "FATAL: bootstrap failed (exit $rc); the workload was not started on this instance."
    log "Shutting down; unless the failure was reported to the job, it gets a new instance."
    shutdown -h now || log "shutdown failed"
  fi
}
trap on_exit EXIT

fail() {
  log "FATAL: $*"
  exit 1
}

# A failure a new instance would meet again (it is the volume's): tell the job, as the
# agent tells its own failures (exit 125), so that it fails saying why instead of being
# relaunched onto the same volume without end.
refuse() {
  log "FATAL: $*"
  "$PYTHON" "$STATE_DIR/agent.py" report-exit "$STATE_DIR/params.json" 125 "bootstrap: $*" ||
    log "could not report it"
  exit 1
}

[[ $VOLUME_WAIT =~ ^[0-9]+$ ]] || fail "SPOTCTL_VOLUME_WAIT_SECONDS must be whole seconds"
[[ $FS_TYPE == ext4 || $FS_TYPE == xfs ]] || fail "SPOTCTL_FS_TYPE must be ext4 or xfs"
token=$(curl -sS -f --max-time 5 --retry 5 --retry-connrefused -X PUT \
  -H 'X-aws-ec2-metadata-token-ttl-seconds: 300' "$IMDS_URL/latest/api/token") ||
  fail "no IMDSv2 token from $IMDS_URL"
imds_get() {
  curl -sS -f --max-time 5 --retry 3 -H "X-aws-ec2-metadata-token: $token" \
    "$IMDS_URL/latest/meta-data/$1"
}
instance_id=$(imds_get instance-id) || instance_id=unknown
instance_type=$(imds_get instance-type) || instance_type=unknown
log "instance $instance_id ($instance_type)"

# A batch request's instances share one user data with every member; EC2 numbers them
# 0..N-1 (ami-launch-index) as the control plane numbered the members. Log no secret.
if [[ -e $STATE_DIR/members.json ]]; then
  launch_index=$(imds_get ami-launch-index) ||
    fail "no ami-launch-index from $IMDS_URL: cannot tell which job of the batch is ours"
  [[ $launch_index =~ ^[0-9]+$ ]] || fail "'$launch_index' is not a launch index"
  picked=$("$PYTHON" "$STATE_DIR/agent.py" pick-member "$STATE_DIR/members.json" \
    "$launch_index" "$STATE_DIR/params.json") || fail "no member $launch_index in the batch"
  log "$picked"
fi

# Only the volume id is read here; the agent reads the rest of the job itself.
volume_id=$("$PYTHON" -c 'import json, sys; print(json.load(open(sys.argv[1]))["volume_id"])' \
  "$STATE_DIR/params.json") || fail "cannot read $STATE_DIR/params.json"
[[ $volume_id =~ ^vol-[0-9a-f]+$ ]] || fail "'$volume_id' is not a volume id"
log "job volume: $volume_id"

# Nitro exposes EBS volumes as NVMe devices, numbered in any order, whose serial is
# the volume id without its hyphen. Xen (p2, p3) names it after the attach device.
find_volume_device() {
  local serial=${volume_id//-/} name ser xen=""
  while read -r name ser; do
    if [[ $ser == "$serial" ]]; then
      printf '/dev/%s\n' "$name"
      return 0
    fi
    if [[ $name == xvdf || $name == sdf ]]; then
      xen=$name
    fi
  done < <(lsblk -d -n -o NAME,SERIAL)
  if [[ -n $xen ]]; then
    printf '/dev/%s\n' "$xen"
    return 0
  fi
  return 1
}

start=$SECONDS
next_note=$((SECONDS + 30))
until device=$(find_volume_device); do
  if ((SECONDS - start >= VOLUME_WAIT)); then
    log "devices present: $(lsblk -d -n -o NAME,SERIAL | tr '\n' ' ')"
    fail "volume $volume_id was not attached within ${VOLUME_WAIT}s" \
      "(looked for NVMe serial ${volume_id//-/}, /dev/xvdf and /dev/sdf)"
  fi
  if ((SECONDS >= next_note)); then
    log "still waiting for volume $volume_id ($((SECONDS - start))s)"
    next_note=$((SECONDS + 30))
  fi
  sleep "$VOLUME_POLL"
done
log "volume $volume_id is $device"

# blkid exits 2 when it finds no signature at all; only then is the device blank. Any
# other answer (a filesystem, a partition table, an error) means: do not format.
# A device attached a moment ago may not answer yet: an error is asked again, twice.
for try in 1 2 3; do
  probe=0
  fstype=$(blkid -p -o value -s TYPE "$device") || probe=$?
  ((probe == 0 || probe == 2 || try == 3)) && break
  log "blkid could not probe $device (exit $probe); again in ${SETTLE_SECONDS}s"
  sleep "$SETTLE_SECONDS"
done
created=0
case $probe in
  0)
    [[ -n $fstype ]] || refuse "$device holds a signature that is not a filesystem; refusing to format it"
    log "$device already holds $fstype; keeping it"
    ;;
  2)
    log "$device is blank; creating $FS_TYPE"
    "mkfs.$FS_TYPE" -q -L spotctl-data "$device" </dev/null || refuse "mkfs.$FS_TYPE $device failed"
    fstype=$FS_TYPE
    created=1
    ;;
  *)
    refuse "blkid could not probe $device (exit $probe); refusing to touch a device that may hold data"
    ;;
esac

mkdir -p "$MOUNT_POINT"
for try in 1 2 3; do
  mount -o noatime "$device" "$MOUNT_POINT" && break
  ((try < 3)) || refuse "cannot mount $device ($fstype)"
  sleep "$SETTLE_SECONDS"
done
log "mounted $device ($fstype) at $MOUNT_POINT"

# A volume restored from a snapshot can be larger than its filesystem; growing online is
# a no-op otherwise. A failed grow leaves the data intact, so it only warns.
if ((created == 0)); then
  case $fstype in
    ext2 | ext3 | ext4) resize2fs "$device" || log "warning: resize2fs $device failed" ;;
    xfs) xfs_growfs "$MOUNT_POINT" || log "warning: xfs_growfs $MOUNT_POINT failed" ;;
    *) log "no online grow for $fstype" ;;
  esac
fi

export SPOTCTL_INSTANCE_ID="$instance_id" SPOTCTL_INSTANCE_TYPE="$instance_type"
export SPOTCTL_VOLUME_DEVICE="$device" SPOTCTL_FS_CREATED="$created"
export SPOTCTL_MOUNT_POINT="$MOUNT_POINT" SPOTCTL_LOG_DIR="$LOG_DIR" SPOTCTL_IMDS_URL="$IMDS_URL"
cd /
exec "$PYTHON" "$STATE_DIR/agent.py" "$STATE_DIR/params.json"

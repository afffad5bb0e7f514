#!/usr/bin/env bash
# Training (the config's stage: SFT or GRPO) on a Cloud TPU VM, one host or a multi-host slice: the same command on every worker at once
# through `gcloud compute tpus tpu-vm ssh --worker=all`.
#
#   TPU_NAME=my-v5p-32 ZONE=us-east5-a launch/tpu_pod.sh CONFIG.yaml [--set key=value ...]
#
# Environment:
#   TPU_NAME, ZONE  the TPU VM (slice) and its zone (required)
#   STJAX_DIR       the repository on every worker, absolute or relative to the remote home
#                   (default: stjax); the config path is read relative to it
#   MESH            the mesh over all chips of the slice (default: fsdp=-1)
#   PYTHON          the interpreter on the workers (default: python3)
#   LOG_DIR         a local directory for one log per worker (N.log) instead of this terminal
#
# Beforehand, the repository and its environment on every worker, e.g.
#   gcloud compute tpus tpu-vm scp --recurse --worker=all --zone "$ZONE" . "$TPU_NAME":stjax
#   gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all \
#     --command 'cd stjax && pip install -e . "jax[tpu]"'
# and, for --worker=all, your key in the ssh agent (ssh-add ~/.ssh/google_compute_engine).
#
# Overrides given before yours (a later --set of the same key wins): model.attention=pallas_tpu
# (the Pallas TPU flash-attention kernel) and mesh=$MESH. micro_batch_size must be a multiple of
# data x fsdp (every chip for fsdp=-1) and of the number of hosts.
#
# Peers: every worker reads the slice's worker list and its own number from the metadata server
# (what jax's own Cloud TPU detection reads) and, on a multi-host slice, exports
# JAX_COORDINATOR_ADDRESS (worker 0, port 8482: jax's default on TPU), JAX_NUM_PROCESSES and
# JAX_PROCESS_ID, which stjax.train.distributed hands to jax.distributed.initialize. (By itself
# stjax detects SLURM and the TPU_WORKER_HOSTNAMES variable of GKE, which a Compute Engine TPU VM
# does not set.)
#
# out_dir (the config's) must be a directory that every worker sees at the same path and that
# outlives the VMs: a Filestore / NFS mount, or a Cloud Storage bucket mounted with gcsfuse on
# every worker. A gs:// URL does not work as out_dir: stjax writes out_dir (metrics, config,
# checkpoints' directory, HF export) through local paths, although orbax itself handles gs://.
#
# Preemption: a preempted VM is shut down after a short notice (Compute Engine VMs get about 30 s)
# and the shutdown sends SIGTERM to the training processes, which save a checkpoint and exit with
# code 143 if the save completes in time; otherwise the latest periodic save (checkpoint.every)
# is the restart point, so keep that interval short on preemptible capacity. Once the TPU is back
# (recreated, or a queued resource granted again), rerun the same command: it resumes from the
# latest checkpoint in out_dir. Losing this ssh session also ends the run: launch from a machine
# that stays up (tmux, screen).
set -euo pipefail

if [[ $# -lt 1 || $1 == -h || $1 == --help ]]; then
  sed -n '2,/^set -euo pipefail/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//' >&2
  exit 2
fi
: "${TPU_NAME:?set TPU_NAME to the TPU VM}" "${ZONE:?set ZONE to its zone}"
config=$1
shift
dir=${STJAX_DIR:-stjax}
mesh=${MESH:-fsdp=-1}
python=${PYTHON:-python3}

# The script every worker runs: the variable part quoted here, the rest taken as written.
args=$(printf '%q ' --config "$config" --set model.attention=pallas_tpu --set "mesh=$mesh" "$@")
remote="set -euo pipefail
cd $(printf %q "$dir")
python=$(printf %q "$python")
args=($args)
$(cat <<'EOF'
md() { curl -sf -H 'Metadata-Flavor: Google' "http://metadata.google.internal/computeMetadata/v1/instance/attributes/$1"; }
IFS=, read -r -a workers <<<"$(md worker-network-endpoints || true)"  # "host,..." or "name:id:ip,..."
if ((${#workers[@]} > 1)); then
  JAX_COORDINATOR_ADDRESS=${workers[0]##*:}:8482
  JAX_NUM_PROCESSES=${#workers[@]}
  JAX_PROCESS_ID=$(md agent-worker-number)
  export JAX_COORDINATOR_ADDRESS JAX_NUM_PROCESSES JAX_PROCESS_ID
  echo "$(hostname): process $JAX_PROCESS_ID of $JAX_NUM_PROCESSES, coordinator $JAX_COORDINATOR_ADDRESS" >&2
fi
exec "$python" -m stjax.train "${args[@]}"
EOF
)"

# Shipped base64-encoded, so that no remote shell re-splits or re-expands it.
encoded=$(printf '%s\n' "$remote" | base64 | tr -d '\n')
cmd=(gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all
  --command "bash -c \"\$(echo $encoded | base64 -d)\"")
if [[ -n ${LOG_DIR:-} ]]; then
  mkdir -p "$LOG_DIR"
  cmd+=(--output-directory "$LOG_DIR")
fi
echo "running on every worker of $TPU_NAME ($ZONE), in $dir:" >&2
printf '%s\n' "$remote" | sed 's/^/  | /' >&2
exec "${cmd[@]}"

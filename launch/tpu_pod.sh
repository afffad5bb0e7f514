#!/usr/bin/env bash
# Training (the config's stage: SFT or GRPO) on a Cloud TPU VM, one host or a multi-host slice: the same command on every worker at once
# through `gcloud compute tpus tpu-vm ssh --worker=all`.
#
#   TPU_NAME=my-v5p-32 ZONE=us-east5-a launch/tpu_pod.sh CONFIG.yaml [--set key=value ...]
#   PREFLIGHT=1 TOPOLOGY=v5p:4x4x2 TPU_NAME=my-v5p-64 ZONE=us-east5-a launch/tpu_pod.sh CONFIG.yaml
#
# Environment:
#   TPU_NAME, ZONE  the TPU VM (slice) and its zone (required)
#   PREFLIGHT=1     first compile every program of the run for the whole slice on worker 0 alone
#                   (`python -m stjax.train --config CONFIG --compile-only --topology $TOPOLOGY`: per
#                   program bytes per chip against the chip's memory, collectives, roofline), and start
#                   the run only if it exits 0 (every program fits). It needs no data, checkpoint or
#                   model files, so it can also run on any machine with `pip install -e ".[tpu]"`.
#   TOPOLOGY        the slice's topology for the preflight, e.g. v5p:4x4x2 (v5p-64), v5e:4x4 (v5e-16),
#                   v6e:2x4 (v6e-8) (required with PREFLIGHT=1)
#   STJAX_DIR       the repository on every worker, absolute or relative to the remote home
#                   (default: stjax); the config path is read relative to it
#   MESH            the mesh over all chips of the slice (default: fsdp=-1)
#   PYTHON          the interpreter on the workers (default: python3)
#   LOG_DIR         a local directory for one log per worker (N.log) instead of this terminal
#
# Beforehand, the repository and its environment on every worker, e.g.
#   gcloud compute tpus tpu-vm scp --recurse --worker=all --zone "$ZONE" . "$TPU_NAME":stjax
#   gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all \
#     --command 'cd stjax && pip install -e ".[tpu,gcs]"'
# and, for --worker=all, your key in the ssh agent (ssh-add ~/.ssh/google_compute_engine).
#
# The stage (SFT or GRPO), the attention backend (model.attention) and everything else come from the
# config; the one override given before yours (a later --set of the same key wins) is mesh=$MESH.
# The micro-batch (batch_size / gradient_accumulation_steps) must be a multiple of data x fsdp (every chip
# for fsdp=-1) and of the number of hosts.
#
# Peers: every worker reads the slice's worker list and its own number from the metadata server
# (what jax's own Cloud TPU detection reads) and, on a multi-host slice, exports
# JAX_COORDINATOR_ADDRESS (worker 0, port 8482: jax's default on TPU), JAX_NUM_PROCESSES and
# JAX_PROCESS_ID, which stjax.train.distributed hands to jax.distributed.initialize. (By itself
# stjax detects SLURM and the TPU_WORKER_HOSTNAMES variable of GKE, which a Compute Engine TPU VM
# does not set.)
#
# output_dir (the config's) must be one place every worker sees and that outlives the VMs: a gs://
# bucket (stjax writes metrics, settings, TensorBoard, checkpoints and the export there through
# etils.epath; the `gcs` extra installs gcsfs), or a Filestore / NFS mount. Inputs are read locally:
# model.model_name_or_path and data.path must be on every worker (or on a shared mount).
#
# SFT -> GRPO on one pod: run the SFT config (output_dir gs://BUCKET/runs/sft); its end-of-run export,
# adapters merged, is gs://BUCKET/runs/sft/hf. Copy it to every worker, then run the GRPO config
# with model.model_name_or_path pointing at the copy:
#   gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all \
#     --command 'gcloud storage cp -r gs://BUCKET/runs/sft/hf stjax/runs/sft-hf'
#   launch/tpu_pod.sh configs/grpo/qwen2.5-vl-7b-tpu-v5p-64.yaml --set model.model_name_or_path=runs/sft-hf
# (the GRPO run's output_dir must be another directory: each stage has its own.)
#
# Preemption: a preempted VM is shut down after a short notice (Compute Engine VMs get about 30 s)
# and the shutdown sends SIGTERM to the training processes, which save a checkpoint and exit with
# code 143 if the save completes in time; otherwise the latest periodic save (checkpoint.every)
# is the restart point, so keep that interval short on preemptible capacity. Once the TPU is back
# (recreated, or a queued resource granted again), rerun the same command: it resumes from the
# latest checkpoint in output_dir. Losing this ssh session also ends the run: launch from a machine
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
stage=$(sed -n 's/^stage: *\([a-z]*\).*/\1/p' "$config" 2>/dev/null | head -1)
stage=${stage:-sft}  # the trainer's default
if [[ ${PREFLIGHT:-0} == 1 ]]; then
  : "${TOPOLOGY:?set TOPOLOGY to the topology of the slice (e.g. v5p:4x4x2) for the preflight}"
fi
args=$(printf '%q ' --config "$config" --set "mesh=$mesh" "$@")

# ssh_run WORKERS SCRIPT: run SCRIPT with bash on the workers, shipped base64-encoded so that no remote
# shell re-splits or re-expands it.
ssh_run() {
  local encoded
  encoded=$(printf '%s\n' "$2" | base64 | tr -d '\n')
  local cmd=(gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker="$1"
    --command "bash -c \"\$(echo $encoded | base64 -d)\"")
  if [[ -n ${LOG_DIR:-} ]]; then
    mkdir -p "$LOG_DIR"
    cmd+=(--output-directory "$LOG_DIR")
  fi
  printf '%s\n' "$2" | sed 's/^/  | /' >&2
  "${cmd[@]}"
}

if [[ ${PREFLIGHT:-0} == 1 ]]; then
  echo "preflight ($stage) on worker 0 of $TPU_NAME: compiling for $TOPOLOGY" >&2
  ssh_run 0 "set -euo pipefail
cd $(printf %q "$dir")
exec $(printf %q "$python") -m stjax.train $args --compile-only --topology $(printf %q "$TOPOLOGY")" || {
    rc=$?
    echo "preflight failed (exit $rc): the run was not started" >&2
    exit "$rc"
  }
fi

# The script every worker runs: the variable part quoted here, the rest taken as written.
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

echo "training ($stage) on every worker of $TPU_NAME ($ZONE), in $dir:" >&2
ssh_run all "$remote"

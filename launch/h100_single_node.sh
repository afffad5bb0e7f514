#!/usr/bin/env bash
# Training, the config's stage (SFT or GRPO), in one process on this machine, every local GPU in the mesh
# (jax drives them all):
#
#   launch/h100_single_node.sh CONFIG.yaml [--set key=value ...]
#   launch/h100_single_node.sh configs/sft/qwen2.5-vl-7b-h100x8.yaml --set optim.learning_rate=2e-5
#   launch/h100_single_node.sh configs/grpo/qwen2.5-vl-7b-h100x8.yaml   # GRPO from the SFT run's export
#
# Run it from the repository root (the configs' relative paths, output_dir included, are relative to
# the working directory). Rerunning the same command resumes from the latest checkpoint in output_dir.
# On SIGTERM the run finishes its step, saves a checkpoint and exits with code 143; `exec` below
# makes python this script's process, so a signal sent to the script reaches it.
# launch/slurm_multinode.sbatch runs this script once per node.
#
# Set here unless already in the environment:
#   XLA_CLIENT_MEM_FRACTION=0.90 (XLA_PYTHON_CLIENT_MEM_FRACTION on jaxlibs that predate the new
#     name), XLA_PYTHON_CLIENT_PREALLOCATE=true: jax takes 90% of each GPU up front (one pool, no
#     fragmentation from growing it), leaving the rest to CUDA, cuDNN and NCCL's own buffers.
#   XLA_FLAGS gets, in front of what it already holds (later flags win, so yours override these):
#     --xla_gpu_enable_latency_hiding_scheduler=true   overlap collectives with compute
#     --xla_gpu_enable_pipelined_all_gather=true       FSDP: gather the next layer's weights while
#     --xla_gpu_enable_pipelined_reduce_scatter=true   this one computes (the layers are a scan),
#     --xla_gpu_enable_pipelined_all_reduce=true       scatter its gradients likewise
#   (flags of XLA's GPU performance guides, each accepted by jaxlib 0.10.2; an unknown flag stops
#   jax at start-up with "Unknown flags in XLA_FLAGS").
# PYTHON picks the interpreter (default: python).
set -euo pipefail

if [[ $# -lt 1 || $1 == -h || $1 == --help ]]; then
  sed -n '2,/^set -euo pipefail/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//' >&2
  exit 2
fi
config=$1
shift
if [[ ! -f $config ]]; then
  echo "error: no config file $config" >&2
  exit 2
fi
python=${PYTHON:-python}
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PYTHONPATH=$repo${PYTHONPATH:+:$PYTHONPATH}  # `-m stjax.train` without `pip install -e .`

if [[ -z ${XLA_CLIENT_MEM_FRACTION:-} && -z ${XLA_PYTHON_CLIENT_MEM_FRACTION:-} ]]; then
  # jaxlib >= 0.7 reads XLA_CLIENT_MEM_FRACTION and errors if both names are set; older ones only the old name.
  fraction_name=$("$python" - <<'EOF'
import importlib.util
from pathlib import Path

spec = importlib.util.find_spec("jaxlib")
sources = [Path(d, "xla_client.py") for d in (spec.submodule_search_locations or [])] if spec else []
new = any(p.exists() and "XLA_CLIENT_MEM_FRACTION" in p.read_text() for p in sources)
print("XLA_CLIENT_MEM_FRACTION" if new else "XLA_PYTHON_CLIENT_MEM_FRACTION")
EOF
)
  export "$fraction_name=0.90"
fi
export XLA_PYTHON_CLIENT_PREALLOCATE=${XLA_PYTHON_CLIENT_PREALLOCATE:-true}
flags="--xla_gpu_enable_latency_hiding_scheduler=true --xla_gpu_enable_pipelined_all_gather=true"
flags+=" --xla_gpu_enable_pipelined_reduce_scatter=true --xla_gpu_enable_pipelined_all_reduce=true"
export XLA_FLAGS="$flags${XLA_FLAGS:+ $XLA_FLAGS}"

echo "$(hostname): XLA_FLAGS=$XLA_FLAGS; memory fraction ${XLA_CLIENT_MEM_FRACTION:-${XLA_PYTHON_CLIENT_MEM_FRACTION:-}}" \
  "preallocate $XLA_PYTHON_CLIENT_PREALLOCATE" >&2
exec "$python" -m stjax.train --config "$config" "$@"

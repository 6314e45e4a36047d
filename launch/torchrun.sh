#!/usr/bin/env bash
# One node, one process per GPU (or N CPU processes), without Slurm:
#   launch/torchrun.sh CONFIG [KEY=VALUE ...]
#   NPROC=4 launch/torchrun.sh configs/salt_vitb16.yaml data.shards=shards/corpus
# NPROC defaults to the number of visible GPUs (1 without any), PYTHON to python3. Rerunning
# the same command resumes the run from its latest checkpoint; Ctrl-C / SIGTERM save the
# current step first.
set -euo pipefail
if [[ $# -lt 1 ]]; then
    sed -n '2,7p' "$0" >&2
    exit 2
fi
gpus=$("${PYTHON:-python3}" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
nproc=${NPROC:-$(( gpus > 0 ? gpus : 1 ))}
# One thread per process unless asked: N processes x all cores oversubscribes the CPU.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec "${PYTHON:-python3}" -m torch.distributed.run --standalone --nproc_per_node="$nproc" -m usjepa train "$@"

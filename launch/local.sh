#!/bin/bash
# ucfvit on one machine: torchrun --standalone with one trainer per GPU (or N CPU processes with gloo).
#
#   bash launch/local.sh --model mae --mesh 2x2x2                        # one trainer per visible GPU
#   bash launch/local.sh --nproc-per-node 8 --model mae --mesh 2x2x2     # 8 trainers (CPU: gloo)
#   bash launch/local.sh --dry-run --nproc-per-node 8 --model mae --mesh 2x2x2
#
# Options (anywhere before "--"; all other arguments go to recipes/train.py unchanged):
#   --nproc-per-node N  trainers to start (default: the GPUs torch sees, else 1)
#   --python PY         the interpreter that counts the GPUs and checks a dry run's training options
#                       (default: UCFVIT_PYTHON, else python3)
#   --dry-run           check the training options with the trainer's parser, then print the command and
#                       environment instead of running them
# torchrun comes from PATH (the active environment).
set -euo pipefail

UCF_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=common.sh
. "$UCF_ROOT/launch/common.sh"

UCF_PROG=local.sh
UCF_OPTIONS="nproc-per-node:int python:str dry-run:flag help:flag"
opt_nproc_per_node="" opt_python=${UCFVIT_PYTHON:-python3} opt_dry_run="" opt_help=""
ucf_parse "$@"
if [[ -n $opt_help ]]; then
    sed -n '/^# ucfvit on one machine/,/^set -euo/p' "$UCF_ROOT/launch/local.sh" | sed '$d; s/^# \{0,1\}//'
    exit 0
fi
nproc=$opt_nproc_per_node
if [[ -z $nproc ]]; then
    # torch's count honours CUDA_VISIBLE_DEVICES / ROCR_VISIBLE_DEVICES, which nvidia-smi and rocm-smi do not.
    nproc=$("$opt_python" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
    [[ $nproc =~ ^[1-9][0-9]*$ ]] || nproc=1
fi
ucf_check_mesh "$nproc" "--nproc-per-node $nproc"

# torchrun would set OMP_NUM_THREADS=1 for each trainer; give each its share of the cores instead.
cores=$(nproc 2>/dev/null || echo 1)
ucf_env OMP_NUM_THREADS $((cores / nproc > 1 ? cores / nproc : 1))

launch=(torchrun --standalone --nproc_per_node "$nproc" "$UCF_ROOT/recipes/train.py" "${UCF_TRAIN_ARGS[@]}")
UCF_SUMMARY="ucfvit local: 1 node x $nproc = $nproc ranks, mesh ${UCF_MESH:-from --config or the default}"
if [[ -n $opt_dry_run ]]; then
    ucf_check_train_args here "$opt_python"
    printf '# %s; dry run: nothing is started\n' "$UCF_SUMMARY"
    printf 'launch %s\n' "$(ucf_quote "${launch[@]}")"
    UCF_NODE_CMD=("${launch[@]}")
    ucf_print_node 0 "$(hostname)" "ranks 0-$((nproc - 1))"
    exit 0
fi
ucf_print_summary "${launch[@]}"
exec "${launch[@]}"

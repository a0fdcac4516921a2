# shellcheck shell=bash
# launch/common.sh: what launch/local.sh, launch/frontier/train.sbatch and launch/dgx/train.sbatch share.
# Sourced, never run. A launcher sets UCF_PROG (its name in messages) and UCF_OPTIONS (its options as
# "name:kind", kind one of int, port, str, flag), then calls ucf_parse "$@".
#
# Options: launcher options may stand anywhere before a "--"; every other argument, and everything after
# "--", goes to recipes/train.py unchanged (arguments with spaces included). An argument that looks like a
# misspelt launcher option (--node, --dry_run, --gpus) is refused rather than passed on.
# --dry-run output: a "launch" line (the command the launcher would exec), then one block per node:
#     === node I: HOST, ranks A-B ===      (torchrun: "N ranks", numbered by its rendezvous)
#     env NAME=VALUE        (every variable the launcher sets, as the processes on that node see it)
#     run COMMAND           (what runs on that node: per task for srun, per node for torchrun)
#     === end node I ===
# Values and commands are quoted with printf %q, so each line splits back into words like a shell would.
# Before printing, a dry run checks the arguments for recipes/train.py with the trainer's own parser
# (ucf_check_train_args): a misspelt flag fails now, not after the queue.

UCF_TRAIN_ARGS=() # for recipes/train.py, verbatim
UCF_ENV_NAMES=()  # the variables the launcher exports, in order (printed by --dry-run and at start)
UCF_NODE_ENV=()   # NAME=VALUE pairs that differ per node, set before each ucf_print_node
UCF_NODE_CMD=()   # the command that runs on a node, set before ucf_print_node
UCF_MESH=""       # the --mesh passed to recipes/train.py, if any (ucf_find_mesh)
UCF_CONFIG=""     # 1 when recipes/train.py gets --config (ucf_find_mesh)
UCF_NODES=""      # nodes to run on (ucf_node_count)
UCF_HOSTS=()      # their host names (ucf_hosts)
UCF_SUMMARY=""    # one line describing the launch, printed first

ucf_die() {
    printf '%s: error: %s\n' "$UCF_PROG" "$*" >&2
    exit 2
}

ucf_warn() { printf '%s: warning: %s\n' "$UCF_PROG" "$*" >&2; }

ucf_option_names() {
    local spec names=""
    for spec in $UCF_OPTIONS; do names+="${names:+, }--${spec%%:*}"; done
    printf '%s' "$names"
}

# The kind of launcher option $1 (e.g. "--nodes"), or nothing when it is not one.
ucf_kind() {
    local spec
    for spec in $UCF_OPTIONS; do
        if [[ $1 == "--${spec%%:*}" ]]; then
            printf '%s' "${spec#*:}"
            return
        fi
    done
}

# Refuse $1 when it looks like a launcher option but is not one (same letters, or a prefix of one).
ucf_check_typo() {
    [[ $1 == --?* ]] || return 0
    local given=${1#--} spec opt norm_given norm_opt
    norm_given=${given,,}
    norm_given=${norm_given//[-_]/}
    for spec in $UCF_OPTIONS; do
        opt=${spec%%:*}
        norm_opt=${opt//-/}
        if [[ $norm_given == "$norm_opt" ]] || { ((${#norm_given} >= 4)) && [[ $norm_opt == "$norm_given"* ]]; }; then
            ucf_die "unknown option $1: did you mean --$opt? (launcher options: $(ucf_option_names); put arguments for recipes/train.py after --)"
        fi
    done
}

ucf_check_value() { # option kind value
    case $2 in
        int) [[ $3 =~ ^[1-9][0-9]*$ ]] || ucf_die "$1 $3: must be a positive integer" ;;
        port) [[ $3 =~ ^[1-9][0-9]*$ ]] && (($3 <= 65535)) || ucf_die "$1 $3: must be a port number, 1 to 65535" ;;
        str) [[ -n $3 ]] || ucf_die "$1 needs a non-empty value" ;;
    esac
}

# Parse the launcher's arguments: sets opt_<name> (dashes as underscores) and UCF_TRAIN_ARGS.
ucf_parse() {
    local arg name kind var value
    while (($#)); do
        arg=$1
        shift
        if [[ $arg == -- ]]; then
            UCF_TRAIN_ARGS+=("$@")
            break
        fi
        [[ $arg == -h ]] && arg=--help
        name=${arg%%=*}
        kind=$(ucf_kind "$name")
        if [[ -z $kind ]]; then
            ucf_check_typo "$name"
            UCF_TRAIN_ARGS+=("$arg")
            continue
        fi
        var=opt_${name#--}
        var=${var//-/_}
        if [[ $kind == flag ]]; then
            [[ $arg == *=* ]] && ucf_die "$name takes no value"
            printf -v "$var" 1
            continue
        fi
        if [[ $arg == *=* ]]; then
            value=${arg#*=}
        else
            (($#)) || ucf_die "$name needs a value"
            value=$1
            shift
        fi
        ucf_check_value "$name" "$kind" "$value"
        printf -v "$var" '%s' "$value"
    done
}

# The mesh among the train arguments (the last --mesh wins) into UCF_MESH; UCF_CONFIG=1 when --config is given.
ucf_find_mesh() {
    local i arg
    UCF_MESH="" UCF_CONFIG=""
    for ((i = 0; i < ${#UCF_TRAIN_ARGS[@]}; i++)); do
        arg=${UCF_TRAIN_ARGS[i]}
        case $arg in
            --mesh)
                ((i + 1 < ${#UCF_TRAIN_ARGS[@]})) || ucf_die "--mesh needs a value, e.g. --mesh 1x8x1"
                UCF_MESH=${UCF_TRAIN_ARGS[i + 1]}
                ;;
            --mesh=*) UCF_MESH=${arg#--mesh=} ;;
            --config | --config=*) UCF_CONFIG=1 ;;
        esac
    done
}

# Check --mesh against the number of processes $1 ($2 says where that number comes from), before any job starts.
# Without --mesh: fine for one process or with --config (its file has a mesh), else an error.
ucf_check_mesh() {
    local world=$1 shape=$2 tp=1 d f t
    ((world > 1 && world % 2 == 0)) && tp=2
    ucf_find_mesh
    if [[ -z $UCF_MESH ]]; then
        { ((world == 1)) || [[ -n $UCF_CONFIG ]]; } && return 0
        ucf_die "missing --mesh: $shape = $world ranks need a mesh ddp x fsdp x tp whose product is $world, e.g. --mesh 1x$((world / tp))x$tp"
    fi
    [[ ${UCF_MESH,,} =~ ^([1-9][0-9]*)x([1-9][0-9]*)x([1-9][0-9]*)$ ]] ||
        ucf_die "--mesh $UCF_MESH: must be three positive integers ddp x fsdp x tp, e.g. --mesh 1x$((world / tp))x$tp"
    d=${BASH_REMATCH[1]} f=${BASH_REMATCH[2]} t=${BASH_REMATCH[3]}
    ((d * f * t == world)) ||
        ucf_die "--mesh $UCF_MESH has $((d * f * t)) ranks but $shape = $world: ddp*fsdp*tp must equal $world (e.g. --mesh 1x$((world / tp))x$tp), or change the node or GPU count"
}

# export NAME=DEFAULT unless NAME is set already (the user's value wins); remembered for the printout.
ucf_env() {
    [[ -n ${!1+x} ]] || printf -v "$1" '%s' "$2"
    export "${1?}"
    UCF_ENV_NAMES+=("$1")
}

# export NAME=VALUE whatever it was before.
ucf_env_set() {
    printf -v "$1" '%s' "$2"
    export "${1?}"
    UCF_ENV_NAMES+=("$1")
}

ucf_quote() {
    local out
    printf -v out '%q ' "$@"
    printf '%s' "${out% }"
}

# MASTER_PORT for job $1: 10000 + job id mod 20000, so that two jobs sharing a node differ (and the port stays
# below Linux's ephemeral range, 32768 and up); 29500 (torch's default) without a numeric job id.
ucf_job_port() {
    if [[ $1 =~ ^[0-9]+$ ]]; then
        printf '%s' $((10000 + $1 % 20000))
    else
        printf 29500
    fi
}

# Nodes to run on, into UCF_NODES: --nodes ($1), else the allocation's, else (a dry run outside an
# allocation) what --mesh needs with $2 GPUs per node, else 1.
ucf_node_count() {
    UCF_NODES=$1
    if [[ -n ${SLURM_JOB_ID:-} ]]; then
        local allocated=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-}}
        [[ $allocated =~ ^[1-9][0-9]*$ ]] || ucf_die "SLURM_JOB_ID is set but SLURM_JOB_NUM_NODES is not: run inside an sbatch/salloc allocation"
        ((${UCF_NODES:-0} <= allocated)) || ucf_die "--nodes $UCF_NODES: the allocation has only $allocated node(s) (sbatch -N)"
        UCF_NODES=${UCF_NODES:-$allocated}
        return
    fi
    [[ -n $UCF_NODES ]] && return
    UCF_NODES=1
    ucf_find_mesh
    if [[ ${UCF_MESH,,} =~ ^([1-9][0-9]*)x([1-9][0-9]*)x([1-9][0-9]*)$ ]]; then
        local world=$((BASH_REMATCH[1] * BASH_REMATCH[2] * BASH_REMATCH[3]))
        ((world % $2 == 0)) && UCF_NODES=$((world / $2))
    fi
    return 0
}

# The first $1 hosts of the allocation (scontrol expands SLURM_JOB_NODELIST) into UCF_HOSTS, or the
# placeholders node0..node<N-1> outside an allocation.
ucf_hosts() {
    UCF_HOSTS=()
    if [[ -n ${SLURM_JOB_ID:-} ]]; then
        local nodelist=${SLURM_JOB_NODELIST:-${SLURM_NODELIST:-}}
        [[ -n $nodelist ]] || ucf_die "SLURM_JOB_ID is set but SLURM_JOB_NODELIST is not: run inside an sbatch/salloc allocation"
        mapfile -t UCF_HOSTS < <(scontrol show hostnames "$nodelist")
        ((${#UCF_HOSTS[@]} >= $1)) || ucf_die "scontrol show hostnames $nodelist gave ${#UCF_HOSTS[@]} host(s), $1 needed"
        UCF_HOSTS=("${UCF_HOSTS[@]:0:$1}")
    else
        local i
        for ((i = 0; i < $1; i++)); do UCF_HOSTS+=("node$i"); done
    fi
}

# Print the variables the launcher set and the command it runs (at the start of a real run, for the job log).
ucf_print_summary() { # launch command...
    local name
    printf '# %s\n' "$UCF_SUMMARY"
    for name in "${UCF_ENV_NAMES[@]}"; do printf 'env %s=%s\n' "$name" "$(ucf_quote "${!name}")"; done
    printf 'launch %s\n' "$(ucf_quote "$@")"
}

# One --dry-run block: node $1 on host $2 running ranks $3 ("ranks 0-7"); the environment and UCF_NODE_CMD.
ucf_print_node() {
    local name pair
    printf '=== node %s: %s, %s ===\n' "$1" "$2" "$3"
    for name in "${UCF_ENV_NAMES[@]}"; do printf 'env %s=%s\n' "$name" "$(ucf_quote "${!name}")"; done
    for pair in "${UCF_NODE_ENV[@]}"; do printf 'env %s=%s\n' "${pair%%=*}" "$(ucf_quote "${pair#*=}")"; done
    printf 'run %s\n' "$(ucf_quote "${UCF_NODE_CMD[@]}")"
    printf '=== end node %s ===\n' "$1"
}

# Check UCF_TRAIN_ARGS with recipes/train.py's own parser (python -m ucfvit.train.check_args), before a dry run
# prints the job. $1: "gpu" to check against the GPU recipes (a job for GPU nodes, checked on a login node) or
# "here" (this machine's); the rest: the python that runs the check (possibly several words), with this
# checkout first on PYTHONPATH. Refused (the checker exits 3): the trainer's one line, and exit 2. A python
# that cannot run the check (no torch on a login node, a container runner that is not there): a warning.
ucf_check_train_args() {
    local out rc=0 check=(-m ucfvit.train.check_args)
    [[ $1 == gpu ]] && check+=(--accelerator)
    shift
    out=$(PYTHONPATH="$UCF_ROOT${PYTHONPATH:+:$PYTHONPATH}" "$@" "${check[@]}" -- "${UCF_TRAIN_ARGS[@]}" 2>&1) || rc=$?
    if ((rc == 3)); then
        ucf_die "${out##*$'\n'}"
    elif ((rc != 0)); then
        ucf_warn "the options for recipes/train.py were not checked: $* ${check[*]} failed (${out##*$'\n'})"
    fi
    return 0
}

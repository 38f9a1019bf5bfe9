#!/usr/bin/env bash
# The `paper` preset trained and evaluated on an NVIDIA GPU in a job sized to ten minutes, with its figures.
#
#   bash benchmarks/gpu.sh [--preset paper|test] [--out DIR] [--no-install] [--python PY] [--allow-cpu]
#                          [--events N] [--train-events N] [--epochs E] [--model M ...] [--config FILE]
#                          [--budget SECONDS]
#
# 1. finds a GPU with nvidia-smi (--preset paper without one: one line, exit 1, unless --allow-cpu);
# 2. creates OUT/venv and installs the project there with its `cuda` extra (jax[cuda12]); with --no-install it
#    uses --python PY (default: python3 on PATH) as it is, and for --preset test on a machine without an NVIDIA
#    GPU it installs the project without the extra;
# 3. runs `python -m benchmarks.gpu` (benchmarks/gpu.py: the device JAX sees, the sized `muontrack run --json`
#    in OUT/job, the summary table and one key=value line per figure, also in OUT/figures.txt).
#
# Everything is written under OUT (default ./gpu-out): the venv, the job, and every cache and home folder the
# job would otherwise write to (JAX, Numba, Prefect, matplotlib, pip, CUDA). A bad option is one line, exit 2,
# before anything is written. The sizes and keys are described in benchmarks/gpu.py and docs/performance.md.
set -euo pipefail

die() {
    printf 'error: %s\n' "$1" >&2
    exit "${2:-2}"
}

usage="usage: bash benchmarks/gpu.sh [--preset paper|test] [--out DIR] [--no-install] [--python PY] [--allow-cpu] \
[--events N] [--train-events N] [--epochs E] [--model M ...] [--config FILE] [--budget SECONDS]"
preset=paper
out=gpu-out
install=1
python=""
allow_cpu=0
job_args=()

positive() { [[ "$2" =~ ^[1-9][0-9]{0,9}$ ]] || die "$1 must be a positive integer, got '$2'"; }

while (($#)); do
    option="$1"
    case "$option" in
    -h | --help)
        echo "$usage"
        exit 0
        ;;
    --no-install) install=0 ;;
    --allow-cpu) allow_cpu=1 ;;
    --preset | --out | --python | --events | --train-events | --epochs | --model | --config | --budget)
        (($# >= 2)) || die "$option needs a value"
        value="$2"
        shift
        case "$option" in
        --preset)
            [[ "$value" == paper || "$value" == test ]] || die "--preset must be paper or test, got '$value'"
            preset="$value"
            ;;
        --out)
            [[ -n "$value" ]] || die "--out must not be empty"
            out="$value"
            ;;
        --python) python="$value" ;;
        --events | --train-events | --epochs)
            positive "$option" "$value"
            job_args+=("$option" "$value")
            ;;
        --model)
            [[ "$value" =~ ^[a-z0-9_]+$ ]] || die "--model must be a model name, got '$value'"
            job_args+=(--model "$value")
            ;;
        --config)
            [[ -f "$value" ]] || die "config file $value does not exist"
            job_args+=(--config "$(realpath "$value")")
            ;;
        --budget)
            [[ "$value" =~ ^[0-9]{1,9}$ ]] || die "--budget must be a whole number of seconds (0: none), got '$value'"
            job_args+=(--budget "$value")
            ;;
        esac
        ;;
    *) die "unknown option '$option' ($usage)" ;;
    esac
    shift
done
if [[ -n "$python" && $install == 1 ]]; then
    die "--python is for --no-install (otherwise the script installs into OUT/venv)"
fi

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="$(realpath -m -- "$out")"
marker="$out/.muontrack-gpu-sh"

# a GPU, as the driver sees it (JAX's own view is checked by benchmarks/gpu.py once it is installed)
gpus=0
if command -v nvidia-smi >/dev/null 2>&1; then
    gpus="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)"
fi
if [[ $preset == paper && $gpus == 0 && $allow_cpu == 0 ]]; then
    die "no NVIDIA GPU visible (nvidia-smi lists none); --preset paper needs one, or --allow-cpu" 1
fi

if [[ -e "$out" && ! -d "$out" ]]; then
    die "--out $out is a file, not a folder"
fi
if [[ -d "$out" && ! -e "$marker" && -n "$(ls -A -- "$out")" ]]; then
    die "--out $out is not empty and was not written by benchmarks/gpu.sh; choose another folder"
fi
if [[ -n "$python" ]] && ! command -v -- "$python" >/dev/null 2>&1; then
    die "--python $python is not a program"
fi
mkdir -p "$out/tmp" "$out/home" "$out/cache"
touch "$marker"

# nothing outside OUT: caches, configs and temporary files of pip, JAX, Numba, Prefect, matplotlib and CUDA
export TMPDIR="$out/tmp" PIP_CACHE_DIR="$out/cache/pip" PYTHONPYCACHEPREFIX="$out/cache/pycache"
if ((install)); then
    if [[ ! -x "$out/venv/bin/python" ]]; then
        python3 -m venv "$out/venv" || die "could not create the venv $out/venv" 1
    fi
    python="$out/venv/bin/python"
    target="$root"
    if [[ $preset == paper || $gpus != 0 ]]; then
        target="$root[cuda]"
    fi
    echo "installing $target into $out/venv" >&2
    "$python" -m pip install -q --disable-pip-version-check -e "$target" >"$out/install.log" 2>&1 ||
        die "pip install -e '$target' failed; log: $out/install.log" 1
else
    python="${python:-python3}"
fi

export HOME="$out/home" XDG_CACHE_HOME="$out/cache" XDG_CONFIG_HOME="$out/home/.config"
export MPLCONFIGDIR="$out/home/.config/matplotlib" PREFECT_HOME="$out/home/.prefect"
export MUONTRACK_CACHE="$out/cache/muontrack" MUONTRACK_JAX_CACHE="$out/cache/jax"
export NUMBA_CACHE_DIR="$out/cache/numba" CUDA_CACHE_PATH="$out/cache/nv"
# the job's own temporary Prefect server, not a shared one; its log lines give the prediction times
unset PREFECT_API_URL PREFECT_PROFILE
export PREFECT_LOGGING_LEVEL=INFO
# JAX takes 75 % of the GPU's memory at start unless told not to: the peak memory figure would say nothing
export XLA_PYTHON_CLIENT_PREALLOCATE=false
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"

allow=()
((allow_cpu)) && allow=(--allow-cpu)
exec "$python" -m benchmarks.gpu --preset "$preset" --out "$out" "${allow[@]}" "${job_args[@]}"

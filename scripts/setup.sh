#!/usr/bin/env bash
# Idempotent set-up for a fresh Linux machine (used by `make setup`, `make run`, `make test`).
#
#   1. system packages ffcv's C++ helper builds against (pkg-config, OpenCV, libjpeg-turbo),
#   2. a virtual environment in $VENV (default .venv) with the pinned packages,
#   3. ffcv==1.0.2 *without* its own requirements (they pull opencv-python, which clashes
#      with opencv-python-headless) and without build isolation (it builds against our numpy),
#   4. this project itself, editable (`pip install -e .`): its packages import from anywhere.
#
# A second run checks a stamp (hash of the pins + this script + the interpreter's version) and an
# import smoke test, and does nothing more when both hold. PYTHON naming another Python version than
# the venv's rebuilds the venv (saying so); without PYTHON an existing venv keeps its interpreter.
# Checked with Python 3.11 (the default where it is installed), 3.12 and 3.13: see README.md.
# Variables: PYTHON (interpreter to build the venv from), VENV, WITH_BROWSER=1 (also install
# Debian's chromium + chromium-driver for the browser end-to-end test), WITH_FFCV=0 (skip ffcv
# and the system libraries it builds against: training then uses the torchvision loader; the
# default on macOS, where ffcv does not build). Where ffcv's build fails, set-up says so in one
# line and goes on without it.
set -euo pipefail
cd "$(dirname "$0")/.."

FFCV_PIN="ffcv==1.0.2"
VENV="${VENV:-.venv}"
SYSTEM_PKGS=(pkg-config libopencv-dev libturbojpeg0-dev)
BROWSER_PKGS=(chromium chromium-driver)

say() { printf '[setup] %s\n' "$*"; }
die() { printf '[setup] error: %s\n' "$*" >&2; exit 1; }

can_apt() {
    command -v apt-get >/dev/null 2>&1 || return 1
    [ "$(id -u)" -eq 0 ] && return 0
    command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null
}

apt_install() {  # apt_install PKG... : with apt when we can, else one clear message
    if can_apt; then
        local runner=()
        [ "$(id -u)" -eq 0 ] || runner=(sudo -n)
        say "installing system packages: $*"
        "${runner[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
        "${runner[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
    else
        die "missing system packages; install them and rerun: $* (Debian/Ubuntu: sudo apt-get install $*; conda: see environment.yml)"
    fi
}

# --- 0. the interpreter ---------------------------------------------------------------------
CHECKED_PYTHONS="3.11 3.12 3.13"  # what the pins were installed and tested on (README "Python versions")
pyver() { "$1" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")' 2>/dev/null; }
VENV_PYVER=$([ -x "$VENV/bin/python" ] && pyver "$VENV/bin/python" || true)
if [ -z "${PYTHON:-}" ] && [ -n "$VENV_PYVER" ]; then
    # no PYTHON: an existing venv keeps its interpreter (the one it was made from, should it be recreated)
    PYTHON=$("$VENV/bin/python" -c 'import sys; print(sys._base_executable)')
fi
if [ -z "${PYTHON:-}" ]; then
    for cand in python3.11 python3.12 python3.13 python3 python; do
        if command -v "$cand" >/dev/null 2>&1 && "$cand" -c '' 2>/dev/null; then PYTHON="$cand"; break; fi
    done
fi
[ -n "${PYTHON:-}" ] || die "no python3 found; install Python 3.11 (or 3.12, 3.13)"
"$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info[:2] >= (3, 11) else 1)' \
    || die "$PYTHON is $("$PYTHON" -V 2>&1); Python >= 3.11 is needed (numpy 2.4); checked: $CHECKED_PYTHONS"
PYVER=$(pyver "$PYTHON")
case " $CHECKED_PYTHONS " in
    *" $PYVER "*) ;;
    *) say "note: using $("$PYTHON" -V 2>&1); the pins are checked with Python ${CHECKED_PYTHONS// /, } (set PYTHON=...)" ;;
esac

WITH_FFCV="${WITH_FFCV:-$([ "$(uname -s)" = Darwin ] && echo 0 || echo 1)}"
[ "$WITH_FFCV" = 1 ] || say "WITH_FFCV=$WITH_FFCV: skipping ffcv and its system libraries (training uses --data.loader torchvision)"

# --- 1. system packages -------------------------------------------------------------------
missing=()
if [ "$WITH_FFCV" = 1 ] && ! { command -v pkg-config >/dev/null 2>&1 \
       && pkg-config --exists libturbojpeg \
       && { pkg-config --exists opencv4 || pkg-config --exists opencv; }; }; then
    missing+=("${SYSTEM_PKGS[@]}")
fi
[ "$WITH_FFCV" = 1 ] && ! command -v g++ >/dev/null 2>&1 && missing+=(g++)  # ffcv's C++ helper is built from source
# ...against the interpreter's headers (Python.h) and inside a venv
if [ "$WITH_FFCV" = 1 ] && ! "$PYTHON" -c 'import sysconfig, os, sys; sys.exit(0 if os.path.isfile(os.path.join(sysconfig.get_paths()["include"], "Python.h")) else 1)'; then
    missing+=("python$PYVER-dev")
fi
"$PYTHON" -c 'import ensurepip, venv' 2>/dev/null || missing+=("python$PYVER-venv")
[ ${#missing[@]} -eq 0 ] || apt_install "${missing[@]}"
if [ "${WITH_BROWSER:-0}" = "1" ] && ! { command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; }; then
    # best effort: without them the browser test skips, the rest still runs
    if can_apt; then apt_install "${BROWSER_PKGS[@]}" || say "warning: could not install ${BROWSER_PKGS[*]}"
    else say "note: no chromium/chromedriver and no apt rights: the browser test will skip"; fi
fi

# --- 2. virtual environment ---------------------------------------------------------------
stamp_value=$( { cat requirements.txt requirements-dev.txt pyproject.toml scripts/setup.sh; echo "WITH_FFCV=$WITH_FFCV python=$PYVER"; } \
              | "$PYTHON" -c 'import hashlib, sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest()[:16])')
stamp_file="$VENV/.setup-stamp"
smoke='import torch, torchvision, numpy, numba, cv2, omegaconf, gradio, PIL, matplotlib, safetensors, huggingface_hub, training, model, app, ffcv_pipeline'
[ "$WITH_FFCV" = 1 ] && smoke="$smoke, ffcv, ffcv.loader"
# the quick check (every run): all packages present; the full import (seconds) only after installing
# (and this checkout's own packages, installed editable from *this* folder, not a moved copy)
present='import importlib.util as u, os, sys; sys.exit(0 if all(u.find_spec(m) for m in sys.argv[1:]) and os.path.dirname(os.path.dirname(u.find_spec("training").origin)) == os.getcwd() else 1)'
packages=(torch torchvision numpy numba cv2 omegaconf gradio PIL matplotlib pytest onnxruntime safetensors huggingface_hub)
skipped="$VENV/.ffcv-build-failed"  # an earlier attempt failed: not retried until this is removed
[ "$WITH_FFCV" = 1 ] && [ -f "$skipped" ] && { WITH_FFCV=0; say "ffcv did not build here before ($skipped): going on without it"; }
[ "$WITH_FFCV" = 1 ] && packages+=(ffcv)
if [ -x "$VENV/bin/python" ] && [ "$(cat "$stamp_file" 2>/dev/null)" = "$stamp_value" ] \
   && [ "$VENV_PYVER" = "$PYVER" ] && "$VENV/bin/python" -I -c "$present" "${packages[@]}" 2>/dev/null; then
    say "already set up ($VENV, Python $PYVER); nothing to do"
    exit 0
fi

if [ -n "$VENV_PYVER" ] && [ "$VENV_PYVER" != "$PYVER" ]; then
    # a venv cannot change its interpreter: a new one, but never at the cost of a folder we did not make
    [ -f "$VENV/pyvenv.cfg" ] || die "$VENV is Python $VENV_PYVER, not $PYVER ($PYTHON), and not a venv this script made: remove it or set VENV=..."
    say "$VENV was built with Python $VENV_PYVER; PYTHON=$PYTHON is Python $PYVER: rebuilding $VENV"
    rm -rf "$VENV"
fi

if [ -x "$VENV/bin/python" ] && ! "$VENV/bin/python" -m pip --version >/dev/null 2>&1; then
    say "$VENV is broken (no pip; an earlier venv creation failed?): recreating it"
    rm -rf "$VENV"
fi
if [ ! -x "$VENV/bin/python" ]; then
    say "creating virtual environment $VENV with $("$PYTHON" -V 2>&1)"
    "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
say "installing pinned packages (torch is a large download on a fresh machine)"
"${PIP[@]}" install -q --upgrade pip
"${PIP[@]}" install -q -r requirements.txt -r requirements-dev.txt
if [ "$WITH_FFCV" = 1 ]; then
    say "installing $FFCV_PIN (no deps, no build isolation)"
    if ! "${PIP[@]}" install -q --no-deps --no-build-isolation "$FFCV_PIN"; then
        say "ffcv could not be built here (see above): going on without it; training uses the torchvision loader (rm $skipped to retry)"
        touch "$skipped"
        smoke=${smoke%, ffcv, ffcv.loader}
    fi
fi
say "installing this project (editable: pip install -e .)"
"${PIP[@]}" install -q --no-deps --no-build-isolation -e .
"$VENV/bin/python" -c "$smoke" || die "import check failed after installation (see above)"
echo "$stamp_value" > "$stamp_file"
say "done: $("$VENV/bin/python" -c 'import sys, torch; from ffcv_pipeline import ffcv_version; print("Python", sys.version.split()[0], "torch", torch.__version__, "ffcv", ffcv_version())')"

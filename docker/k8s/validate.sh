#!/usr/bin/env bash
# Validates the manifests in docker/k8s offline against Kubernetes' JSON schemas
# (kubernetes-validate from PyPI bundles them), strictly (unknown fields are errors).
# ServiceMonitor is a CRD with no bundled schema: tests/server/deploy.rs checks its fields.
# Usage: docker/k8s/validate.sh [KUBERNETES_VERSION]   (default: the package's newest)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="${XDG_CACHE_HOME:-$HOME/.cache}/lethe/kubernetes-validate-1.37.0"
if [ ! -x "$venv/bin/kubernetes-validate" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q kubernetes-validate==1.37.0
fi
args=(--strict)
if [ $# -gt 0 ]; then args+=(-k "$1"); fi
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
# What `kubectl apply -k` would send, when kubectl (with its built-in kustomize) is here;
# else the files kustomization.yaml lists.
if command -v kubectl >/dev/null 2>&1; then
  kubectl kustomize "$here" > "$tmp/rendered.yaml"
  files=("$tmp/rendered.yaml")
else
  echo "kubectl not found: validating the files one by one, without kustomize" >&2
  files=("$here"/namespace.yaml "$here"/pvc.yaml "$here"/deployment.yaml "$here"/service.yaml "$here"/servicemonitor.yaml)
fi
files+=("$here/secret.example.yaml")
"$venv/bin/kubernetes-validate" "${args[@]}" "${files[@]}" 2>&1 | tee "$tmp/out"
# A kind without a schema is only a warning to kubernetes-validate; allow it for the CRD only.
if grep WARN "$tmp/out" | grep -v 'kind ServiceMonitor with api version monitoring.coreos.com/v1'; then
  echo "validate.sh: unexpected warnings" >&2
  exit 1
fi
echo "validate.sh: all manifests valid"

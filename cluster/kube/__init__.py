"""Kubernetes tooling: KubeRay manifests rendered from the deployment config (manifests.py) and
their offline strict validation against the vendored KubeRay CRDs (validate.py, assets/)."""

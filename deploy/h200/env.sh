# Sourced by every run on the H200: paths, environment, memstage from .gpu/repo as a package tree.
export H=/root/h R=$PWD/.gpu/repo   # this checkout, copied to .gpu/repo of the carried tree
[ -d "$R" ] || R=$PWD              # or the checkout itself (setup_flows.sh)
export PYTHONPATH=$R:$H/site:$H/models MEMSTAGE_MODELS=/root/models HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export PREFECT_SERVER_ANALYTICS_ENABLED=false VLLM_USE_FLASHINFER_SAMPLER=0 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
export JAX_PLATFORMS=cpu XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
# memstage's subpackages are top-level folders (package-dir): link them into memstage/ so that the
# repository root itself imports as the package (pytest and the benches put it first on sys.path).
for d in flows tasks stores gpu dashboards cli server runtime; do ln -sfn ../$d $R/memstage/$d; done
[ -f $H/site/faiss/__init__.py ] || [ ! -d .gpu/whl ] || python3 -c "import zipfile,sys; [zipfile.ZipFile(w).extractall(sys.argv[1]) for w in sys.argv[2:]]" $H/site .gpu/whl/*.whl
printf '#!/bin/sh\nexec python3 -m memstage.cli.main "$@"\n' > /usr/local/bin/memstage; chmod +x /usr/local/bin/memstage
mkdir -p $OUT

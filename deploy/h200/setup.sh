# Unpack the carried wheel tree (parts gathered under /root/stage by earlier calls) and convert SmolLM2.
set -e; t0=$(date +%s)
mkdir -p /root/stage && cp -n .parts/* /root/stage/ 2>/dev/null || true
ls -la /root/stage
if [ ! -d /root/h/site ]; then
  mkdir -p /root/h && if command -v xz >/dev/null; then UNXZ="xz -T16 -d"; else UNXZ="python3 -c \"import lzma,sys,shutil; shutil.copyfileobj(lzma.open(sys.stdin.buffer), sys.stdout.buffer, 1<<22)\""; fi
  cat /root/stage/main.* | eval $UNXZ | tar x -C /root/h
  python3 .gpu/overlay.py /root/h
fi
. .gpu/env.sh
python3 -c "import importlib.metadata as m, ray, prefect, duckdb, openai, fastapi, pydantic, bm25s, gguf, Stemmer; print('imports ok', m.version('vllm'), ray.__version__, prefect.__version__, duckdb.__version__, openai.__version__, fastapi.__version__, pydantic.__version__)"
cd $R && python3 -c "
from pathlib import Path; import time; t=time.time()
from memstage.gpu.tokenizer import ensure_converted; print('smollm2 at', ensure_converted(Path('/root/models')), round(time.time()-t,1), 's')"
echo "setup $(( $(date +%s) - t0 )) s"

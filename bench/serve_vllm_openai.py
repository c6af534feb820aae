"""`memstage serve --engine vllm` answered by the `openai` client: ingest, serve on loopback, ask, save.

Ingests the bundled sample conversation (namespace `demo`) through the ingest flow into a fresh data
directory, starts `memstage serve --engine vllm --insecure-local` on 127.0.0.1 (loopback: no API
keys), waits for /v1/models, then asks two questions with the `openai` client (one whole, one
streamed with usage), and writes the answers, usage and timings as JSON (--out) and on stdout. Needs CUDA and vllm (`pip install "memstage[gpu]"`).

    python bench/serve_vllm_openai.py --out serve_vllm_openai.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

QUESTIONS = ("What is the name of Sam's puppy?", "Which city does Maya live in?")


def memstage(*args: str) -> list[str]:
    return [sys.executable, "-m", "memstage.cli.main", *args]


def wait_up(client, proc: subprocess.Popen, timeout: float) -> float:
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"memstage serve exited with {proc.returncode}")
        try:
            client.models.list()
            return time.perf_counter() - start
        except Exception:  # noqa: BLE001 - not up yet
            time.sleep(1.0)
    raise TimeoutError(f"memstage serve did not answer within {timeout} s")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--timeout", type=float, default=400.0)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    from importlib import resources

    from openai import OpenAI

    sample = Path(str(resources.files("memstage.cli") / "samples" / "sample_conversation.jsonl"))
    out: dict = {"command": "python " + " ".join(sys.argv)}
    with tempfile.TemporaryDirectory() as tmp:
        home = str(Path(tmp) / "home")
        t0 = time.perf_counter()
        ing = subprocess.run(
            memstage("ingest", str(sample), "--home", home, "--runner", "local", "--json"),
            capture_output=True,
            text=True,
        )
        out["ingest_s"] = round(time.perf_counter() - t0, 1)
        if ing.returncode != 0:
            raise RuntimeError(f"ingest failed: {ing.stderr[-3000:]}")
        log = open(Path(tmp) / "serve.log", "w")  # noqa: SIM115 - closed below
        serve = memstage(
            "serve", "--engine", "vllm", "--home", home, "--port", str(args.port), "--insecure-local"
        )
        proc = subprocess.Popen(serve, stdout=log, stderr=subprocess.STDOUT, env={**os.environ})
        try:
            client = OpenAI(base_url=f"http://127.0.0.1:{args.port}/v1", api_key="memstage", timeout=120)
            out["serve_start_s"] = round(wait_up(client, proc, args.timeout), 1)
            out["models"] = [m.id for m in client.models.list().data]
            whole = client.chat.completions.create(
                model="memstage",
                messages=[{"role": "user", "content": QUESTIONS[0]}],
                user="demo",
                max_tokens=48,
            )
            out["whole"] = {"question": QUESTIONS[0], "answer": whole.choices[0].message.content,
                            "usage": whole.usage.model_dump() if whole.usage else None}  # fmt: skip
            pieces, usage, t = [], None, time.perf_counter()
            first = None
            for chunk in client.chat.completions.create(
                model="memstage", messages=[{"role": "user", "content": QUESTIONS[1]}], user="demo",
                max_tokens=48, stream=True, stream_options={"include_usage": True},
            ):  # fmt: skip
                usage = chunk.usage or usage
                for c in chunk.choices:
                    if c.delta and c.delta.content:
                        first = first or time.perf_counter() - t
                        pieces.append(c.delta.content)
            out["streamed"] = {"question": QUESTIONS[1], "answer": "".join(pieces), "chunks": len(pieces),
                               "client_ttft_ms": round((first or 0) * 1e3, 1),
                               "usage": usage.model_dump() if usage else None}  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - reported with the server's log below
            out["error"] = repr(exc)
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
            log.close()
            out["serve_log_tail"] = (Path(tmp) / "serve.log").read_text()[-3000:]
    text = json.dumps(out, indent=1)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    return 1 if "error" in out else 0


if __name__ == "__main__":
    sys.exit(main())

"""A/B of a scoring change on the same stores: recall@1000 with the current scoring and with the
scoring before issue 16's change (speaker names searched, session cue 0.5), patched in this process.

    python bench/scoring_ab.py speakers padded dated long      # robustness variants (or: dev)

Each file is built once (`evaluate_locomo`, as `memstage eval locomo` does), then asked twice.
"""

import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
from memstage.cli.eval_commands import _encoder, evaluate_locomo
from memstage.gpu.tokenizer import TokenCounter
from memstage.settings import get_settings
from memstage.stores.store import MemoryStore
from memstage.tasks import scoring
from memstage.tasks.evaluate import load_questions, own_memories, run_questions, summarise
from memstage.tasks.retrieve import Retriever
from memstage.tasks.robustness import write_variants

data = Path("../shared/data/locomo/locomo-dev.json")
variants = tuple(sys.argv[1:])
OLD = {"NAMES_SEARCHED": True, "SPEAKER_SESSION": 0.5}
out = {"load_start": os.getloadavg()}
with tempfile.TemporaryDirectory(prefix="s16b-ab-") as folder:
    paths = write_variants(data, folder, variants, 0) if variants != ("dev",) else {"dev": data}
    for name, path in paths.items():
        t = time.time()
        home = Path(folder) / f"home-{name}"
        rep = evaluate_locomo(path, budgets=(1000,), baselines=False, exhaustive=False, home=home)
        store = MemoryStore(home)
        qs = load_questions(path).items
        owns = {ns: own_memories(store, ns) for ns in {q.namespace for q in qs}}
        r = Retriever(store, _encoder(), TokenCounter(get_settings().models or store.models_dir()))
        res = {"eval_new": rep["recall"]["1000"]}
        for label, patch in (("new", {}), ("old", OLD)):
            saved = {k: getattr(scoring, k) for k in patch}
            for k, v in patch.items():
                setattr(scoring, k, v)
            try:
                res[label] = summarise(run_questions(r.retrieve, qs, owns, (1000,)))["recall"]["1000"]
            finally:
                for k, v in saved.items():
                    setattr(scoring, k, v)
        res["seconds"] = round(time.time() - t)
        res["load"] = os.getloadavg()
        out[name] = res
        print(name, json.dumps(res), flush=True)
print(json.dumps(out))

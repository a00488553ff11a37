# Teacher-forced log-probabilities of the local llama.cpp against ../shared/vectors (see README.md).
# Teacher-forced logprobs from the local llama.cpp (llama-cpp-python) vs the vectors.
import json, sys, numpy as np
from llama_cpp import Llama
model, vec = sys.argv[1], sys.argv[2]
fa = len(sys.argv) < 4 or sys.argv[3] != "nofa"
llm = Llama(model_path=model, n_ctx=2048, n_batch=512, n_threads=2, logits_all=True, flash_attn=fa, verbose=False)
v = json.load(open(vec))
for case in v["greedy"]:
    toks = llm.tokenize(case["prompt"].encode(), add_bos=case["add_special"], special=True)
    ids = toks + case["ids"][:15]
    llm.reset()
    llm.eval(ids)
    worst = 0; line = ""
    for s, step in enumerate(case["top_logprobs_first16"]):
        if s >= len(case["ids"]): break
        lg = np.array(llm.scores[len(toks) - 1 + s], dtype=np.float64)
        lp = lg - lg.max(); lp = lp - np.log(np.exp(lp).sum())
        d = max(abs(lp[c["id"]] - c["logprob"]) for c in step)
        worst = max(worst, d); line += f" {d:.3f}"
    print(f"{case['prompt']!r} worst {worst:.4f}:{line}")

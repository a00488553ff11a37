# Greedy continuations of llama.cpp run one token per forward pass (n_ubatch 1: the arithmetic of its decode
# kernels for the prompt too), for the prompts of a ../shared/vectors file: writes OUT (JSON) with, per case,
# the prompt, the token ids (the end-of-generation token that stopped it included, as llama-server reports) and
# the two best log-probabilities of every step, and llama-perplexity's estimate on ppl.txt with -c 128 -b 128
# -ub 1 (`ppl_ub1`). tests/model_llama_cpp_parity.rs compares the engine with it.
#
#   $LLAMA_CPP_REF/venv/bin/python scripts/parity/record_token_by_token.py MODEL.gguf VECTORS.json OUT.json
import hashlib, json, math, os, sys
import numpy as np
import llama_cpp as l
from llama_cpp import Llama


def perplexity_ub1(model, text_file, n_ctx=128):
    """llama-perplexity's default method (chunks of n_ctx from a fresh context, first token BOS, second half
    scored) with one token per forward pass."""
    llm = Llama(model_path=model, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=1, n_threads=2, logits_all=True,
                flash_attn=True, verbose=False)
    toks = llm.tokenize(open(text_file, encoding="utf-8").read().encode(), add_bos=True, special=False)
    add_bos = l.llama_vocab_get_add_bos(l.llama_model_get_vocab(llm.model))
    nll, count = 0.0, 0
    for i in range(len(toks) // n_ctx):
        chunk = list(toks[i * n_ctx:(i + 1) * n_ctx])
        if add_bos:
            chunk[0] = llm.token_bos()
        llm.reset()
        llm.eval(chunk)
        logits = np.ctypeslib.as_array(l.llama_get_logits(llm._ctx.ctx), shape=(n_ctx, llm.n_vocab())).astype(np.float64)
        for j in range(n_ctx // 2, n_ctx - 1):
            mx = logits[j].max()
            nll += mx + math.log(np.exp(logits[j] - mx).sum()) - logits[j][toks[i * n_ctx + j + 1]]
            count += 1
    return round(math.exp(nll / count), 4)



model, vec, out = sys.argv[1], sys.argv[2], sys.argv[3]
# flash attention on: what llama-server and llama-perplexity choose on a CPU ("auto"), as in the vectors.
llm = Llama(model_path=model, n_ctx=2048, n_batch=512, n_ubatch=1, n_threads=2, logits_all=True,
            flash_attn=True, verbose=False)
v = json.load(open(vec))
cases = []
for case in v["greedy"]:
    toks = llm.tokenize(case["prompt"].encode(), add_bos=case["add_special"], special=True)
    llm.reset()
    llm.eval(toks)
    ids, top2 = [], []
    for _ in range(case["n_predict"]):
        lg = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float64)
        lp = lg - lg.max()
        lp = lp - np.log(np.exp(lp).sum())
        o = np.argsort(-lp, kind="stable")
        t = int(o[0])
        ids.append(t)
        top2.append([float(lp[o[0]]), float(lp[o[1]])])
        if llm._model.token_is_eog(t) if hasattr(llm._model, "token_is_eog") else t == llm.token_eos():
            break
        llm.eval([t])
    cases.append({"prompt": case["prompt"], "add_special": case["add_special"], "n_predict": case["n_predict"],
                  "ids": ids, "top2_logprobs": top2})
sha = hashlib.sha256(open(model, "rb").read()).hexdigest()
json.dump({"note": "llama.cpp 0c1e570 (llama-cpp-python 0.3.36) greedy, n_ubatch 1, flash attention, "
                   "made by scripts/parity/record_token_by_token.py",
           "file": model.rsplit("/", 1)[-1], "sha256": sha, "greedy": cases,
           "ppl_ub1": perplexity_ub1(model, os.path.join(os.path.dirname(vec), "ppl.txt"))},
          open(out, "w"), indent=1)
print("wrote", out, len(cases), "cases")

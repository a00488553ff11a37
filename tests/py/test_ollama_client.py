"""Drives a running `cyber-inference serve` through its Ollama API with the official `ollama` package
(issue 19 acceptance).

Usage: test_ollama_client.py BASE_URL SUPERVISOR_PID MODELS_DIR
  BASE_URL        the supervisor (http://127.0.0.1:PORT), with SmolLM2-135M-Instruct.Q4_1.gguf and
                  all-MiniLM-L6-v2.F16.gguf in MODELS_DIR and HF_ENDPOINT on the test hub, which serves
                  test/minilm-split (MiniLM split in two parts, F16)
  SUPERVISOR_PID  its pid: worker processes are its children (read from /proc)
Called by tests/supervisor_ollama.rs; prints "ALL OK" at the end.
"""

import datetime
import hashlib
import json
import math
import os
import sys
import time

import httpx
import jsonschema
import ollama

BASE, SUP_PID, MODELS_DIR = sys.argv[1], int(sys.argv[2]), sys.argv[3]
SMOL = "SmolLM2-135M-Instruct.Q4_1"
MINILM = "all-MiniLM-L6-v2.F16"
PULLED = "hf.co/test/minilm-split:F16"
c = ollama.Client(host=BASE)
Q = [{"role": "user", "content": "What is the capital of France?"}]
GREEDY = {"temperature": 0, "num_predict": 24}


def check(cond, what):
    if not cond:
        raise AssertionError(what)
    print("ok:", what.split("\n")[0][:110])


def workers():
    """Command lines of the supervisor's live child processes."""
    out = []
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            with open(f"/proc/{p}/stat") as f:
                stat = f.read()
            fields = stat[stat.rindex(")") + 2 :].split()
            if int(fields[1]) != SUP_PID or fields[0] == "Z":
                continue
            with open(f"/proc/{p}/cmdline", "rb") as f:
                out.append(f.read().replace(b"\0", b" ").decode())
        except (OSError, ValueError):
            continue
    return out


def has_worker(model_file):
    return any(" worker " in cl and model_file in cl for cl in workers())


def ps_names():
    return [m.model for m in c.ps().models]


def wait(cond, secs, what):
    deadline = time.time() + secs
    while time.time() < deadline:
        if cond():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out: {what}")


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for b in iter(lambda: f.read(1 << 20), b""):
            h.update(b)
    return h.hexdigest()


def expect_error(fn, status, contains):
    try:
        fn()
    except ollama.ResponseError as e:
        check(
            e.status_code == status and contains in str(e.error),
            f"error {status} with {contains!r}: {e}",
        )
        return
    raise AssertionError(f"no error (wanted {status})")


# --- version, list, show -------------------------------------------------------------------------
v = httpx.get(BASE + "/api/version").json()
check(isinstance(v.get("version"), str) and v["version"].count(".") == 2, f"version {v}")

tags = {m.model: m for m in c.list().models}
check(SMOL in tags and MINILM in tags, f"list has both models: {list(tags)}")
smol = tags[SMOL]
check(
    smol.size == os.path.getsize(os.path.join(MODELS_DIR, SMOL + ".gguf")) and smol.size > 0,
    f"size {smol.size}",
)
check(
    smol.digest == sha256(os.path.join(MODELS_DIR, SMOL + ".gguf")),
    f"digest is the file's SHA-256 ({smol.digest[:16]}…)",
)
check(
    smol.details.family == "llama"
    and smol.details.quantization_level == "Q4_1"
    and smol.details.parameter_size.endswith("M")
    and smol.details.format == "gguf",
    f"details {smol.details}",
)
check(isinstance(smol.modified_at, datetime.datetime), "modified_at is a date")
check(tags[MINILM].details.family == "bert", f"MiniLM family {tags[MINILM].details.family}")

sh = c.show(SMOL)
check("<|im_start|>" in (sh.template or ""), "show: the GGUF's chat template")
check(sh.modelinfo["general.architecture"] == "llama", "show: model_info from GGUF metadata")
check(sh.modelinfo["llama.context_length"] == 8192, f"show: context {sh.modelinfo.get('llama.context_length')}")
check(sh.modelinfo.get("tokenizer.ggml.tokens", "absent") is None, "show: arrays left out unless verbose")
check("num_ctx" in (sh.parameters or ""), f"show: parameters {sh.parameters!r}")
check("completion" in (sh.capabilities or []), f"show: capabilities {sh.capabilities}")
check(sh.details.quantization_level == "Q4_1", "show: details")
check("embedding" in (c.show(MINILM).capabilities or []), "show: MiniLM embeds")

# --- chat ----------------------------------------------------------------------------------------
r = c.chat(model=SMOL, messages=Q, options=GREEDY, stream=False)
check(r.message.role == "assistant" and any(ch.isalpha() for ch in r.message.content), f"chat: {r.message.content!r}")
check(r.done and r.done_reason in ("stop", "length"), f"chat: done_reason {r.done_reason}")
check(r.prompt_eval_count > 0 and r.eval_count > 0, f"chat: counts {r.prompt_eval_count}/{r.eval_count}")
check(r.total_duration > 0 and r.eval_duration >= 0, "chat: durations")
check(r.eval_count <= 24, "chat: num_predict caps the reply")

parts = list(c.chat(model=SMOL, messages=Q, options=GREEDY, stream=True))
check(len(parts) >= 3, f"streamed chat: {len(parts)} NDJSON objects")
check(all(not p.done for p in parts[:-1]) and parts[-1].done, "streamed chat: only the last is done")
check(parts[-1].done_reason == r.done_reason and parts[-1].eval_count == r.eval_count, "streamed chat: final counters")
streamed = "".join(p.message.content or "" for p in parts)
check(streamed == r.message.content, "greedy: streamed and non-streamed chat agree")

ps = {m.model: m for m in c.ps().models}
check(SMOL in ps, f"ps lists the loaded model: {list(ps)}")
p = ps[SMOL]
check(p.size_vram == 0 and p.size > 0, f"ps: size {p.size}, size_vram {p.size_vram}")
left = (p.expires_at - datetime.datetime.now(datetime.timezone.utc)).total_seconds()
check(0 < left <= 300 + 5, f"ps: expires_at from the idle timeout ({left:.0f} s left)")
check(has_worker(SMOL + ".gguf"), "a worker process runs the model")

# keep_alive as a duration keeps it that long.
c.chat(model=SMOL, messages=Q, options={"num_predict": 2}, keep_alive="1h")
left = ([m for m in c.ps().models if m.model == SMOL][0].expires_at - datetime.datetime.now(datetime.timezone.utc)).total_seconds()
check(3500 < left <= 3600 + 5, f"keep_alive 1h: expires in {left:.0f} s")

# --- structured output ---------------------------------------------------------------------------
schema = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 30},
        "population": {"type": "integer", "minimum": 0, "maximum": 100000000},
    },
    "required": ["city", "population"],
    "additionalProperties": False,
}
r = c.chat(
    model=SMOL,
    messages=[{"role": "user", "content": "Give the capital of France and its population as JSON."}],
    format=schema,
    options={"temperature": 0, "num_predict": 300},
)
check(r.done_reason == "stop", f"format=<schema>: the reply ended by itself: {r.message.content!r}")
doc = json.loads(r.message.content)
jsonschema.validate(doc, schema)
check(True, f"chat format=<schema>: valid JSON {doc}")
r = c.chat(
    model=SMOL,
    messages=[{"role": "user", "content": "Give the capital of France and its population as JSON."}],
    format="json",
    options={"temperature": 0, "num_predict": 300},
)
# The constraint holds (the reply is JSON from its first character), and a reply the budget would cut (this
# weak model can ramble inside a string) is closed in it, so it always parses.
check(r.message.content.lstrip().startswith("{"), f"format=json constrains the reply: {r.message.content[:60]!r}")
check(isinstance(json.loads(r.message.content), dict),
      f"format=json: a JSON object ({r.done_reason}): {r.message.content[-60:]!r}")

# --- generate ------------------------------------------------------------------------------------
g = c.generate(model=SMOL, prompt="Why is the sky blue?", options={"temperature": 0, "num_predict": 16})
check(any(ch.isalpha() for ch in g.response), f"generate: {g.response!r}")
check(g.done and g.context and all(isinstance(t, int) for t in g.context), f"generate: context of {len(g.context)} ids")
check(len(g.context) >= g.prompt_eval_count, "generate: context holds the prompt and the reply")
g2 = c.generate(model=SMOL, prompt="And at night?", context=g.context, options={"temperature": 0, "num_predict": 8})
check(g2.prompt_eval_count > len(g.context), f"generate: context round-trip ({g2.prompt_eval_count} prompt tokens)")
gs = list(c.generate(model=SMOL, prompt="Why is the sky blue?", options={"temperature": 0, "num_predict": 16}, stream=True))
check("".join(x.response for x in gs) == g.response and gs[-1].done and gs[-1].context == g.context,
      "greedy: streamed generate agrees, with the same context")
raw = c.generate(model=SMOL, prompt="<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", raw=True,
                 options={"temperature": 0, "num_predict": 8})
check(raw.done and raw.eval_count > 0, f"generate raw: {raw.response!r}")
expect_error(lambda: c.generate(model=SMOL, prompt="What is this?", images=[b"\x89PNG\r\n"]), 400, "images are not supported")

# --- embed ---------------------------------------------------------------------------------------
e = c.embed(model=MINILM, input=["hello world", "the cat sat on the mat"])
check(len(e.embeddings) == 2 and len(e.embeddings[0]) == 384, "embed: two 384-dim vectors")
check(abs(math.sqrt(sum(x * x for x in e.embeddings[0])) - 1) < 1e-3, "embed: L2-normalised")
check(e.prompt_eval_count > 0, "embed: prompt_eval_count")
one = c.embeddings(model=MINILM, prompt="hello world")
check(max(abs(a - b) for a, b in zip(one.embedding, e.embeddings[0])) < 1e-4, "embeddings (legacy) = embed")
d = c.embed(model=MINILM, input="hello world", dimensions=64)
check(len(d.embeddings[0]) == 64, "embed: dimensions truncates")

# --- load and unload -----------------------------------------------------------------------------
r = c.chat(model=SMOL, messages=Q, options={"num_predict": 2}, keep_alive=0)
check(r.done, "chat with keep_alive=0 answers")
wait(lambda: SMOL not in ps_names(), 30, "keep_alive=0 unloads")
wait(lambda: not has_worker(SMOL + ".gguf"), 30, "its worker process exits")
check(True, "keep_alive=0: gone from /api/ps and from the process table")
g = c.generate(model=SMOL)
check(g.done_reason == "load" and SMOL in ps_names() and has_worker(SMOL + ".gguf"), "generate with no prompt loads")
g = c.generate(model=SMOL, keep_alive=0)
check(g.done_reason == "unload" and SMOL not in ps_names(), "generate with no prompt and keep_alive=0 unloads")
wait(lambda: not has_worker(SMOL + ".gguf"), 30, "unloaded worker exits")

# --- pull, copy, delete --------------------------------------------------------------------------
progress = list(c.pull(PULLED, stream=True))
statuses = [x.status for x in progress]
check(statuses[0] == "pulling manifest" and statuses[-1] == "success", f"pull: {statuses[0]} … {statuses[-1]}")
check("verifying sha256 digest" in statuses and "writing manifest" in statuses, "pull: Ollama's phases")
sized = [x for x in progress if x.total]
check(sized and sized[-1].completed == sized[-1].total, f"pull: progress reaches the total ({sized[-1].total} bytes)")
names = [m.model for m in c.list().models]
check(PULLED in names, f"the pulled model is listed by its pull name: {names}")
parts_on_disk = [f for f in os.listdir(MODELS_DIR) if f.startswith("minilm-F16-")]
check(len(parts_on_disk) == 2, f"both parts of the split are in MODELS_DIR: {parts_on_disk}")
e2 = c.embed(model=PULLED, input=["hello world"])
check(max(abs(a - b) for a, b in zip(e2.embeddings[0], e.embeddings[0])) < 1e-4, "the pulled split model embeds like the original")
check(c.pull(PULLED, stream=False).status == "success", "pull again (nothing to fetch), not streamed")
expect_error(lambda: c.pull("llama3.2"), 400, "hf.co/")
expect_error(lambda: c.pull("hf.co/test/minilm-split:Q2_K"), 404, "F16")

check(c.copy(SMOL, "my-smol").status == "success", "copy")
r = c.chat(model="my-smol", messages=Q, options=GREEDY)
check(r.model == "my-smol" and r.message.content, "chat through the copy's name")
check(c.delete("my-smol").status == "success", "delete the copy")
names = [m.model for m in c.list().models]
check("my-smol" not in names and SMOL in names, "the copy is gone, the model stays")
check(c.delete(PULLED).status == "success", "delete the pulled model")
wait(lambda: not [f for f in os.listdir(MODELS_DIR) if f.startswith("minilm-F16-")], 10, "files deleted")
check(PULLED not in [m.model for m in c.list().models], "pulled model gone from the list and the disk")

# --- errors --------------------------------------------------------------------------------------
expect_error(lambda: c.chat(model="nope", messages=Q), 404, "not found")
expect_error(lambda: c.show("nope"), 404, "not found")
expect_error(lambda: c.delete("nope"), 404, "not found")
expect_error(lambda: c.chat(model=SMOL, messages=Q, options={"temperature": "hot"}), 400, "temperature")
expect_error(lambda: c.chat(model=SMOL, messages=Q, keep_alive="soon"), 400, "keep_alive")
r = httpx.post(BASE + "/api/chat", content=b"{not json", headers={"content-type": "application/json"})
check(r.status_code == 400 and isinstance(r.json()["error"], str), f"bad body: 400 {r.json()}")
r = httpx.post(BASE + "/api/generate", json={"prompt": "no model"})
check(r.status_code == 400 and "model" in r.json()["error"], f"missing model: 400 {r.json()}")

print("ALL OK")

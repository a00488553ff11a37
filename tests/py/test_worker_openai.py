"""Drives a running `cyber-inference worker` with the official `openai` package (issue 5 acceptance).

Usage: test_worker_openai.py GEN_BASE_URL EMBED_BASE_URL VECTORS_DIR
  GEN_BASE_URL   a worker on SmolLM2 started with --embedding -a smol
  EMBED_BASE_URL a worker on all-MiniLM-L6-v2.F16.gguf
  VECTORS_DIR    ../shared/vectors (llama.cpp's reference embeddings)
Called by tests/worker_e2e.rs (`python_openai_client_drives_the_worker`); prints "ALL OK" at the end.
"""

import base64
import json
import math
import struct
import sys
import urllib.request

import openai

GEN, EMB, VECTORS = sys.argv[1], sys.argv[2], sys.argv[3]


def post(base, path, body):
    req = urllib.request.Request(
        base + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req) as r:
        return json.loads(r.read())


def n_tokens(base, text):
    return len(post(base, "/tokenize", {"content": text, "add_special": True, "parse_special": True})["tokens"])


def check(cond, what):
    if not cond:
        raise AssertionError(what)
    print("ok:", what.split("\n")[0][:100])


client = openai.OpenAI(base_url=GEN + "/v1", api_key="unused")
messages = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": [{"type": "text", "text": "Name three colors."}]},
]

# Models list.
models = client.models.list()
check([m.id for m in models.data] == ["smol"], f"models list is the alias: {models}")

# Chat, not streamed, greedy.
chat = client.chat.completions.create(model="whatever", messages=messages, max_tokens=24, temperature=0)
text = chat.choices[0].message.content
check(chat.model == "smol", "response reports the alias")
check(len(text) > 0 and chat.choices[0].finish_reason in ("stop", "length"), f"chat text: {text!r}")
prompt = post(GEN, "/apply-template", {"messages": messages})["prompt"]
check(chat.usage.prompt_tokens == n_tokens(GEN, prompt), "usage.prompt_tokens equals /tokenize of the prompt")
check(
    chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens,
    "usage total = prompt + completion",
)
if chat.choices[0].finish_reason == "length":
    check(chat.usage.completion_tokens == 24, "length → max_tokens tokens")

# The same request again reuses the slot's KV cache for all but the last prompt token, same answer.
again = client.chat.completions.create(model="whatever", messages=messages, max_tokens=24, temperature=0)
check(
    again.usage.prompt_tokens_details.cached_tokens == chat.usage.prompt_tokens - 1,
    f"prompt cache reused: {again.usage}",
)
check(again.choices[0].message.content == text, "prefix reuse leaves the greedy answer unchanged")

# The same request streamed gives the same text, in OpenAI's chunk order.
stream = client.chat.completions.create(
    model="whatever",
    messages=messages,
    max_tokens=24,
    temperature=0,
    stream=True,
    stream_options={"include_usage": True},
)
chunks = list(stream)
check(chunks[0].choices[0].delta.role == "assistant", "first chunk carries the role")
finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
check(len(finish) == 1 and finish[0].choices[0].finish_reason == chat.choices[0].finish_reason, "one finish chunk")
check(chunks[-1].choices == [] and chunks[-1].usage is not None, "usage chunk last")
check(chunks[-1].usage.completion_tokens == chat.usage.completion_tokens, "streamed usage equals non-streamed")
streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
check(streamed == text, f"streamed text equals non-streamed text\n{streamed!r}\n{text!r}")

# Stop strings never appear, streamed or not, even when they span tokens.
words = text.split()
stop = None
for w in words[1:]:
    if len(w) >= 3:
        stop = w[1:3] if len(w) > 3 else w
        break
if stop is None:
    stop = text[len(text) // 2 : len(text) // 2 + 2]
for streaming in (False, True):
    r = client.chat.completions.create(
        model="x", messages=messages, max_tokens=24, temperature=0, stop=[stop], stream=streaming
    )
    if streaming:
        out = "".join(c.choices[0].delta.content or "" for c in r if c.choices)
    else:
        out = r.choices[0].message.content
    check(stop not in out and text.startswith(out), f"stop {stop!r} not in output (stream={streaming}): {out!r}")

# logprobs / top_logprobs and n.
r = client.chat.completions.create(
    model="x", messages=messages, max_tokens=4, temperature=0, logprobs=True, top_logprobs=3, n=2
)
check(len(r.choices) == 2, "n=2 gives two choices")
lp = r.choices[0].logprobs.content
check(len(lp) >= 1 and len(lp[0].top_logprobs) == 3, "top_logprobs has 3 entries")
check(abs(lp[0].logprob - lp[0].top_logprobs[0].logprob) < 1e-5 and lp[0].logprob <= 0, "greedy token is the best")
check(r.choices[0].message.content == r.choices[1].message.content, "greedy choices agree")

# Text completion (+ echo, logprobs).
c = client.completions.create(model="x", prompt="The capital of France is", max_tokens=8, temperature=0)
check(len(c.choices[0].text) > 0, f"completion: {c.choices[0].text!r}")
check(c.usage.prompt_tokens == n_tokens(GEN, "The capital of France is"), "completion prompt usage = /tokenize")
e = client.completions.create(
    model="x", prompt="The capital of France is", max_tokens=8, temperature=0, echo=True, logprobs=2
)
check(e.choices[0].text == "The capital of France is" + c.choices[0].text, "echo prepends the prompt")
check(len(e.choices[0].logprobs.tokens) == c.usage.completion_tokens, "one logprob per generated token")
s = client.completions.create(model="x", prompt="The capital of France is", max_tokens=8, temperature=0, stream=True)
check("".join(ch.choices[0].text for ch in s if ch.choices) == c.choices[0].text, "streamed completion equal")

# Embeddings from the generation model (--embedding).
em = client.embeddings.create(model="x", input=["hello world", "goodbye"])
check(len(em.data) == 2 and abs(math.sqrt(sum(x * x for x in em.data[0].embedding)) - 1) < 1e-4, "gen model embeds")

# Embeddings from the BERT model: equal to llama.cpp's (cosine), float and base64.
bert = openai.OpenAI(base_url=EMB + "/v1", api_key="unused")
ref = json.load(open(f"{VECTORS}/all-MiniLM-L6-v2.F16.gguf.json"))["embeddings"]
texts = [x["text"] for x in ref]
got = bert.embeddings.create(model="minilm", input=texts)
for x, g in zip(ref, got.data):
    a, b = x["embedding"], g.embedding
    cos = sum(p * q for p, q in zip(a, b)) / math.sqrt(sum(p * p for p in a) * sum(q * q for q in b))
    check(cos >= 0.999, f"MiniLM embedding cosine {cos:.6f} vs llama.cpp for {x['text'][:30]!r}")
raw = post(EMB, "/v1/embeddings", {"input": texts[0], "encoding_format": "base64"})
vec = struct.unpack(f"<{len(got.data[0].embedding)}f", base64.b64decode(raw["data"][0]["embedding"]))
check(max(abs(p - q) for p, q in zip(vec, got.data[0].embedding)) < 1e-6, "base64 equals float")

# Errors through the client raise typed exceptions.
try:
    client.chat.completions.create(model="x", messages=[])
    check(False, "empty messages must fail")
except openai.BadRequestError as err:
    check(err.status_code == 400 and "messages" in str(err), "empty messages → 400 BadRequestError")

print("ALL OK")

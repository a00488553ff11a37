"""Drives a running `cyber-inference serve` through its Anthropic Messages API with the official
`anthropic` package (issue 19 acceptance).

Usage: test_anthropic_client.py BASE_URL          (keys not required: messages, streaming, tools, count)
       test_anthropic_client.py BASE_URL KEY      (keys required: x-api-key accepted, 401 without)
  BASE_URL  the supervisor (http://127.0.0.1:PORT) with SmolLM2-135M-Instruct.Q4_1.gguf in MODELS_DIR
Called by tests/supervisor_anthropic.rs; prints "ALL OK" at the end.
"""

import sys

import anthropic
import httpx

BASE = sys.argv[1]
KEY = sys.argv[2] if len(sys.argv) > 2 else None
SMOL = "SmolLM2-135M-Instruct.Q4_1"
Q = [{"role": "user", "content": "What is the capital of France?"}]
SYSTEM = "You are a geography teacher."
WEATHER = {
    "name": "get_weather",
    "description": "Get the current weather in a given location",
    "input_schema": {
        "type": "object",
        "properties": {"location": {"type": "string", "description": "The city, e.g. Paris"}},
        "required": ["location"],
    },
}


def check(cond, what):
    if not cond:
        raise AssertionError(what)
    print("ok:", what.split("\n")[0][:110])


def expect(exc, fn, status, kind):
    try:
        fn()
    except exc as e:
        body = e.body if isinstance(e.body, dict) else {}
        check(
            e.status_code == status and body.get("type") == "error" and body["error"]["type"] == kind,
            f"{status} {kind}: {body}",
        )
        return
    raise AssertionError(f"no {exc.__name__}")


if KEY:
    good = anthropic.Anthropic(base_url=BASE, api_key=KEY, max_retries=0)
    r = good.messages.create(model=SMOL, max_tokens=4, messages=Q)
    check(r.content and r.usage.output_tokens > 0, "x-api-key: the right key works")
    bad = anthropic.Anthropic(base_url=BASE, api_key="ci-wrong", max_retries=0)
    expect(anthropic.AuthenticationError, lambda: bad.messages.create(model=SMOL, max_tokens=4, messages=Q), 401, "authentication_error")
    r = httpx.post(BASE + "/v1/messages", json={"model": SMOL, "max_tokens": 4, "messages": Q})
    check(r.status_code == 401 and r.json()["error"]["type"] == "authentication_error", f"no key: 401 {r.json()}")
    print("ALL OK")
    sys.exit(0)

c = anthropic.Anthropic(base_url=BASE, api_key="unused", max_retries=0)

# --- messages.create, not streamed and streamed ----------------------------------------------------
r = c.messages.create(model=SMOL, max_tokens=24, extra_body={"temperature": 0}, system=SYSTEM, messages=Q)
check(r.type == "message" and r.role == "assistant" and r.id.startswith("msg_"), f"message {r.id}")
check(r.content[0].type == "text" and any(ch.isalpha() for ch in r.content[0].text), f"text: {r.content[0].text!r}")
check(r.stop_reason in ("end_turn", "max_tokens"), f"stop_reason {r.stop_reason}")
check(r.usage.input_tokens > 0 and 0 < r.usage.output_tokens <= 24, f"usage {r.usage}")
check(r.model == SMOL, "model echoed")

with c.messages.stream(model=SMOL, max_tokens=24, extra_body={"temperature": 0}, system=SYSTEM, messages=Q) as s:
    text = "".join(s.text_stream)
    final = s.get_final_message()
check(text == r.content[0].text, "greedy: streamed and non-streamed text agree")
check(final.stop_reason == r.stop_reason and final.usage.output_tokens == r.usage.output_tokens, "stream: final message")
check(final.usage.input_tokens == r.usage.input_tokens, "stream: input_tokens in message_delta")

events = [e.type for e in c.messages.create(model=SMOL, max_tokens=8, messages=Q, stream=True)]
check(events[0] == "message_start" and events[-1] == "message_stop" and events[-2] == "message_delta", f"events {events[:3]}…{events[-3:]}")
check("content_block_start" in events and "content_block_delta" in events and "content_block_stop" in events, "block events")

r2 = c.messages.create(model=SMOL, max_tokens=24, extra_body={"temperature": 0}, stop_sequences=["Paris"], messages=Q)
check("Paris" not in r2.content[0].text, f"stop_sequences: {r2.content[0].text!r}")

# --- count_tokens ----------------------------------------------------------------------------------
n = c.messages.count_tokens(model=SMOL, system=SYSTEM, messages=Q)
check(n.input_tokens == r.usage.input_tokens, f"count_tokens {n.input_tokens} = the worker's prompt tokens {r.usage.input_tokens}")

# --- tool use round trip ---------------------------------------------------------------------------
ask = [{"role": "user", "content": "What is the weather like in Paris?"}]
t = c.messages.create(model=SMOL, max_tokens=100, extra_body={"temperature": 0}, tools=[WEATHER], tool_choice={"type": "any"}, messages=ask)
uses = [b for b in t.content if b.type == "tool_use"]
check(t.stop_reason == "tool_use" and uses and uses[0].name == "get_weather", f"tool_use: {t.content}")
check(isinstance(uses[0].input, dict) and isinstance(uses[0].input.get("location"), str), f"tool input {uses[0].input}")
nt = c.messages.count_tokens(model=SMOL, tools=[WEATHER], tool_choice={"type": "any"}, messages=ask)
check(nt.input_tokens == t.usage.input_tokens, f"count_tokens with tools {nt.input_tokens} = {t.usage.input_tokens}")
with c.messages.stream(model=SMOL, max_tokens=100, extra_body={"temperature": 0}, tools=[WEATHER], tool_choice={"type": "any"}, messages=ask) as s:
    ft = s.get_final_message()
su = [b for b in ft.content if b.type == "tool_use"]
check(su and su[0].input == uses[0].input and ft.stop_reason == "tool_use", f"streamed tool_use (input_json_delta): {su}")
follow = ask + [
    {"role": "assistant", "content": [b.model_dump() for b in t.content]},
    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": uses[0].id, "content": "18 degrees and sunny"}]},
]
f = c.messages.create(model=SMOL, max_tokens=40, extra_body={"temperature": 0}, tools=[WEATHER], messages=follow)
check(f.content and f.stop_reason in ("end_turn", "max_tokens", "tool_use") and f.usage.input_tokens > t.usage.input_tokens,
      f"after the tool_result: {f.content}")

# --- errors ----------------------------------------------------------------------------------------
expect(anthropic.NotFoundError, lambda: c.messages.create(model="nope", max_tokens=4, messages=Q), 404, "not_found_error")
r = httpx.post(BASE + "/v1/messages", json={"model": SMOL, "messages": Q})
check(r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error" and "max_tokens" in r.json()["error"]["message"], f"no max_tokens: {r.json()}")
r = httpx.post(BASE + "/v1/messages", content=b"{oops", headers={"content-type": "application/json"})
check(r.status_code == 400 and r.json()["type"] == "error", f"bad body: {r.json()}")
expect(anthropic.BadRequestError, lambda: c.messages.create(model=SMOL, max_tokens=4, messages=[{"role": "user", "content": [
    {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}]}]), 400, "invalid_request_error")

print("ALL OK")

"""Drives a running `cyber-inference serve` through OpenAI's Responses API with the official `openai`
package (issue 19 acceptance).

Usage: test_responses_client.py BASE_URL
  BASE_URL  the supervisor (http://127.0.0.1:PORT) with SmolLM2-135M-Instruct.Q4_1.gguf in MODELS_DIR
Called by tests/supervisor_responses.rs; prints "ALL OK" at the end.
"""

import json
import sys

import httpx
import jsonschema
import openai

BASE = sys.argv[1]
SMOL = "SmolLM2-135M-Instruct.Q4_1"
c = openai.OpenAI(base_url=BASE + "/v1", api_key="unused", max_retries=0)
Q = "What is the capital of France?"
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "Get the current weather in a given location",
    "parameters": {
        "type": "object",
        "properties": {"location": {"type": "string"}},
        "required": ["location"],
        "additionalProperties": False,
    },
}


def check(cond, what):
    if not cond:
        raise AssertionError(what)
    print("ok:", what.split("\n")[0][:110])


# --- responses.create, not streamed and streamed ----------------------------------------------------
r = c.responses.create(model=SMOL, input=Q, instructions="Answer briefly.", max_output_tokens=24, temperature=0)
check(r.object == "response" and r.id.startswith("resp_"), f"response {r.id}")
check(any(ch.isalpha() for ch in r.output_text), f"output_text {r.output_text!r}")
check(r.status in ("completed", "incomplete") and r.usage.input_tokens > 0 and 0 < r.usage.output_tokens <= 24, f"usage {r.usage}")

events = list(c.responses.create(model=SMOL, input=Q, instructions="Answer briefly.", max_output_tokens=24, temperature=0, stream=True))
kinds = [e.type for e in events]
check(kinds[0] == "response.created" and kinds[-1] in ("response.completed", "response.incomplete"), f"events {kinds[:2]}…{kinds[-1:]}")
text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
check(text == r.output_text, "greedy: streamed deltas equal the non-streamed text")
check(events[-1].response.output_text == r.output_text, "the final event carries the whole response")
check([e.sequence_number for e in events] == list(range(len(events))), "sequence numbers")

# --- previous_response_id ---------------------------------------------------------------------------
a = c.responses.create(model=SMOL, input="My name is Ada. Remember it.", max_output_tokens=16, temperature=0)
b = c.responses.create(model=SMOL, input="What is my name?", previous_response_id=a.id, max_output_tokens=16, temperature=0)
alone = c.responses.create(model=SMOL, input="What is my name?", max_output_tokens=16, temperature=0)
check(b.previous_response_id == a.id, "previous_response_id echoed")
check(b.usage.input_tokens > alone.usage.input_tokens + a.usage.output_tokens,
      f"the second call sees the first turn ({b.usage.input_tokens} vs {alone.usage.input_tokens} prompt tokens)")
got = c.responses.retrieve(a.id)
check(got.id == a.id and got.output_text == a.output_text, "GET /v1/responses/{id}")
c.responses.delete(a.id)
try:
    c.responses.retrieve(a.id)
    raise AssertionError("deleted response still there")
except openai.NotFoundError:
    check(True, "DELETE /v1/responses/{id}, then 404")
try:
    c.responses.create(model=SMOL, input="x", previous_response_id=a.id, max_output_tokens=4)
    raise AssertionError("a deleted previous_response_id was accepted")
except openai.NotFoundError as e:
    check("previous_response_id" in str(e), "an unknown previous_response_id is a 404")

# --- function call round trip -----------------------------------------------------------------------
ask = [{"role": "user", "content": "What is the weather like in Paris?"}]
t = c.responses.create(model=SMOL, input=ask, tools=[WEATHER], tool_choice="required", max_output_tokens=100, temperature=0)
calls = [o for o in t.output if o.type == "function_call"]
check(calls and calls[0].name == "get_weather", f"function_call item: {t.output}")
args = json.loads(calls[0].arguments)
jsonschema.validate(args, WEATHER["parameters"])
check(True, f"arguments follow the schema: {args}")
follow = ask + [calls[0].model_dump(exclude_none=True), {"type": "function_call_output", "call_id": calls[0].call_id, "output": "18 degrees and sunny"}]
f = c.responses.create(model=SMOL, input=follow, tools=[WEATHER], max_output_tokens=40, temperature=0)
check(f.usage.input_tokens > t.usage.input_tokens and f.output, "the call's output goes back to the model")
ev = list(c.responses.create(model=SMOL, input=ask, tools=[WEATHER], tool_choice="required", max_output_tokens=100, temperature=0, stream=True))
deltas = "".join(e.delta for e in ev if e.type == "response.function_call_arguments.delta")
check(deltas == calls[0].arguments, "streamed function_call_arguments deltas")

# --- structured output ------------------------------------------------------------------------------
schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}}, "required": ["city"], "additionalProperties": False}
s = c.responses.create(model=SMOL, input=Q, max_output_tokens=100, temperature=0,
                       text={"format": {"type": "json_schema", "name": "city", "schema": schema, "strict": True}})
jsonschema.validate(json.loads(s.output_text), schema)
check(True, f"text.format json_schema: {s.output_text}")

# --- errors -----------------------------------------------------------------------------------------
try:
    c.responses.create(model="nope", input="x")
    raise AssertionError("unknown model accepted")
except openai.NotFoundError as e:
    check(e.body.get("type") == "not_found_error" or "nope" in str(e), f"unknown model: 404 {e.body}")
r = httpx.post(BASE + "/v1/responses", content=b"{oops", headers={"content-type": "application/json"})
check(r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error", f"bad body: 400 {r.json()}")

print("ALL OK")

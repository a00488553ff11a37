"""Drives a running `cyber-inference worker` with the official `openai` package (issue 16 acceptance:
tool calling).

Usage: test_worker_tools.py BASE_URL
  BASE_URL  a worker on SmolLM2-135M-Instruct.Q4_1.gguf started with -a smol and
            --chat-template-file .../NousResearch-Hermes-2-Pro-Llama-3-8B-tool_use.jinja
Called by tests/worker_tools.rs (`python_openai_client_tool_calls_and_agent_loop`); prints "ALL OK" at
the end. A weak model only calls tools reliably because `tool_choice: "required"` (or a named function)
constrains the reply by a grammar built from the tools' parameter schemas.
"""

import json
import sys
import urllib.request

import jsonschema
import openai

BASE = sys.argv[1]
client = openai.OpenAI(base_url=BASE + "/v1", api_key="unused")


def check(cond, what):
    if not cond:
        raise AssertionError(what)
    print("ok:", what.split("\n")[0][:110])


def fn(name, description, properties, required):
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": description,
            "parameters": {"type": "object", "properties": properties, "required": required},
        },
    }


S = {"type": "string", "minLength": 1, "maxLength": 40}
TOOLS = {
    "get_weather": fn(
        "get_weather",
        "Current weather of a city",
        {"city": S, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        ["city", "unit"],
    ),
    "add": fn("add", "Adds two numbers", {"a": {"type": "number"}, "b": {"type": "number"}}, ["a", "b"]),
    "search": fn(
        "search",
        "Searches the web",
        {"query": S, "max_results": {"type": "integer", "minimum": 1, "maximum": 10}},
        ["query"],
    ),
    "set_alarm": fn(
        "set_alarm",
        "Sets an alarm",
        {"time": {"type": "string", "pattern": "^[0-2][0-9]:[0-5][0-9]$"}, "label": S},
        ["time"],
    ),
    "book_flight": fn(
        "book_flight",
        "Books a flight",
        {
            "origin": S,
            "destination": S,
            "passengers": {"type": "integer", "minimum": 1, "maximum": 9},
            "cabin": {"type": "string", "enum": ["economy", "business"]},
        },
        ["origin", "destination", "passengers"],
    ),
}
ALL = list(TOOLS.values())
CASES = [
    ("What is the weather in Paris?", ["get_weather"]),
    ("Is it raining in Tokyo right now?", ["get_weather", "search"]),
    ("Add 2 and 3.", ["add"]),
    ("What is 17.5 plus 4?", ["add", "search"]),
    ("Search the web for rust programming.", ["search"]),
    ("Find news about the moon landing.", ALL_NAMES := list(TOOLS)),
    ("Wake me up at 07:30.", ["set_alarm"]),
    ("Set an alarm for 22:15 called bedtime.", ["set_alarm", "get_weather"]),
    ("Book a flight from Oslo to Rome for two people.", ["book_flight"]),
    ("I need a business class ticket from Lima to Quito.", ["book_flight", "search"]),
    ("How hot is it in Cairo in fahrenheit?", ["get_weather"]),
    ("Sum 100 and -42.", ["add"]),
    ("Look up the population of Canada.", ["search", "add"]),
    ("Alarm at 06:00 please.", ["set_alarm"]),
    ("Fly me from Berlin to Madrid, one passenger.", ["book_flight"]),
    ("Weather in Nairobi, celsius.", ALL_NAMES),
    ("What's 0.5 + 0.25?", ["add"]),
    ("Search for the best pizza in Naples, top 3 results.", ["search"]),
    ("Remind me at 12:45 to eat lunch.", ["set_alarm", "add"]),
    ("Book 3 seats from Paris to Nice in economy.", ALL_NAMES),
]
check(len(CASES) == 20, "20 cases")


def schema(name):
    return TOOLS[name]["function"]["parameters"]


def validate_calls(calls, names, what):
    check(bool(calls), f"{what}: the reply carries tool calls")
    for c in calls:
        check(c["type"] == "function" and c["id"], f"{what}: call has an id and type function")
        check(c["name"] in names, f"{what}: {c['name']} is one of {names}")
        args = json.loads(c["arguments"])
        jsonschema.validate(args, schema(c["name"]))
        check(True, f"{what}: {c['name']}({c['arguments']}) validates against its schema")


def message_calls(msg):
    return [
        {"id": c.id, "type": c.type, "name": c.function.name, "arguments": c.function.arguments}
        for c in (msg.tool_calls or [])
    ]


def streamed_calls(stream):
    calls, finish, content = {}, None, ""
    for chunk in stream:
        if not chunk.choices:
            continue
        ch = chunk.choices[0]
        if ch.finish_reason:
            finish = ch.finish_reason
        content += ch.delta.content or ""
        for d in ch.delta.tool_calls or []:
            if d.index not in calls:
                # The first fragment of a call names it.
                check(d.id and d.type == "function" and d.function.name, f"first delta of call {d.index} has id, type, name")
                calls[d.index] = {"id": d.id, "type": d.type, "name": d.function.name, "arguments": ""}
            else:
                check(d.id is None and d.function.name is None, "later deltas carry only argument fragments")
            calls[d.index]["arguments"] += d.function.arguments or ""
    return [calls[i] for i in sorted(calls)], finish, content


n_ok = 0
for i, (prompt, names) in enumerate(CASES):
    tools = [TOOLS[n] for n in names]
    kw = dict(
        model="smol",
        messages=[{"role": "user", "content": prompt}],
        tools=tools,
        tool_choice="required",
        parallel_tool_calls=False,
        temperature=0.8,
        seed=1000 + i,
        max_tokens=160,
    )
    r = client.chat.completions.create(**kw)
    ch = r.choices[0]
    calls = message_calls(ch.message)
    validate_calls(calls, names, f"case {i} {prompt!r}")
    check(ch.finish_reason == "tool_calls", f"case {i}: finish_reason tool_calls ({ch.finish_reason})")
    check(len(calls) == 1, f"case {i}: parallel_tool_calls=false gives one call")
    # The same request streamed (same seed: same tokens) reassembles into the same calls.
    s_calls, s_finish, s_content = streamed_calls(client.chat.completions.create(stream=True, **kw))
    strip = lambda cs: [(c["name"], c["arguments"]) for c in cs]
    check(strip(s_calls) == strip(calls), f"case {i}: streamed deltas reassemble into the same calls {strip(s_calls)}")
    check(s_finish == "tool_calls", f"case {i}: streamed finish_reason tool_calls")
    check("<tool_call>" not in s_content, f"case {i}: no call markup streamed as content")
    n_ok += 1
check(n_ok == 20, "20/20 replies carry schema-valid tool calls, streamed and not")

# A named function: every call is to it.
for i in range(3):
    r = client.chat.completions.create(
        model="smol",
        messages=[{"role": "user", "content": "Tell me something."}],
        tools=ALL,
        tool_choice={"type": "function", "function": {"name": "add"}},
        temperature=0.8,
        seed=i,
        max_tokens=200,
    )
    calls = message_calls(r.choices[0].message)
    validate_calls(calls, ["add"], f"named tool_choice run {i}")

# Parallel calls allowed (the default): at least one complete, valid call.
r = client.chat.completions.create(
    model="smol",
    messages=[{"role": "user", "content": "Weather in Oslo and in Bergen?"}],
    tools=[TOOLS["get_weather"]],
    tool_choice="required",
    temperature=0,
    max_tokens=300,
)
validate_calls(message_calls(r.choices[0].message), ["get_weather"], "parallel_tool_calls default")

# The agent loop: call -> tool result -> final answer, all through the client.
messages = [{"role": "user", "content": "What is the weather in Paris?"}]
r = client.chat.completions.create(
    model="smol",
    messages=messages,
    tools=[TOOLS["get_weather"]],
    tool_choice="required",
    parallel_tool_calls=False,
    temperature=0,
    max_tokens=160,
)
msg = r.choices[0].message
validate_calls(message_calls(msg), ["get_weather"], "loop step 1")
check(msg.content is None, f"a reply of only tool calls has content null: {msg.content!r}")
messages.append(msg.model_dump(exclude_none=True))
for c in msg.tool_calls:
    messages.append({"role": "tool", "tool_call_id": c.id, "content": json.dumps({"temperature": 18, "sky": "clear"})})
r2 = client.chat.completions.create(
    model="smol", messages=messages, tools=[TOOLS["get_weather"]], tool_choice="none", temperature=0, max_tokens=40
)
final = r2.choices[0]
check(isinstance(final.message.content, str) and final.message.content.strip(), f"loop step 2: a final answer {final.message.content!r}")
check(not final.message.tool_calls, "loop step 2: tool_choice none gives no calls")
check(final.finish_reason in ("stop", "length"), f"loop step 2 finish {final.finish_reason}")
# The assistant's call and the tool result render back through the template.
req = urllib.request.Request(
    BASE + "/apply-template",
    data=json.dumps({"messages": messages}).encode(),
    headers={"Content-Type": "application/json"},
)
with urllib.request.urlopen(req) as resp:
    rendered = json.loads(resp.read())["prompt"]
check(
    '<tool_call>\n{"name": "get_weather"' in rendered and "<tool_response>" in rendered and '"temperature": 18' in rendered,
    f"the call and the tool message are rendered into the prompt:\n{rendered}",
)
# With tool_choice auto the same conversation is still served.
r3 = client.chat.completions.create(model="smol", messages=messages, tools=[TOOLS["get_weather"]], temperature=0, max_tokens=40)
check(r3.choices[0].finish_reason in ("stop", "length", "tool_calls"), "loop with tool_choice auto")

print("ALL OK")

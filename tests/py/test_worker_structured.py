"""Structured output through the official `openai` package against a running worker (issue 16 acceptance).

Usage: test_worker_structured.py BASE_URL
  BASE_URL  a worker on SmolLM2-135M-Instruct.Q4_1.gguf (a weak model: only the constraint makes the
            replies valid)
Called by tests/worker_structured.rs; prints "ALL OK" at the end, and the time each part took.

Checks: `chat.completions.parse(response_format=<pydantic model>)` returns a valid instance for 20
different schemas, not streamed and streamed (`chat.completions.stream`); `json_object` replies to 20
prompts parse with json.loads (19 do, as on llama-server: see the comment there), their content being the
JSON alone when the model wraps it in a ```json fence, streamed too; llama-server's `json_schema` and
`grammar` fields constrain /v1/completions and chat; an invalid GBNF grammar, an invalid schema and an unknown response_format type each give 400,
the first two quoting the compiler's message.
"""

import concurrent.futures
import enum
import json
import re
import sys
import time
from typing import List, Literal, Optional, Union

import openai
from pydantic import BaseModel, Field

BASE = sys.argv[1]
# Requests run 4 at a time (the worker has 4 slots): the batched forward pass makes that much faster
# than one by one, and it exercises constrained slots side by side.
POOL = concurrent.futures.ThreadPoolExecutor(max_workers=4)
client = openai.OpenAI(base_url=BASE + "/v1", api_key="unused", max_retries=0)
# Greedy and bounded: a weak model under a schema can ramble inside an unbounded string, so the budget
# must be large enough for the longest reply below (they take 20-120 tokens).
MAX_TOKENS = 300
failures = []


def check(cond, what):
    if not cond:
        failures.append(what)
        print("FAIL:", what, flush=True)
    else:
        print("ok:", what.split("\n")[0][:120], flush=True)


# --- 20 schemas: nested objects, arrays, enums, optional fields, string patterns, number ranges ---


class Person(BaseModel):
    name: str = Field(max_length=40)
    age: int = Field(ge=0, le=120)


class Color(BaseModel):
    color: Literal["red", "green", "blue"]


class Address(BaseModel):
    street: str = Field(max_length=60)
    city: str = Field(max_length=40)


class User(BaseModel):
    username: str = Field(pattern=r"^[a-z][a-z0-9_]{2,15}$")
    address: Address


class Tags(BaseModel):
    tags: List[str] = Field(min_length=1, max_length=4)


class Profile(BaseModel):
    name: str = Field(max_length=40)
    nickname: Optional[str] = Field(max_length=20)


class ZipCode(BaseModel):
    zip: str = Field(pattern=r"^[0-9]{5}$")


class Answer(BaseModel):
    is_true: bool


class Item(BaseModel):
    name: str = Field(max_length=30)
    price: float = Field(ge=0, le=1000)


class Order(BaseModel):
    items: List[Item] = Field(min_length=1, max_length=3)


class Mood(str, enum.Enum):
    happy = "happy"
    sad = "sad"
    neutral = "neutral"


class Feeling(BaseModel):
    mood: Mood


class Rating(BaseModel):
    stars: int = Field(ge=1, le=5)
    comment: str = Field(max_length=80)


class Event(BaseModel):
    title: str = Field(max_length=50)
    date: str = Field(pattern=r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$")


class Country(BaseModel):
    name: str = Field(max_length=40)


class City(BaseModel):
    name: str = Field(max_length=40)
    country: Country


class Trip(BaseModel):
    origin: City
    destination: City


class Numbers(BaseModel):
    values: List[int] = Field(min_length=2, max_length=5)


class Task(BaseModel):
    priority: Literal["low", "medium", "high"]
    done: bool
    minutes: int = Field(ge=1, le=600)


class IdOrName(BaseModel):
    key: Union[int, str]


class Contact(BaseModel):
    email: str = Field(pattern=r"^[a-z]{1,12}@[a-z]{1,12}\.(com|org|net)$")


class Ingredient(BaseModel):
    name: str = Field(max_length=30)
    grams: int = Field(ge=1, le=2000)


class Recipe(BaseModel):
    title: str = Field(max_length=50)
    ingredients: List[Ingredient] = Field(min_length=1, max_length=3)


class Weather(BaseModel):
    city: str = Field(max_length=40)
    celsius: float = Field(ge=-50, le=60)
    sky: Literal["sunny", "cloudy", "rainy"]


class Book(BaseModel):
    # An unbounded string: the grammar alone has to end it (the closing quote and brace).
    title: str
    year: int = Field(ge=1000, le=2100)


CASES = [
    (Person, "Describe a person named Alice who is 30 years old."),
    (Color, "What color is the sky?"),
    (User, "Create a user alice_01 living at 1 Main Street, Paris."),
    (Tags, "Give tags for a blog post about cooking pasta."),
    (Profile, "Make a profile for Robert, nicknamed Bob."),
    (ZipCode, "Give a US zip code."),
    (Answer, "Is water wet?"),
    (Order, "An order of two apples and a pear."),
    (Feeling, "How does a person feel after winning a prize?"),
    (Rating, "Rate a good pizza restaurant."),
    (Event, "A concert on the 5th of May 2025."),
    (Trip, "A trip from Paris, France to Rome, Italy."),
    (Numbers, "List a few small even numbers."),
    (Task, "An urgent task: fix the bug, not done, takes an hour."),
    (IdOrName, "Give the key of user number 42."),
    (Contact, "The email of bob at example dot com."),
    (Recipe, "A recipe for pancakes."),
    (Weather, "The weather in London today."),
    (Book, "A famous book and the year it was published."),
    (City, "Name a big city and its country."),
]
assert len({m for m, _ in CASES}) == 20


def messages(prompt):
    return [
        {"role": "system", "content": "You answer in JSON."},
        {"role": "user", "content": prompt},
    ]


def parse_case(case):
    model, prompt = case
    try:
        r = client.chat.completions.parse(
            model="smol",
            messages=messages(prompt),
            response_format=model,
            max_tokens=MAX_TOKENS,
            temperature=0,
        )
        parsed = r.choices[0].message.parsed
        return (
            isinstance(parsed, model) and r.choices[0].finish_reason == "stop",
            f"parse {model.__name__}: {r.choices[0].message.content!r} ({r.usage.completion_tokens} tokens)",
        )
    except Exception as e:  # a validation error or a length cut-off is a failure of this case
        return False, f"parse {model.__name__}: {type(e).__name__}: {e}"


def stream_case(case):
    model, prompt = case
    try:
        with client.chat.completions.stream(
            model="smol",
            messages=messages(prompt),
            response_format=model,
            max_tokens=MAX_TOKENS,
            temperature=0,
        ) as stream:
            n_chunks = sum(1 for ev in stream if ev.type == "content.delta")
            final = stream.get_final_completion()
        parsed = final.choices[0].message.parsed
        return (
            isinstance(parsed, model) and n_chunks > 1,
            f"stream {model.__name__}: {n_chunks} deltas, {final.choices[0].message.content!r}",
        )
    except Exception as e:
        return False, f"stream {model.__name__}: {type(e).__name__}: {e}"


t0 = time.time()
for ok, what in POOL.map(parse_case, CASES):
    check(ok, what)
t_parse = time.time() - t0

t0 = time.time()
for ok, what in POOL.map(stream_case, CASES):
    check(ok, what)
t_stream = time.time() - t0

# --- json_object: 20 different prompts, each reply must parse ---
TOPICS = [
    "a cat", "a car", "the moon", "a laptop", "a tree", "a song", "a city", "a river", "a phone",
    "a movie", "a dog", "a house", "a planet", "a book", "a chair", "a computer game", "a bird",
    "a mountain", "a sandwich", "a bicycle",
]
OBJECT_SYSTEM = 'You reply with one short JSON object, for example {"title": "Example", "size": "small"}.'


def object_case(topic):
    r = client.chat.completions.create(
        model="smol",
        messages=[
            {"role": "system", "content": OBJECT_SYSTEM},
            {"role": "user", "content": f"Describe {topic} in a few words as a JSON object."},
        ],
        response_format={"type": "json_object"},
        max_tokens=MAX_TOKENS,
        temperature=0,
    )
    text = r.choices[0].message.content
    finish = r.choices[0].finish_reason
    try:
        return isinstance(json.loads(text), dict), finish, f"json_object {topic}: {text!r}"
    except json.JSONDecodeError:
        return False, finish, f"json_object {topic}: {finish}, {text!r}"


t0 = time.time()
results = list(POOL.map(object_case, TOPICS))
n_ok = sum(ok for ok, _, _ in results)
for ok, finish, what in results:
    if not ok:
        print("json_object reply that does not parse: " + what, flush=True)
# At temperature 0 SmolLM2 Q4_1 answers "a car" with an object whose keys never end ("model",
# "model_name", "model_model_year", ...); llama-server (the llama.cpp of $LLAMA_CPP_REF) gives the same
# loop on the same request and cuts the object open at max_tokens (19/20 parse there). The worker closes a
# JSON reply when the budget would cut it, so every reply parses; one closed so ends with "length".
check(n_ok == 20, f"{n_ok}/20 json_object replies parse")
n_closed = sum(finish == "length" for _, finish, _ in results)
print(f"json_object: {n_closed} of 20 closed at the budget", flush=True)

# The closing at max_tokens, watched: a budget far too short for the model's object still gets one.
def car(budget, **kw):
    return client.chat.completions.create(
        model="smol",
        messages=[
            {"role": "system", "content": OBJECT_SYSTEM},
            {"role": "user", "content": "Describe a car in a few words as a JSON object."},
        ],
        response_format={"type": "json_object"},
        max_tokens=budget,
        temperature=0,
        **kw,
    )


for budget in (5, 12, 25):
    r = car(budget)
    text, finish = r.choices[0].message.content, r.choices[0].finish_reason
    check(finish == "length" and r.usage.completion_tokens <= budget
          and isinstance(json.loads(text), dict),
          f"max_tokens {budget}: closed within the budget ({r.usage.completion_tokens} tokens): {text!r}")
    chunks = list(car(budget, stream=True))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    last = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    check(streamed == text and last == ["length"], f"max_tokens {budget}: streamed the same {streamed!r}")

# The model wraps some replies in a ```json fence (llama.cpp's grammar allows it): the content is the JSON
# alone, and the streamed deltas add up to the same content.
fence_req = dict(
    model="smol",
    messages=[
        {"role": "system", "content": OBJECT_SYSTEM},
        {"role": "user", "content": "Describe a city in a few words as a JSON object."},
    ],
    response_format={"type": "json_object"},
    max_tokens=MAX_TOKENS,
    temperature=0,
)
r = client.chat.completions.create(**fence_req)
whole = r.choices[0].message.content
streamed = "".join(
    ch.choices[0].delta.content or ""
    for ch in client.chat.completions.create(stream=True, **fence_req)
    if ch.choices
)
check(whole.startswith("{") and whole.endswith("}") and "`" not in whole and streamed == whole,
      f"json_object content is the JSON alone, streamed alike: {whole!r} / {streamed!r}")
t_object = time.time() - t0

# --- llama-server's fields: json_schema and grammar, on /v1/completions and chat ---
r = client.completions.create(
    model="smol",
    prompt="The answer is",
    max_tokens=100,
    temperature=0,
    extra_body={
        "json_schema": {
            "type": "object",
            "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 100}},
            "required": ["n"],
            "additionalProperties": False,
        }
    },
)
v = json.loads(r.choices[0].text)
check(isinstance(v.get("n"), int), f"completions json_schema: {r.choices[0].text!r}")
r = client.completions.create(
    model="smol",
    prompt="Say yes or no:",
    max_tokens=10,
    temperature=0,
    extra_body={"grammar": 'root ::= ("yes" | "no") "."'},
)
check(r.choices[0].text in ("yes.", "no.") and r.choices[0].finish_reason == "stop",
      f"completions GBNF grammar: {r.choices[0].text!r}")
r = client.chat.completions.create(
    model="smol",
    messages=messages("Pick a number."),
    max_tokens=10,
    temperature=0,
    extra_body={"grammar": "root ::= [0-9]{3}"},
)
check(re.fullmatch(r"[0-9]{3}", r.choices[0].message.content) is not None,
      f"chat GBNF grammar: {r.choices[0].message.content!r}")
r = client.chat.completions.create(
    model="smol",
    messages=messages("Pick a letter."),
    max_tokens=10,
    temperature=0,
    response_format={"type": "text"},
)
check(r.choices[0].message.content != "", "response_format text is unconstrained")


# --- errors: 400 with the compiler's message ---
def bad_request(what, **kw):
    try:
        client.chat.completions.create(model="smol", messages=messages("Hi"), max_tokens=5, **kw)
    except openai.BadRequestError as e:
        return e.status_code, e.body.get("message", "") if isinstance(e.body, dict) else str(e.body)
    except Exception as e:
        return None, f"{type(e).__name__}: {e}"
    return 200, ""


status, msg = bad_request("gbnf", extra_body={"grammar": 'root ::= "a" missing-rule'})
check(status == 400 and "Rule 'missing-rule' not found" in msg, f"invalid GBNF grammar → {status}: {msg}")
status, msg = bad_request("gbnf syntax", extra_body={"grammar": 'root ::= ("a" | "b"'})
check(status == 400 and "Expected ')'" in msg, f"GBNF syntax error → {status}: {msg}")
bad_schema = {"type": "object", "properties": {"a": {"type": "strnig"}}}
status, msg = bad_request(
    "schema",
    response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": bad_schema, "strict": True}},
)
check(status == 400 and "strnig" in msg and msg.startswith("invalid json_schema"),
      f"invalid schema → {status}: {msg}")
status, msg = bad_request("type", response_format={"type": "yaml"})
check(status == 400 and "'yaml'" in msg, f"unknown response_format type → {status}: {msg}")

print(f"time: parse {t_parse:.1f} s, stream {t_stream:.1f} s, json_object {t_object:.1f} s", flush=True)
if failures:
    print(f"{len(failures)} FAILED:\n" + "\n".join(failures))
    sys.exit(1)
print("ALL OK")

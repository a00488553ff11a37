-- Schema of the supervisor's SQLite database (issue 6). Timestamps are Unix milliseconds (INTEGER).

-- The catalogue: one row per GGUF file in MODELS_DIR (or downloaded into it).
CREATE TABLE models (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    name            TEXT    NOT NULL UNIQUE,
    file_path       TEXT    NOT NULL UNIQUE,
    size_bytes      INTEGER NOT NULL,
    sha256          TEXT,
    architecture    TEXT,
    parameters      INTEGER,
    quantization    TEXT,
    context_length  INTEGER,
    -- layer count and K/V width, for the KV-cache part of the memory estimate
    n_layer         INTEGER,
    n_embd_kv       INTEGER,
    embedding       INTEGER NOT NULL DEFAULT 0,
    hf_repo_id      TEXT,
    hf_filename     TEXT,
    -- per-model settings (NULL = the global default)
    ctx_size        INTEGER,
    threads         INTEGER,
    parallel        INTEGER,
    gpu_layers      INTEGER,
    idle_timeout    INTEGER,
    pinned          INTEGER NOT NULL DEFAULT 0,
    enabled         INTEGER NOT NULL DEFAULT 1,
    -- default sampling fields (informational for clients; NULL = the worker's default)
    temperature     REAL,
    top_p           REAL,
    top_k           INTEGER,
    max_tokens      INTEGER,
    -- largest resident set size measured for this model's worker (bytes)
    peak_rss_bytes  INTEGER,
    created_at      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL,
    last_used_at    INTEGER
);

-- One row per worker process started; the mirror of the in-memory state machine.
CREATE TABLE model_sessions (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    model_id        INTEGER NOT NULL REFERENCES models(id) ON DELETE CASCADE,
    pid             INTEGER,
    port            INTEGER NOT NULL,
    instance        TEXT    NOT NULL,
    status          TEXT    NOT NULL,
    started_at      INTEGER NOT NULL,
    ready_at        INTEGER,
    stopped_at      INTEGER,
    stop_reason     TEXT,
    peak_rss_bytes  INTEGER
);
CREATE INDEX model_sessions_status ON model_sessions(status);

-- Database overrides of settings (applied live where they can be).
CREATE TABLE configurations (
    key        TEXT PRIMARY KEY,
    value      TEXT NOT NULL,
    updated_at INTEGER NOT NULL
);

CREATE TABLE users (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    username      TEXT NOT NULL UNIQUE,
    password_hash TEXT NOT NULL,
    created_at    INTEGER NOT NULL,
    updated_at    INTEGER NOT NULL
);

CREATE TABLE api_keys (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    name         TEXT NOT NULL,
    key_hash     TEXT NOT NULL UNIQUE,
    prefix       TEXT NOT NULL,
    scopes       TEXT NOT NULL DEFAULT 'inference',
    created_at   INTEGER NOT NULL,
    last_used_at INTEGER,
    revoked_at   INTEGER
);

-- One row per proxied request.
CREATE TABLE requests (
    id                INTEGER PRIMARY KEY AUTOINCREMENT,
    model             TEXT    NOT NULL,
    endpoint          TEXT    NOT NULL,
    status            INTEGER NOT NULL,
    prompt_tokens     INTEGER,
    completion_tokens INTEGER,
    duration_ms       INTEGER NOT NULL,
    api_key_id        INTEGER,
    created_at        INTEGER NOT NULL
);
CREATE INDEX requests_created ON requests(created_at);
CREATE INDEX requests_model ON requests(model);

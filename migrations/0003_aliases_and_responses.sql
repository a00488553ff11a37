-- Other names of catalogue models (Ollama's /api/copy, and the hf.co/{owner}/{repo}:{quant} name a model
-- pulled through /api/pull was asked for). They go with their model.
CREATE TABLE model_aliases (
    alias      TEXT    PRIMARY KEY,
    model_id   INTEGER NOT NULL REFERENCES models(id) ON DELETE CASCADE,
    created_at INTEGER NOT NULL
);
CREATE INDEX model_aliases_model ON model_aliases(model_id);

-- Responses of OpenAI's Responses API kept for `previous_response_id` and GET/DELETE /v1/responses/{id}:
-- the response object and the whole conversation up to and including it (our chat messages, JSON).
-- Rows older than the retention are removed as new ones come.
CREATE TABLE responses (
    id         TEXT    PRIMARY KEY,
    model      TEXT    NOT NULL,
    messages   TEXT    NOT NULL,
    response   TEXT    NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE INDEX responses_created ON responses(created_at);

-- Other names of catalogue models (Ollama's /api/copy, and the hf.co/{owner}/{repo}:{quant} name a model
-- pulled through /api/pull was asked for). They go with their model.
CREATE TABLE model_aliases (
    alias      TEXT    PRIMARY KEY,
    model_id   INTEGER NOT NULL REFERENCES models(id) ON DELETE CASCADE,
    created_at INTEGER NOT NULL
);
CREATE INDEX model_aliases_model ON model_aliases(model_id);

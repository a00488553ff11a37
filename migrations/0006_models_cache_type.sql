-- A model's KV cache element types (issue 18): the worker's -ctk/-ctv (f16, q8_0, q4_0, ...). NULL = f16,
-- the worker's default. The supervisor's memory estimate follows them.
ALTER TABLE models ADD COLUMN cache_type_k TEXT;
ALTER TABLE models ADD COLUMN cache_type_v TEXT;
-- A reranker (issue 18): an encoder whose pooling type is rank (4); its worker gets --reranking and
-- serves /v1/rerank. Set by the catalogue scan.
ALTER TABLE models ADD COLUMN reranking BOOLEAN NOT NULL DEFAULT 0;

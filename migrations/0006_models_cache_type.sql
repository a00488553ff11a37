-- A model's KV cache element types (issue 18): the worker's -ctk/-ctv (f16, q8_0, q4_0, ...). NULL = f16,
-- the worker's default. The supervisor's memory estimate follows them.
ALTER TABLE models ADD COLUMN cache_type_k TEXT;
ALTER TABLE models ADD COLUMN cache_type_v TEXT;

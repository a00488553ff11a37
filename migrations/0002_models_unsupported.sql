-- Why the engine cannot run a catalogued file (its loader's own error: architecture, a missing key or tensor,
-- a tensor type without a kernel, the tokenizer), found at scan time; NULL when it can run.
ALTER TABLE models ADD COLUMN unsupported_reason TEXT;

-- A model's default system prompt (issue 17): put first in chats that have no system message, like
-- Ollama's Modelfile SYSTEM. NULL = none.
ALTER TABLE models ADD COLUMN system_prompt TEXT;

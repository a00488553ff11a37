//! OpenAI wire types (serde) and the error envelope, shared by the worker and the supervisor.

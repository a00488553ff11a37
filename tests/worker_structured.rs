//! Structured output end to end (issue 16 acceptance): the real worker binary on SmolLM2 Q4_1, driven by
//! the official `openai` Python package (`tests/py/test_worker_structured.py`): pydantic `parse()` on 20
//! schemas streamed and not, 20/20 `json_object` replies, llama-server's `json_schema` / `grammar`
//! fields, and 400s quoting the grammar compiler.

mod support;

use support::assets::{SMOL_Q4_1 as MODEL, model};
use support::python::run_client_script;
use support::worker::Worker;

#[test]
fn openai_client_gets_schema_valid_replies_and_compiler_errors() {
    let w = Worker::start(&model(MODEL), &["-np", "4", "-c", "4096", "-a", "smol"]);
    run_client_script("test_worker_structured.py", &[&w.base], || w.stderr());
}

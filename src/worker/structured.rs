//! Structured output at the HTTP edge: the request's `response_format` / `json_schema` / `grammar` fields
//! to a [`GrammarSpec`], and its compilation into a [`Constraint`] before the request is queued — on a
//! blocking thread, so a large schema never stalls the async runtime, and before any slot is taken, so a
//! grammar that does not compile is a 400 quoting the compiler and costs the scheduler nothing.

use super::backend::Codec;
use super::error::ApiError;
use crate::engine::constraint::{Constraint, ConstraintError, GrammarSpec};
use crate::openai::StructuredFields;

/// The constraint the fields ask for, following llama-server (`oaicompat_chat_params_parse`, commit
/// 0c1e570): `response_format` `text` (or absent) = none; `json_object` = any object, or llama-server's
/// `schema` when given; `json_schema` = its `json_schema.schema` (absent = any JSON value) with its
/// `strict`; `json_schema` (the field; compiled leniently, as llama.cpp's converter ignores keywords it
/// does not know) and `grammar` (GBNF or Lark; empty = none).
///
/// Errors: [`ApiError::BadRequest`] for an unknown `response_format.type` or more than one constraint.
pub fn grammar_spec(f: &StructuredFields) -> Result<Option<GrammarSpec>, ApiError> {
    let mut found: Vec<(&'static str, GrammarSpec)> = Vec::new();
    if let Some(rf) = &f.response_format {
        match rf.kind.as_str() {
            "text" => {}
            "json_object" => found.push((
                "response_format",
                match &rf.schema {
                    Some(schema) => GrammarSpec::JsonSchema {
                        schema: schema.clone(),
                        strict: false,
                    },
                    None => GrammarSpec::JsonObject,
                },
            )),
            "json_schema" => {
                let js = rf.json_schema.clone().unwrap_or_default();
                found.push((
                    "response_format",
                    GrammarSpec::JsonSchema {
                        schema: js
                            .schema
                            .or_else(|| rf.schema.clone())
                            .unwrap_or_else(|| serde_json::json!({})),
                        strict: js.strict.unwrap_or(false),
                    },
                ));
            }
            other => {
                return Err(ApiError::bad(
                    format!(
                        "response_format.type must be one of 'text', 'json_object' or 'json_schema', \
                         got '{other}'"
                    ),
                    Some("response_format"),
                ));
            }
        }
    }
    if let Some(schema) = &f.json_schema {
        found.push((
            "json_schema",
            GrammarSpec::JsonSchema {
                schema: schema.clone(),
                strict: false,
            },
        ));
    }
    if let Some(g) = f.grammar.as_ref().filter(|g| !g.trim().is_empty()) {
        found.push(("grammar", GrammarSpec::Gbnf(g.clone())));
    }
    if found.len() > 1 {
        let names: Vec<&str> = found.iter().map(|(n, _)| *n).collect();
        return Err(ApiError::bad(
            format!(
                "only one of 'response_format' (json), 'json_schema' and 'grammar' may be given, got {}",
                names.join(" and ")
            ),
            Some(found[1].0),
        ));
    }
    Ok(found.pop().map(|(_, g)| g))
}

/// The request field a spec of this kind came from, for the error's `param`.
fn param_of(spec: &GrammarSpec) -> &'static str {
    match spec {
        GrammarSpec::Gbnf(_) | GrammarSpec::Lark(_) | GrammarSpec::Regex(_) => "grammar",
        GrammarSpec::JsonObject | GrammarSpec::JsonSchema { .. } => "response_format",
        GrammarSpec::ChatReply(inner) => param_of(inner),
    }
}

/// Compiles `spec` for the model of `codec` on a blocking thread.
///
/// Errors: [`ApiError::BadRequest`] (code `invalid_grammar`) with the compiler's message when it does
/// not compile, or when the model offers no constrained decoding; [`ApiError::Internal`] when the
/// blocking task failed.
pub async fn compile(
    codec: &std::sync::Arc<dyn Codec>,
    spec: GrammarSpec,
) -> Result<Constraint, ApiError> {
    let param = param_of(&spec);
    let Some(compiler) = codec.grammar_compiler() else {
        return Err(ApiError::bad(
            "this model offers no constrained decoding (no grammar token environment)",
            Some(param),
        ));
    };
    let compiler = compiler.clone();
    let r = tokio::task::spawn_blocking(move || compiler.compile(&spec))
        .await
        .map_err(|e| ApiError::Internal(format!("grammar compilation task: {e}")))?;
    r.map_err(|e| match e {
        ConstraintError::Compile { .. } => ApiError::BadRequest {
            message: e.to_string(),
            param: Some(param),
            code: Some("invalid_grammar"),
        },
        other => ApiError::Internal(other.to_string()),
    })
}

/// [`grammar_spec`] then [`compile`]: the constraint of a request, `None` when it asks for none.
///
/// Errors: as both.
pub async fn constraint_of(
    codec: &std::sync::Arc<dyn Codec>,
    f: &StructuredFields,
) -> Result<Option<Constraint>, ApiError> {
    match grammar_spec(f)? {
        Some(spec) => Ok(Some(compile(codec, spec).await?)),
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::openai::{JsonSchemaFormat, ResponseFormat};
    use serde_json::json;

    fn rf(kind: &str) -> ResponseFormat {
        ResponseFormat {
            kind: kind.into(),
            json_schema: None,
            schema: None,
        }
    }

    #[test]
    fn fields_map_to_specs() {
        let none = StructuredFields::default();
        assert_eq!(grammar_spec(&none).unwrap(), None);
        let text = StructuredFields {
            response_format: Some(rf("text")),
            ..Default::default()
        };
        assert_eq!(grammar_spec(&text).unwrap(), None);
        let obj = StructuredFields {
            response_format: Some(rf("json_object")),
            ..Default::default()
        };
        assert_eq!(grammar_spec(&obj).unwrap(), Some(GrammarSpec::JsonObject));
        let mut with_schema = rf("json_schema");
        with_schema.json_schema = Some(JsonSchemaFormat {
            name: Some("x".into()),
            schema: Some(json!({"type": "integer"})),
            strict: Some(true),
            ..Default::default()
        });
        let js = StructuredFields {
            response_format: Some(with_schema),
            ..Default::default()
        };
        assert_eq!(
            grammar_spec(&js).unwrap(),
            Some(GrammarSpec::JsonSchema {
                schema: json!({"type": "integer"}),
                strict: true
            })
        );
        let g = StructuredFields {
            grammar: Some("root ::= \"a\"".into()),
            ..Default::default()
        };
        assert_eq!(
            grammar_spec(&g).unwrap(),
            Some(GrammarSpec::Gbnf("root ::= \"a\"".into()))
        );
        let empty = StructuredFields {
            grammar: Some(String::new()),
            ..Default::default()
        };
        assert_eq!(grammar_spec(&empty).unwrap(), None);
    }

    #[test]
    fn unknown_type_and_two_constraints_are_400() {
        let bad = StructuredFields {
            response_format: Some(rf("yaml")),
            ..Default::default()
        };
        let e = grammar_spec(&bad).unwrap_err();
        assert!(e.to_string().contains("'yaml'"), "{e}");
        assert_eq!(e.envelope().0.as_u16(), 400);
        let two = StructuredFields {
            json_schema: Some(json!({})),
            grammar: Some("root ::= \"a\"".into()),
            ..Default::default()
        };
        let e = grammar_spec(&two).unwrap_err();
        assert!(e.to_string().contains("json_schema and grammar"), "{e}");
    }
}

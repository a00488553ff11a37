//! The minijinja environment that chat templates run in, configured to behave like llama.cpp's own
//! Jinja engine (`common/jinja/`, llama.cpp commit 0c1e570) and HF transformers: Python string and dict
//! methods, `raise_exception`, `strftime_now`, llama.cpp's `tojson`, Python-style printing of values,
//! `trim_blocks`/`lstrip_blocks`, chainable undefined values and the `{% generation %}` tag.

use minijinja::value::{Kwargs, ValueKind};
use minijinja::{Environment, Error, ErrorKind, State, UndefinedBehavior, Value};
use time::OffsetDateTime;

/// Name of the hidden global that carries the render's "now" (Unix seconds) to `strftime_now`.
pub(crate) const NOW_VAR: &str = "__cyber_inference_now";

/// Instructions one rendering may execute before it fails with "engine ran out of fuel".
pub(crate) const FUEL: u64 = 50_000_000;

/// Most bytes one rendering may output (64 MiB, the largest request body either server accepts): a
/// template is stopped with an error naming this cap as soon as its output passes it, so a template
/// that loops within its fuel (tens of millions of instructions, each of which may print a string)
/// cannot make a prompt of gigabytes. Any prompt that could fit a context is far smaller.
pub(crate) const MAX_OUTPUT_BYTES: usize = 64 << 20;

/// Name under which the template is stored in its environment.
pub(crate) const TEMPLATE_NAME: &str = "chat_template";

/// Prefix llama.cpp puts before the text of `raise_exception` (`common/jinja/value.cpp`).
pub(crate) const RAISE_PREFIX: &str = "Jinja Exception: ";

/// Rewrites the source as llama.cpp's lexer sees it: `\r\n` and `\r` become `\n`, and the
/// transformers-only `{% generation %}` / `{% endgeneration %}` tags (which llama.cpp parses and
/// ignores) become an always-true `if` block so that their whitespace control still applies.
pub(crate) fn preprocess_source(source: &str) -> String {
    let src = source.replace("\r\n", "\n").replace('\r', "\n");
    let mut out = String::with_capacity(src.len());
    let mut rest = src.as_str();
    while let Some(start) = rest.find("{%") {
        out.push_str(&rest[..start]);
        let tag = &rest[start..];
        let Some(end) = tag.find("%}") else {
            out.push_str(tag);
            rest = "";
            break;
        };
        let inner = &tag[2..end];
        let (lead, body) = match inner.strip_prefix(['-', '+']) {
            Some(b) => (&inner[..1], b),
            None => ("", inner),
        };
        let (body, trail) = match body.strip_suffix(['-', '+']) {
            Some(b) => (b, &body[body.len() - 1..]),
            None => (body, ""),
        };
        let replacement = match body.trim() {
            "generation" => Some("if true"),
            "endgeneration" => Some("endif"),
            _ => None,
        };
        match replacement {
            Some(r) => {
                out.push_str("{%");
                out.push_str(lead);
                out.push(' ');
                out.push_str(r);
                out.push(' ');
                out.push_str(trail);
                out.push_str("%}");
            }
            None => out.push_str(&tag[..end + 2]),
        }
        rest = &tag[end + 2..];
    }
    out.push_str(rest);
    out
}

/// Builds the environment holding the (preprocessed) template `source` under [`TEMPLATE_NAME`].
///
/// Errors: the minijinja syntax error, with line information.
pub(crate) fn build_env(source: &str) -> Result<Environment<'static>, Error> {
    let mut env = Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_keep_trailing_newline(false);
    env.set_undefined_behavior(UndefinedBehavior::Chainable);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.set_auto_escape_callback(|_| minijinja::AutoEscape::None);
    // Templates come from model files: bound the work one rendering may do (real templates use
    // well under 1% of this) so that a hostile template cannot spin forever.
    env.set_fuel(Some(FUEL));
    env.set_formatter(|out, _state, value| {
        out.write_str(&py_str(value))
            .map_err(|e| Error::new(ErrorKind::WriteFailure, e.to_string()))
    });
    env.add_function("raise_exception", raise_exception);
    env.add_function("strftime_now", strftime_now);
    env.add_filter("tojson", tojson);
    env.add_filter("length", length);
    env.add_filter("count", length);
    env.add_template_owned(TEMPLATE_NAME, preprocess_source(source))?;
    Ok(env)
}

/// A writer that keeps at most `max` bytes and fails (setting `over`) on the write that would pass it.
struct CappedWriter {
    out: Vec<u8>,
    max: usize,
    over: bool,
}

impl std::io::Write for CappedWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.out.len() + buf.len() > self.max {
            self.over = true;
            return Err(std::io::Error::other("output limit reached"));
        }
        self.out.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Renders the template [`TEMPLATE_NAME`] of `env` with `ctx`, its output capped at
/// [`MAX_OUTPUT_BYTES`]: every rendering of a chat template goes through here.
///
/// Errors: the template's own error; an [`ErrorKind::InvalidOperation`] error naming the cap when the
/// output would pass it (the rendering stops there).
pub(crate) fn render_capped<S: serde::Serialize>(
    env: &Environment<'_>,
    ctx: S,
) -> Result<String, Error> {
    render_capped_at(env, ctx, MAX_OUTPUT_BYTES)
}

fn render_capped_at<S: serde::Serialize>(
    env: &Environment<'_>,
    ctx: S,
    max: usize,
) -> Result<String, Error> {
    let mut w = CappedWriter {
        out: Vec::new(),
        max,
        over: false,
    };
    let r = env
        .get_template(TEMPLATE_NAME)
        .and_then(|t| t.render_captured_to(ctx, &mut w).map(|_| ()));
    if w.over {
        return Err(Error::new(
            ErrorKind::InvalidOperation,
            format!(
                "the chat template's output is larger than the limit of {} MiB ({max} bytes)",
                max >> 20
            ),
        ));
    }
    r?;
    // minijinja writes only `str`s.
    String::from_utf8(w.out).map_err(|e| Error::new(ErrorKind::WriteFailure, e.to_string()))
}

/// `length` that, like Jinja2 and llama.cpp, gives 0 for undefined and none.
fn length(value: Value) -> Result<Value, Error> {
    if value.is_undefined() || value.is_none() {
        return Ok(Value::from(0));
    }
    match value.len() {
        Some(n) => Ok(Value::from(n)),
        None => match value.as_str() {
            Some(s) => Ok(Value::from(s.chars().count())),
            None => Err(Error::new(
                ErrorKind::InvalidOperation,
                format!("cannot calculate length of value of type {}", value.kind()),
            )),
        },
    }
}

fn raise_exception(msg: String) -> Result<Value, Error> {
    Err(Error::new(
        ErrorKind::InvalidOperation,
        format!("{RAISE_PREFIX}{msg}"),
    ))
}

fn strftime_now(state: &State, format: String) -> Result<Value, Error> {
    let now = state
        .lookup(NOW_VAR)
        .and_then(|v| i64::try_from(v).ok())
        .unwrap_or_else(|| OffsetDateTime::now_utc().unix_timestamp());
    let t = OffsetDateTime::from_unix_timestamp(now).map_err(|e| {
        Error::new(
            ErrorKind::InvalidOperation,
            format!("strftime_now: bad time: {e}"),
        )
    })?;
    Ok(Value::from(strftime(&t, &format)))
}

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const WEEKDAYS: [&str; 7] = [
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
];

/// C/Python `strftime` for a UTC time: the directives of POSIX plus glibc's `%-x` (no padding).
/// Unknown directives are copied through unchanged.
pub(crate) fn strftime(t: &OffsetDateTime, format: &str) -> String {
    let mut out = String::new();
    let mut chars = format.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let no_pad = chars.peek() == Some(&'-');
        if no_pad {
            chars.next();
        }
        let Some(d) = chars.next() else {
            out.push('%');
            break;
        };
        let num = |n: i64, width: usize| -> String {
            if no_pad {
                n.to_string()
            } else {
                format!("{n:0width$}")
            }
        };
        let month = usize::from(u8::from(t.month())) - 1;
        let wd = usize::from(t.weekday().number_days_from_monday());
        let hour12 = match t.hour() % 12 {
            0 => 12,
            h => h,
        };
        match d {
            'Y' => out.push_str(&t.year().to_string()),
            'y' => out.push_str(&num(i64::from(t.year().rem_euclid(100)), 2)),
            'C' => out.push_str(&num(i64::from(t.year().div_euclid(100)), 2)),
            'm' => out.push_str(&num(month as i64 + 1, 2)),
            'd' => out.push_str(&num(i64::from(t.day()), 2)),
            'e' => {
                if no_pad {
                    out.push_str(&t.day().to_string());
                } else {
                    out.push_str(&format!("{:>2}", t.day()));
                }
            }
            'H' => out.push_str(&num(i64::from(t.hour()), 2)),
            'I' => out.push_str(&num(i64::from(hour12), 2)),
            'M' => out.push_str(&num(i64::from(t.minute()), 2)),
            'S' => out.push_str(&num(i64::from(t.second()), 2)),
            'j' => out.push_str(&num(i64::from(t.ordinal()), 3)),
            'p' => out.push_str(if t.hour() < 12 { "AM" } else { "PM" }),
            'B' => out.push_str(MONTHS[month]),
            'b' | 'h' => out.push_str(&MONTHS[month][..3]),
            'A' => out.push_str(WEEKDAYS[wd]),
            'a' => out.push_str(&WEEKDAYS[wd][..3]),
            'u' => out.push_str(&(wd + 1).to_string()),
            'w' => out.push_str(&((wd + 1) % 7).to_string()),
            'Z' => out.push_str("UTC"),
            'z' => out.push_str("+0000"),
            'D' => out.push_str(&strftime(t, "%m/%d/%y")),
            'F' => out.push_str(&strftime(t, "%Y-%m-%d")),
            'T' => out.push_str(&strftime(t, "%H:%M:%S")),
            'R' => out.push_str(&strftime(t, "%H:%M")),
            'c' => out.push_str(&strftime(t, "%a %b %e %H:%M:%S %Y")),
            'x' => out.push_str(&strftime(t, "%m/%d/%y")),
            'X' => out.push_str(&strftime(t, "%H:%M:%S")),
            's' => out.push_str(&t.unix_timestamp().to_string()),
            'n' => out.push('\n'),
            't' => out.push('\t'),
            '%' => out.push('%'),
            other => {
                out.push('%');
                if no_pad {
                    out.push('-');
                }
                out.push(other);
            }
        }
    }
    out
}

/// `tojson(indent=None, ensure_ascii=False, separators=None)` as llama.cpp's `tojson`
/// (`common/jinja/value.cpp`): keys in insertion order, item separator `", "` (`","` with an
/// indent), key separator `": "`.
fn tojson(value: Value, args: &[Value], kwargs: Kwargs) -> Result<Value, Error> {
    let positional = |i: usize| args.get(i).cloned();
    let ensure_ascii = kwargs
        .get::<Option<Value>>("ensure_ascii")?
        .or_else(|| positional(0))
        .is_some_and(|v| v.is_true());
    let indent_v = kwargs
        .get::<Option<Value>>("indent")?
        .or_else(|| positional(1));
    let separators = kwargs
        .get::<Option<Value>>("separators")?
        .or_else(|| positional(2));
    let sort_keys = kwargs
        .get::<Option<Value>>("sort_keys")?
        .or_else(|| positional(3))
        .is_some_and(|v| v.is_true());
    kwargs.assert_all_used()?;
    let indent = match indent_v {
        Some(v) if v.kind() == ValueKind::Number => i64::try_from(v).unwrap_or(-1),
        _ => -1,
    };
    let mut item_sep = if indent < 0 { ", " } else { "," }.to_string();
    let mut key_sep = ": ".to_string();
    if let Some(seps) = separators
        && seps.kind() == ValueKind::Seq
    {
        if let Ok(s) = seps.get_item_by_index(0)
            && !s.is_undefined()
        {
            item_sep = py_str(&s);
        }
        if let Ok(s) = seps.get_item_by_index(1)
            && !s.is_undefined()
        {
            key_sep = py_str(&s);
        }
    }
    let opts = JsonOpts {
        indent,
        item_sep,
        key_sep,
        sort_keys,
    };
    let mut out = String::new();
    to_json(&mut out, &value, 0, &opts)?;
    if ensure_ascii {
        out = ensure_ascii_str(&out);
    }
    Ok(Value::from(out))
}

struct JsonOpts {
    indent: i64,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
}

fn ensure_ascii_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c.is_ascii() {
            out.push(c);
        } else {
            let mut buf = [0u16; 2];
            for unit in c.encode_utf16(&mut buf) {
                out.push_str(&format!("\\u{unit:04x}"));
            }
        }
    }
    out
}

/// Writes `s` as a JSON string literal (llama.cpp's escaping: `"`, `\`, `\b\f\n\r\t`, other
/// control characters as `\u00XX`; everything else raw).
pub(crate) fn json_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

fn map_entries(value: &Value, sort: bool) -> Result<Vec<(Value, Value)>, Error> {
    let mut entries = Vec::new();
    for key in value.try_iter()? {
        let v = value.get_item(&key)?;
        entries.push((key, v));
    }
    if sort {
        entries.sort_by(|a, b| a.0.cmp(&b.0));
    }
    Ok(entries)
}

fn to_json(out: &mut String, value: &Value, level: i64, o: &JsonOpts) -> Result<(), Error> {
    let indent_str = |lvl: i64| -> String {
        if o.indent > 0 {
            " ".repeat((lvl * o.indent) as usize)
        } else {
            String::new()
        }
    };
    let newline = if o.indent >= 0 { "\n" } else { "" };
    match value.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number => out.push_str(&number_json(value)),
        ValueKind::String => json_string(out, value.as_str().unwrap_or_default()),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = value.try_iter()?.collect();
            out.push('[');
            if !items.is_empty() {
                out.push_str(newline);
                for (i, item) in items.iter().enumerate() {
                    out.push_str(&indent_str(level + 1));
                    to_json(out, item, level + 1, o)?;
                    if i + 1 < items.len() {
                        out.push_str(&o.item_sep);
                    }
                    out.push_str(newline);
                }
                out.push_str(&indent_str(level));
            }
            out.push(']');
        }
        ValueKind::Map => {
            let entries = map_entries(value, o.sort_keys)?;
            out.push('{');
            if !entries.is_empty() {
                out.push_str(newline);
                for (i, (k, v)) in entries.iter().enumerate() {
                    out.push_str(&indent_str(level + 1));
                    json_string(out, &py_str(k));
                    out.push_str(&o.key_sep);
                    to_json(out, v, level + 1, o)?;
                    if i + 1 < entries.len() {
                        out.push_str(&o.item_sep);
                    }
                    out.push_str(newline);
                }
                out.push_str(&indent_str(level));
            }
            out.push('}');
        }
        _ => json_string(out, &value.to_string()),
    }
    Ok(())
}

/// A number as C++ `ostream << double` writes it (llama.cpp's `tojson`): integers as they are,
/// floats in `%g` with 6 significant digits.
fn number_json(value: &Value) -> String {
    if let Ok(i) = i64::try_from(value.clone())
        && !is_float(value)
    {
        return i.to_string();
    }
    let f = f64::try_from(value.clone()).unwrap_or(f64::NAN);
    format_g(f, 6)
}

fn is_float(value: &Value) -> bool {
    // minijinja keeps the float/int distinction in the value's debug representation.
    value.kind() == ValueKind::Number && value.to_string().contains(['.', 'e', 'E', 'n', 'N'])
}

/// C's `%.{prec}g`.
pub(crate) fn format_g(f: f64, prec: usize) -> String {
    if f.is_nan() {
        return "nan".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "inf".into() } else { "-inf".into() };
    }
    if f == 0.0 {
        return if f.is_sign_negative() { "-0" } else { "0" }.into();
    }
    let prec = prec.max(1);
    let sci = format!("{:.*e}", prec - 1, f);
    let (mant, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    if exp < -4 || exp >= prec as i32 {
        let mant = strip_zeros(mant);
        let sign = if exp < 0 { '-' } else { '+' };
        format!("{mant}e{sign}{:02}", exp.abs())
    } else {
        let decimals = (prec as i32 - 1 - exp).max(0) as usize;
        strip_zeros(&format!("{f:.decimals$}")).to_string()
    }
}

fn strip_zeros(s: &str) -> &str {
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.')
    } else {
        s
    }
}

/// A value as llama.cpp prints it (`as_string`): strings raw, `True`/`False`, `None`, floats as
/// `%f` without trailing zeros, lists and dicts in Python repr.
pub(crate) fn py_str(value: &Value) -> String {
    match value.kind() {
        ValueKind::String => value.as_str().unwrap_or_default().to_string(),
        ValueKind::Undefined => String::new(),
        _ => py_repr(value),
    }
}

/// Python-style repr of a value, as llama.cpp's `value_to_string_repr`.
pub(crate) fn py_repr(value: &Value) -> String {
    match value.kind() {
        ValueKind::Undefined => String::new(),
        ValueKind::None => "None".into(),
        ValueKind::Bool => if value.is_true() { "True" } else { "False" }.into(),
        ValueKind::Number => {
            if is_float(value) {
                let f = f64::try_from(value.clone()).unwrap_or(f64::NAN);
                let s = format!("{f:.6}");
                let s = s.trim_end_matches('0');
                if s.ends_with('.') {
                    format!("{s}0")
                } else {
                    s.to_string()
                }
            } else {
                value.to_string()
            }
        }
        ValueKind::String => {
            let s = value.as_str().unwrap_or_default();
            if s.contains('\'') {
                let mut out = String::new();
                json_string(&mut out, s);
                out
            } else {
                format!("'{s}'")
            }
        }
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<String> = match value.try_iter() {
                Ok(it) => it.map(|v| py_repr(&v)).collect(),
                Err(_) => return value.to_string(),
            };
            format!("[{}]", items.join(", "))
        }
        ValueKind::Map => match map_entries(value, false) {
            Ok(entries) => {
                let items: Vec<String> = entries
                    .iter()
                    .map(|(k, v)| format!("{}: {}", py_repr(k), py_repr(v)))
                    .collect();
                format!("{{{}}}", items.join(", "))
            }
            Err(_) => value.to_string(),
        },
        _ => value.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(src: &str, ctx: Value) -> String {
        let env = build_env(src).unwrap();
        env.get_template(TEMPLATE_NAME)
            .unwrap()
            .render(ctx)
            .unwrap()
    }

    #[test]
    fn generation_tag_is_transparent_and_keeps_whitespace_control() {
        let src = preprocess_source("a {%- generation -%} b {%- endgeneration %}c");
        assert_eq!(src, "a {%- if true -%} b {%- endif %}c");
        assert_eq!(
            render(
                "{% generation %}x{% endgeneration %}\n{{ 1 }}",
                Value::UNDEFINED
            ),
            "x1"
        );
    }

    #[test]
    fn tojson_matches_llama_cpp_layout() {
        let v = Value::from_serialize(serde_json::json!({"b": [1, "é\n"], "a": {}}));
        let ctx = minijinja::context! { v => v };
        assert_eq!(
            render("{{ v | tojson }}", ctx.clone()),
            r#"{"b": [1, "é\n"], "a": {}}"#
        );
        assert_eq!(
            render("{{ v | tojson(indent=2) }}", ctx.clone()),
            "{\n  \"b\": [\n    1,\n    \"é\\n\"\n  ],\n  \"a\": {}\n}"
        );
        assert_eq!(
            render("{{ v | tojson(ensure_ascii=true) }}", ctx),
            r#"{"b": [1, "\u00e9\n"], "a": {}}"#
        );
    }

    #[test]
    fn values_print_like_python() {
        let ctx = minijinja::context! { l => vec![Value::from("a'b"), Value::from(true), Value::from(())] };
        assert_eq!(
            render("{{ l }} {{ 1.5 }} {{ none }}", ctx),
            "[\"a'b\", True, None] 1.5 None"
        );
    }

    #[test]
    fn raise_exception_carries_the_message() {
        let env = build_env("{{ raise_exception('no system role') }}").unwrap();
        let err = env
            .get_template(TEMPLATE_NAME)
            .unwrap()
            .render(())
            .unwrap_err();
        assert!(
            err.to_string().contains("Jinja Exception: no system role"),
            "{err}"
        );
    }

    #[test]
    fn strftime_formats_a_fixed_time() {
        // 2026-11-23 12:34:56 UTC, a Monday
        let t = OffsetDateTime::from_unix_timestamp(1_795_437_296).unwrap();
        assert_eq!(strftime(&t, "%d %b %Y"), "23 Nov 2026");
        assert_eq!(
            strftime(&t, "%A %B %-d, %H:%M:%S %%"),
            "Monday November 23, 12:34:56 %"
        );
    }

    #[test]
    fn endless_templates_run_out_of_fuel() {
        let env = build_env(
            "{% for i in range(100000) %}{% for j in range(100000) %}{% for k in range(100000) %}x{% endfor %}{% endfor %}{% endfor %}",
        )
        .unwrap();
        let err = env
            .get_template(TEMPLATE_NAME)
            .unwrap()
            .render(())
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::OutOfFuel, "{err}");
    }

    #[test]
    fn a_template_that_prints_too_much_is_stopped_at_the_cap() {
        // 2 million iterations of 64 bytes: 128 MiB of output within the fuel limit (nested loops:
        // one `range` may have at most 100 000 elements).
        let env = build_env(&format!(
            "{{% for i in range(2000) %}}{{% for j in range(1000) %}}{}{{% endfor %}}{{% endfor %}}",
            "x".repeat(64)
        ))
        .unwrap();
        let t0 = std::time::Instant::now();
        let err = render_capped(&env, ()).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidOperation, "{err}");
        let msg = err.to_string();
        assert!(
            msg.contains("larger than the limit of 64 MiB") && msg.contains("67108864 bytes"),
            "{msg}"
        );
        eprintln!("stopped after {:?}", t0.elapsed());
        // Under the cap the output is returned whole.
        let env = build_env("{% for i in range(1000) %}ab{% endfor %}").unwrap();
        assert_eq!(render_capped(&env, ()).unwrap(), "ab".repeat(1000));
        assert_eq!(render_capped_at(&env, (), 2000).unwrap().len(), 2000);
        assert!(render_capped_at(&env, (), 1999).is_err());
    }

    #[test]
    fn format_g_matches_c() {
        assert_eq!(format_g(1.0, 6), "1");
        assert_eq!(format_g(0.1, 6), "0.1");
        assert_eq!(format_g(1.23456789, 6), "1.23457");
        assert_eq!(format_g(1e20, 6), "1e+20");
        assert_eq!(format_g(1.5e-5, 6), "1.5e-05");
    }
}

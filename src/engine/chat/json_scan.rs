//! A JSON scanner over text that may stop part-way (a model's reply while it is being generated):
//! it finds where a value ends, or says that the text ran out first, without building the value.
//! The tool-call parsers need the exact byte range of `arguments` (so streamed fragments and the
//! final string agree) and must tell "not finished yet" from "not JSON" — serde_json does neither.

/// What scanning a value from some offset found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Scan {
    /// A complete value ends at this byte offset (exclusive).
    Done(usize),
    /// The text ended inside the value (it may still become valid).
    Partial,
    /// Not JSON.
    Bad,
}

/// Offset of the first non-whitespace byte at or after `i`.
pub(crate) fn skip_ws(s: &str, mut i: usize) -> usize {
    let b = s.as_bytes();
    while i < b.len() && matches!(b[i], b' ' | b'\t' | b'\n' | b'\r') {
        i += 1;
    }
    i
}

/// Scans one JSON value starting at `i` (leading whitespace allowed).
pub(crate) fn scan_value(s: &str, i: usize) -> Scan {
    let b = s.as_bytes();
    let i = skip_ws(s, i);
    if i >= b.len() {
        return Scan::Partial;
    }
    match b[i] {
        b'"' => scan_string(s, i),
        b'{' => scan_container(s, i, b'}'),
        b'[' => scan_container(s, i, b']'),
        b't' => scan_literal(s, i, "true"),
        b'f' => scan_literal(s, i, "false"),
        b'n' => scan_literal(s, i, "null"),
        b'-' | b'0'..=b'9' => scan_number(s, i),
        _ => Scan::Bad,
    }
}

fn scan_literal(s: &str, i: usize, lit: &str) -> Scan {
    let rest = &s[i..];
    if rest.starts_with(lit) {
        Scan::Done(i + lit.len())
    } else if lit.starts_with(rest) {
        Scan::Partial
    } else {
        Scan::Bad
    }
}

fn scan_number(s: &str, i: usize) -> Scan {
    let b = s.as_bytes();
    let mut j = i;
    while j < b.len() && matches!(b[j], b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9') {
        j += 1;
    }
    if j == b.len() {
        // A number at the very end may go on.
        return Scan::Partial;
    }
    match serde_json::from_str::<serde_json::Number>(&s[i..j]) {
        Ok(_) => Scan::Done(j),
        Err(_) => Scan::Bad,
    }
}

/// Scans a string starting at the opening quote at `i`.
pub(crate) fn scan_string(s: &str, i: usize) -> Scan {
    let b = s.as_bytes();
    let mut j = i + 1;
    while j < b.len() {
        match b[j] {
            b'\\' => j += 2,
            b'"' => return Scan::Done(j + 1),
            c if c < 0x20 => return Scan::Bad,
            _ => j += 1,
        }
    }
    Scan::Partial
}

fn scan_container(s: &str, i: usize, close: u8) -> Scan {
    let b = s.as_bytes();
    let is_obj = close == b'}';
    let mut j = skip_ws(s, i + 1);
    if j >= b.len() {
        return Scan::Partial;
    }
    if b[j] == close {
        return Scan::Done(j + 1);
    }
    loop {
        if is_obj {
            j = skip_ws(s, j);
            if j >= b.len() {
                return Scan::Partial;
            }
            if b[j] != b'"' {
                return Scan::Bad;
            }
            match scan_string(s, j) {
                Scan::Done(e) => j = skip_ws(s, e),
                other => return other,
            }
            if j >= b.len() {
                return Scan::Partial;
            }
            if b[j] != b':' {
                return Scan::Bad;
            }
            j += 1;
        }
        match scan_value(s, j) {
            Scan::Done(e) => j = skip_ws(s, e),
            other => return other,
        }
        if j >= b.len() {
            return Scan::Partial;
        }
        if b[j] == b',' {
            j += 1;
        } else if b[j] == close {
            return Scan::Done(j + 1);
        } else {
            return Scan::Bad;
        }
    }
}

/// One top-level field of an object: its key and the byte range of its value (`end` is `None`
/// while the value is still being written).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Field {
    pub key: String,
    pub start: usize,
    pub end: Option<usize>,
}

/// The fields of the object whose `{` is at `i`, and how the object ended: `Done(end)`,
/// `Partial` (the fields seen so far, the last one possibly open) or `Bad`.
pub(crate) fn object_fields(s: &str, i: usize) -> (Vec<Field>, Scan) {
    let b = s.as_bytes();
    let mut fields = Vec::new();
    if b.get(i) != Some(&b'{') {
        return (fields, Scan::Bad);
    }
    let mut j = skip_ws(s, i + 1);
    if j >= b.len() {
        return (fields, Scan::Partial);
    }
    if b[j] == b'}' {
        return (fields, Scan::Done(j + 1));
    }
    loop {
        j = skip_ws(s, j);
        if j >= b.len() {
            return (fields, Scan::Partial);
        }
        if b[j] != b'"' {
            return (fields, Scan::Bad);
        }
        let key_end = match scan_string(s, j) {
            Scan::Done(e) => e,
            other => return (fields, other),
        };
        let Ok(key) = serde_json::from_str::<String>(&s[j..key_end]) else {
            return (fields, Scan::Bad);
        };
        j = skip_ws(s, key_end);
        if j >= b.len() {
            return (fields, Scan::Partial);
        }
        if b[j] != b':' {
            return (fields, Scan::Bad);
        }
        let start = skip_ws(s, j + 1);
        match scan_value(s, start) {
            Scan::Done(e) => {
                fields.push(Field {
                    key,
                    start,
                    end: Some(e),
                });
                j = skip_ws(s, e);
            }
            Scan::Partial => {
                fields.push(Field {
                    key,
                    start,
                    end: None,
                });
                return (fields, Scan::Partial);
            }
            Scan::Bad => return (fields, Scan::Bad),
        }
        if j >= b.len() {
            return (fields, Scan::Partial);
        }
        if b[j] == b',' {
            j += 1;
        } else if b[j] == b'}' {
            return (fields, Scan::Done(j + 1));
        } else {
            return (fields, Scan::Bad);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn complete_partial_and_bad_values() {
        assert_eq!(scan_value(r#"{"a": [1, "x\"}"]} tail"#, 0), Scan::Done(18));
        assert_eq!(scan_value(r#"{"a": [1, "x"#, 0), Scan::Partial);
        assert_eq!(scan_value(r#"{"a" 1}"#, 0), Scan::Bad);
        assert_eq!(scan_value("tr", 0), Scan::Partial);
        assert_eq!(scan_value("trap", 0), Scan::Bad);
        assert_eq!(scan_value("12,", 0), Scan::Done(2));
        assert_eq!(scan_value("12", 0), Scan::Partial);
        assert_eq!(scan_value("  ", 0), Scan::Partial);
    }

    #[test]
    fn fields_give_value_ranges() {
        let s = r#"{"name": "f", "arguments": {"x": 1}}"#;
        let (f, end) = object_fields(s, 0);
        assert_eq!(end, Scan::Done(s.len()));
        assert_eq!(f[0].key, "name");
        assert_eq!(&s[f[1].start..f[1].end.unwrap()], r#"{"x": 1}"#);
        let p = r#"{"name": "f", "arguments": {"x": "#;
        let (f, end) = object_fields(p, 0);
        assert_eq!(end, Scan::Partial);
        assert_eq!(f.len(), 2);
        assert_eq!(f[1].end, None);
        assert_eq!(&p[f[1].start..], r#"{"x": "#);
    }
}

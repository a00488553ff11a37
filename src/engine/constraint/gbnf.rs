//! GBNF (llama.cpp's grammar format) → llguidance's Lark syntax: a line-by-line port of llguidance's own
//! converter, `python/llguidance/gbnf_to_lark.py` (guidance-ai/llguidance, commit c75b0d9), so that a
//! `grammar` written for llama-server means here what it means in llama.cpp built with llguidance.
//!
//! The converter parses rules (`name ::= alternatives`), turns character classes into regexes, renames
//! `root` to `start`, marks rules that only reach terminals as Lark terminals (upper case) and prints
//! them in their original order. One deliberate departure: the Python script strips leading zeros of
//! `\uHHHH` / `\UHHHHHHHH` escapes (`\u0041` → `\u41`), which neither Rust's regex syntax nor the JSON
//! string syntax of llguidance's Lark literals accepts; we keep the escape as written (and write `\U`
//! escapes of literals as the character itself, JSON having no `\U`).

use std::collections::HashMap;

/// Why a GBNF grammar cannot be converted; the message names the place (line, text before and after).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct GbnfError(pub String);

/// Whether `text` is already llguidance Lark (`%llguidance` directive or a `start:` rule), the check of
/// the converter's `is_lark_syntax`.
pub fn is_lark_syntax(text: &str) -> bool {
    text.lines().any(|l| {
        let t = l.trim_start();
        t.starts_with("%llguidance")
            && t["%llguidance".len()..]
                .chars()
                .next()
                .is_none_or(|c| !(c.is_alphanumeric() || c == '_'))
            || t.strip_prefix("start")
                .is_some_and(|r| r.trim_start().starts_with(':'))
    })
}

/// Converts a grammar to Lark when it is GBNF; Lark passes through unchanged (`any_to_lark`).
///
/// Errors: [`GbnfError`] from [`gbnf_to_lark`].
pub fn any_to_lark(text: &str) -> Result<String, GbnfError> {
    if is_lark_syntax(text) {
        Ok(text.to_string())
    } else {
        gbnf_to_lark(text)
    }
}

#[derive(Clone, Debug)]
enum Node {
    Literal(String),
    Regex(String),
    /// A reference by name; resolved to a rule index by [`resolve`].
    RuleRef(String, Option<usize>),
    Repetition(Box<Node>, u32, Option<u32>),
    Sequence(Vec<Node>),
    Alternative(Vec<Node>),
}

struct Rule {
    name: String,
    body: Node,
    comment: String,
    is_terminal: bool,
}

impl Node {
    fn is_atomic(&self) -> bool {
        !matches!(self, Node::Sequence(_) | Node::Alternative(_))
    }

    fn is_terminal(&self, rules: &[Rule]) -> bool {
        match self {
            Node::Literal(_) | Node::Regex(_) => true,
            Node::RuleRef(_, t) => t.is_some_and(|i| rules[i].is_terminal),
            Node::Repetition(n, ..) => n.is_terminal(rules),
            Node::Sequence(v) | Node::Alternative(v) => v.iter().all(|n| n.is_terminal(rules)),
        }
    }

    fn simplify(self) -> Node {
        match self {
            Node::Repetition(n, a, b) => Node::Repetition(Box::new(n.simplify()), a, b),
            Node::Sequence(v) => {
                let mut v: Vec<Node> = v.into_iter().map(Node::simplify).collect();
                if v.len() == 1 {
                    v.pop().unwrap_or(Node::Sequence(Vec::new()))
                } else {
                    Node::Sequence(v)
                }
            }
            Node::Alternative(v) => {
                let mut v: Vec<Node> = v.into_iter().map(Node::simplify).collect();
                if v.len() == 1 {
                    v.pop().unwrap_or(Node::Alternative(Vec::new()))
                } else {
                    Node::Alternative(v)
                }
            }
            n => n,
        }
    }

    fn for_each_ref(
        &mut self,
        f: &mut impl FnMut(&str, &mut Option<usize>) -> Result<(), GbnfError>,
    ) -> Result<(), GbnfError> {
        match self {
            Node::RuleRef(name, target) => f(name, target),
            Node::Repetition(n, ..) => n.for_each_ref(f),
            Node::Sequence(v) | Node::Alternative(v) => {
                v.iter_mut().try_for_each(|n| n.for_each_ref(f))
            }
            Node::Literal(_) | Node::Regex(_) => Ok(()),
        }
    }

    fn render(&self, rules: &[Rule]) -> String {
        match self {
            Node::Literal(v) => format!("\"{v}\""),
            Node::Regex(rx) => format!("/{rx}/"),
            Node::RuleRef(name, t) => match t {
                Some(i) => rules[*i].name.clone(),
                None => name.clone(),
            },
            Node::Repetition(n, min, max) => {
                let mut inner = n.render(rules);
                if !n.is_atomic() {
                    inner = format!("({inner})");
                }
                match (min, max) {
                    (0, None) => format!("{inner}*"),
                    (1, None) => format!("{inner}+"),
                    (0, Some(1)) => format!("{inner}?"),
                    (a, None) => format!("{inner}{{{a},}}"),
                    (a, Some(b)) => format!("{inner}{{{a},{b}}}"),
                }
            }
            Node::Sequence(v) => {
                if v.is_empty() {
                    "\"\"".to_string()
                } else {
                    v.iter()
                        .map(|n| n.render(rules))
                        .collect::<Vec<_>>()
                        .join(" ")
                }
            }
            Node::Alternative(v) => format!(
                "({})",
                v.iter()
                    .map(|n| n.render(rules))
                    .collect::<Vec<_>>()
                    .join(" | ")
            ),
        }
    }

    fn render_top(&self, rules: &[Rule]) -> String {
        match self {
            Node::Alternative(v) => v
                .iter()
                .map(|n| n.render(rules))
                .collect::<Vec<_>>()
                .join("\n     | "),
            n => n.render(rules),
        }
    }
}

/// The parser's cursor over the grammar's characters.
struct Parser {
    text: Vec<char>,
    pos: usize,
    comment: String,
}

impl Parser {
    fn cur(&self) -> Option<char> {
        self.text.get(self.pos).copied()
    }

    fn peek(&self, n: usize) -> String {
        self.text[self.pos.min(self.text.len())..(self.pos + n).min(self.text.len())]
            .iter()
            .collect()
    }

    /// `Position.__str__`: line number and 20 characters either side.
    fn err(&self, message: impl std::fmt::Display) -> GbnfError {
        let pos = self.pos.min(self.text.len());
        let line = self.text[..pos].iter().filter(|&&c| c == '\n').count() + 1;
        let pref: String = self.text[pos.saturating_sub(20)..pos].iter().collect();
        let suff: String = self.text[pos..(pos + 20).min(self.text.len())]
            .iter()
            .collect();
        GbnfError(format!("{message} at line {line}, {pref:?} ^ {suff:?}"))
    }

    fn is_word_char(c: Option<char>) -> bool {
        c.is_some_and(|c| c.is_alphanumeric() || c == '-' || c == '_')
    }

    fn hex(&mut self, n: usize, esc: char) -> Result<String, GbnfError> {
        let h = self.peek(n + 1)[1..].to_string();
        if h.chars().count() != n || !h.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(self.err(format!("Invalid \\{esc} escape sequence: \\{esc}{h}")));
        }
        self.pos += n + 1;
        Ok(h)
    }

    /// One character or escape, as it is to be written in the output; `in_literal` selects how a
    /// `\U` escape is written (see the module comment).
    fn parse_char(&mut self, in_literal: bool) -> Result<String, GbnfError> {
        match self.cur() {
            Some('\\') => {
                if self.text.get(self.pos + 1).is_none() {
                    return Err(self.err("Incomplete escape sequence"));
                }
                self.pos += 1;
                let c = self.cur().unwrap_or_default();
                match c {
                    '"' | '\\' | '[' | ']' | 'n' | 'r' | 't' => {
                        self.pos += 1;
                        Ok(format!("\\{c}"))
                    }
                    'x' => Ok(format!("\\x{}", self.hex(2, 'x')?)),
                    'u' => Ok(format!("\\u{}", self.hex(4, 'u')?)),
                    'U' => {
                        let h = self.hex(8, 'U')?;
                        if !in_literal {
                            return Ok(format!("\\U{h}"));
                        }
                        let ch = u32::from_str_radix(&h, 16)
                            .ok()
                            .and_then(char::from_u32)
                            .ok_or_else(|| {
                                self.err(format!("Invalid \\U escape sequence: \\U{h}"))
                            })?;
                        Ok(match ch {
                            '"' | '\\' => format!("\\{ch}"),
                            c if (c as u32) < 0x20 => format!("\\u{:04x}", c as u32),
                            c => c.to_string(),
                        })
                    }
                    _ => Err(self.err(format!("Invalid escape sequence \\{c}"))),
                }
            }
            None => Err(self.err("Unexpected end of input")),
            Some(c) => {
                self.pos += 1;
                Ok(c.to_string())
            }
        }
    }

    fn parse_char_class(&mut self) -> Result<Node, GbnfError> {
        if self.cur() != Some('[') {
            return Err(self.err("Expected '['"));
        }
        let mut r = String::from("[");
        self.pos += 1;
        loop {
            let c = self.parse_char(false)?;
            if c == "/" || c == "[" {
                r.push('\\');
            }
            r.push_str(&c);
            if c == "]" {
                break;
            }
        }
        Ok(Node::Regex(r))
    }

    fn parse_literal(&mut self) -> Result<Node, GbnfError> {
        if self.cur() != Some('"') {
            return Err(self.err("Expected '\"'"));
        }
        self.pos += 1;
        let mut r = String::new();
        loop {
            let c = self.parse_char(true)?;
            if c == "\"" {
                break;
            }
            r.push_str(&c);
        }
        Ok(Node::Literal(r))
    }

    fn parse_name(&mut self) -> Result<String, GbnfError> {
        let start = self.pos;
        while Self::is_word_char(self.cur()) {
            self.pos += 1;
        }
        if self.pos == start {
            return Err(self.err("Expected name"));
        }
        Ok(self.text[start..self.pos].iter().collect())
    }

    fn parse_int(&mut self) -> Result<u32, GbnfError> {
        let start = self.pos;
        while self.cur().is_some_and(|c| c.is_ascii_digit()) {
            self.pos += 1;
        }
        if self.pos == start {
            return Err(self.err("Expected integer"));
        }
        let s: String = self.text[start..self.pos].iter().collect();
        s.parse()
            .map_err(|_| self.err(format!("Integer {s} is too large")))
    }

    fn skip_space(&mut self, allow_newlines: bool) {
        while let Some(c) = self.cur() {
            if c == ' ' || c == '\t' {
                self.pos += 1;
            } else if allow_newlines && (c == '\r' || c == '\n') {
                self.skip_newline();
            } else if c == '#' {
                self.pos += 1;
                let mut cmt = String::from("//");
                while let Some(c) = self.cur().filter(|&c| c != '\r' && c != '\n') {
                    cmt.push(c);
                    self.pos += 1;
                }
                self.comment.push_str(&cmt);
                self.comment.push('\n');
            } else {
                break;
            }
        }
    }

    fn skip_newline(&mut self) {
        if self.cur() == Some('\r') {
            self.pos += 1;
            if self.cur() == Some('\n') {
                self.pos += 1;
            }
        } else if self.cur() == Some('\n') {
            self.pos += 1;
        }
    }

    fn parse_rule(&mut self) -> Result<Rule, GbnfError> {
        let name = self.parse_name()?;
        self.skip_space(false);
        if self.peek(3) != "::=" {
            return Err(self.err("Expected ::="));
        }
        self.pos += 3;
        self.skip_space(true);
        let body = self.parse_alternatives(false)?;
        self.skip_newline();
        let comment = std::mem::take(&mut self.comment);
        Ok(Rule {
            name,
            body,
            comment,
            is_terminal: false,
        })
    }

    fn parse_alternatives(&mut self, nested: bool) -> Result<Node, GbnfError> {
        let mut alts = Vec::new();
        loop {
            alts.push(self.parse_sequence(nested)?);
            self.skip_space(nested);
            if self.cur() != Some('|') {
                break;
            }
            self.pos += 1;
            self.skip_space(true);
        }
        Ok(Node::Alternative(alts))
    }

    fn parse_sequence(&mut self, nested: bool) -> Result<Node, GbnfError> {
        let mut nodes = Vec::new();
        while let Some(c) = self.cur() {
            if c == '|' || c == ')' || (!nested && (c == '\r' || c == '\n')) {
                break;
            }
            if c == '"' {
                nodes.push(self.parse_literal()?);
            } else if c == '[' {
                nodes.push(self.parse_char_class()?);
            } else if c == '(' {
                nodes.push(self.parse_group()?);
            } else if c == '.' {
                nodes.push(Node::Regex(".".into()));
                self.pos += 1;
            } else if Self::is_word_char(Some(c)) {
                let name = self.parse_name()?;
                nodes.push(Node::RuleRef(name, None));
            } else {
                break;
            }
            self.skip_space(nested);
            self.parse_repetition(&mut nodes)?;
            self.skip_space(nested);
        }
        Ok(Node::Sequence(nodes))
    }

    fn parse_group(&mut self) -> Result<Node, GbnfError> {
        if self.cur() != Some('(') {
            return Err(self.err("Expected '('"));
        }
        self.pos += 1;
        self.skip_space(true);
        let alts = self.parse_alternatives(true)?;
        if self.cur() != Some(')') {
            return Err(self.err("Expected ')'"));
        }
        self.pos += 1;
        Ok(alts)
    }

    fn parse_repetition(&mut self, nodes: &mut Vec<Node>) -> Result<(), GbnfError> {
        let Some(last) = nodes.pop() else {
            return Ok(());
        };
        let (min, max) = match self.cur() {
            Some('*') => (0, None),
            Some('+') => (1, None),
            Some('?') => (0, Some(1)),
            Some('{') => {
                self.pos += 1;
                self.skip_space(true);
                let min = self.parse_int()?;
                self.skip_space(true);
                match self.cur() {
                    Some('}') => (min, Some(min)),
                    Some(',') => {
                        self.pos += 1;
                        self.skip_space(true);
                        let mut max = None;
                        if self.cur().is_some_and(|c| c.is_ascii_digit()) {
                            max = Some(self.parse_int()?);
                        }
                        self.skip_space(true);
                        if self.cur() != Some('}') {
                            nodes.push(last);
                            return Err(self.err("Expected '}'"));
                        }
                        (min, max)
                    }
                    _ => {
                        nodes.push(last);
                        return Err(self.err("Expected ',' or '}'"));
                    }
                }
            }
            _ => {
                nodes.push(last);
                return Ok(());
            }
        };
        self.pos += 1;
        nodes.push(Node::Repetition(Box::new(last), min, max));
        Ok(())
    }
}

/// `root` → `start`, references linked, terminal rules found (fixpoint) and renamed in Lark's style
/// (`foo-barBaz` → `foo_bar_baz`, upper case for terminals); the converter's `resolve`.
fn resolve(rules: &mut [Rule]) -> Result<(), GbnfError> {
    let mut index: HashMap<String, usize> = rules
        .iter()
        .enumerate()
        .map(|(i, r)| (r.name.clone(), i))
        .collect();
    for r in rules.iter_mut() {
        let body = std::mem::replace(&mut r.body, Node::Sequence(Vec::new()));
        r.body = body.simplify();
    }
    for r in rules.iter_mut() {
        r.body
            .for_each_ref(&mut |name, target| match index.get(name) {
                Some(&i) => {
                    *target = Some(i);
                    Ok(())
                }
                None => Err(GbnfError(format!("Rule '{name}' not found"))),
            })?;
    }
    let Some(&root) = index.get("root") else {
        return Err(GbnfError("No 'root' rule found".into()));
    };
    rename(rules, &mut index, root, "start".into())?;
    loop {
        let mut fixed = 0;
        for i in 0..rules.len() {
            if rules[i].name != "start" && !rules[i].is_terminal && rules[i].body.is_terminal(rules)
            {
                rules[i].is_terminal = true;
                fixed += 1;
            }
        }
        if fixed == 0 {
            break;
        }
    }
    for i in 0..rules.len() {
        let mut snake = String::new();
        let mut prev: Option<char> = None;
        for c in rules[i].name.replace('-', "_").chars() {
            if prev.is_some_and(|p| p.is_ascii_lowercase()) && c.is_ascii_uppercase() {
                snake.push('_');
            }
            snake.push(c);
            prev = Some(c);
        }
        let new = if rules[i].is_terminal {
            snake.to_uppercase()
        } else {
            snake.to_lowercase()
        };
        if rules[i].name != new {
            rename(rules, &mut index, i, new)?;
        }
    }
    Ok(())
}

fn rename(
    rules: &mut [Rule],
    index: &mut HashMap<String, usize>,
    i: usize,
    name: String,
) -> Result<(), GbnfError> {
    if index.contains_key(&name) {
        return Err(GbnfError(format!("Rule '{name}' already exists")));
    }
    index.remove(&rules[i].name);
    index.insert(name.clone(), i);
    rules[i].name = name;
    Ok(())
}

/// Converts a GBNF grammar to llguidance Lark (`gbnf_to_lark`): a `%llguidance {}` header, then each
/// rule in its original order (a rule defined twice keeps its first place and its last body, as the
/// Python dictionary does), multi-line rules set off by blank lines, comments kept as `//` lines.
///
/// Errors: [`GbnfError`] with the place of a syntax error, an undefined rule, a missing `root`, or two
/// rules that map to the same Lark name.
pub fn gbnf_to_lark(text: &str) -> Result<String, GbnfError> {
    let mut p = Parser {
        text: text.chars().collect(),
        pos: 0,
        comment: String::new(),
    };
    p.skip_space(true);
    let mut rules: Vec<Rule> = Vec::new();
    let mut seen: HashMap<String, usize> = HashMap::new();
    while p.cur().is_some() {
        let r = p.parse_rule()?;
        match seen.get(&r.name) {
            Some(&i) => rules[i] = r,
            None => {
                seen.insert(r.name.clone(), rules.len());
                rules.push(r);
            }
        }
        p.skip_space(true);
    }
    resolve(&mut rules)?;
    let mut res = String::from("%llguidance {}\n\n");
    let mut prev_nl = true;
    for r in &rules {
        let s = format!("{}{}: {}", r.comment, r.name, r.body.render_top(&rules));
        let nl = s.contains('\n');
        if !prev_nl && nl {
            res.push('\n');
        }
        res.push_str(&s);
        res.push('\n');
        prev_nl = nl;
        if nl {
            res.push('\n');
        }
    }
    Ok(res)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn converts_rules_terminals_and_repetitions() {
        let g = r#"
# a list of items
root ::= item ("," item){0,3} ws?
item ::= [a-z]+ | "x\"y" | num
num ::= [0-9]{1,4}
ws ::= [ \t\n]*
"#;
        let lark = gbnf_to_lark(g).unwrap();
        // What llguidance's gbnf_to_lark.py prints: `item` only reaches terminals, so it is one.
        assert_eq!(
            lark,
            "%llguidance {}\n\n// a list of items\nstart: ITEM (\",\" ITEM){0,3} WS?\n\n\
             ITEM: /[a-z]/+\n     | \"x\\\"y\"\n     | NUM\n\n\
             NUM: /[0-9]/{1,4}\nWS: /[ \\t\\n]/*\n"
        );
    }

    /// llama.cpp's grammars/*.gbnf (commit 0c1e570) and what the Python converter prints for them.
    const LLAMA_CPP_GRAMMARS: [(&str, &str, &str); 3] = [
        (
            "json",
            r##"root   ::= object
value  ::= object | array | string | number | ("true" | "false" | "null") ws

object ::=
  "{" ws (
            string ":" ws value
    ("," ws string ":" ws value)*
  )? "}" ws

array  ::=
  "[" ws (
            value
    ("," ws value)*
  )? "]" ws

string ::=
  "\"" (
    [^"\\\x7F\x00-\x1F] |
    "\\" (["\\bfnrt] | "u" [0-9a-fA-F]{4}) # escapes
  )* "\"" ws

number ::= ("-"? ([0-9] | [1-9] [0-9]{0,15})) ("." [0-9]+)? ([eE] [-+]? [0-9] [1-9]{0,15})? ws

# Optional space: by convention, applied in this grammar after literal chars when allowed
ws ::= | " " | "\n" [ \t]{0,20}
"##,
            r##"%llguidance {}

start: object

value: object
     | array
     | STRING
     | NUMBER
     | ("true" | "false" | "null") WS

object: "{" WS (STRING ":" WS value ("," WS STRING ":" WS value)*)? "}" WS
array: "[" WS (value ("," WS value)*)? "]" WS

// escapes
STRING: "\"" ((/[^"\\\x7F\x00-\x1F]/ | "\\" (/["\\bfnrt]/ | "u" /[0-9a-fA-F]/{4,4})))* "\"" WS

NUMBER: "-"? (/[0-9]/ | /[1-9]/ /[0-9]/{0,15}) ("." /[0-9]/+)? (/[eE]/ /[-+]/? /[0-9]/ /[1-9]/{0,15})? WS

// Optional space: by convention, applied in this grammar after literal chars when allowed
WS: ""
     | " "
     | "\n" /[ \t]/{0,20}

"##,
        ),
        (
            "arithmetic",
            r##"root  ::= (expr "=" ws term "\n")+
expr  ::= term ([-+*/] term)*
term  ::= ident | num | "(" ws expr ")" ws
ident ::= [a-z] [a-z0-9_]* ws
num   ::= [0-9]+ ws
ws    ::= [ \t\n]*
"##,
            r##"%llguidance {}

start: (expr "=" WS term "\n")+
expr: term (/[-+*\/]/ term)*

term: IDENT
     | NUM
     | "(" WS expr ")" WS

IDENT: /[a-z]/ /[a-z0-9_]/* WS
NUM: /[0-9]/+ WS
WS: /[ \t\n]/*
"##,
        ),
        (
            "list",
            r##"root ::= item+

# Excludes various line break characters
item ::= "- " [^\r\n\x0b\x0c\x85\u2028\u2029]+ "\n"
"##,
            r##"%llguidance {}

start: ITEM+

// Excludes various line break characters
ITEM: "- " /[^\r\n\x0b\x0c\x85\u2028\u2029]/+ "\n"

"##,
        ),
    ];

    #[test]
    fn llama_cpp_grammars_convert_as_the_python_converter_does() {
        for (name, gbnf, lark) in LLAMA_CPP_GRAMMARS {
            assert_eq!(gbnf_to_lark(gbnf).unwrap(), lark, "{name}.gbnf");
        }
    }

    #[test]
    fn names_become_lark_style_and_terminal_rules_upper_case() {
        let lark =
            gbnf_to_lark("root ::= my-rule\nmy-rule ::= fooBar\nfooBar ::= \"a\" root?\n").unwrap();
        // my-rule and fooBar reach root (a rule), so they stay rules.
        assert!(lark.contains("start: my_rule\n"), "{lark}");
        assert!(lark.contains("my_rule: foo_bar\n"), "{lark}");
        assert!(lark.contains("foo_bar: \"a\" start?\n"), "{lark}");
    }

    #[test]
    fn escapes_are_kept_valid() {
        let lark = gbnf_to_lark(r#"root ::= "\x41\u00e9\U0001F600" [\u0041-\u005A/]"#).unwrap();
        assert!(
            lark.contains(r#"start: "\x41\u00e9😀" /[\u0041-\u005A\/]/"#),
            "{lark}"
        );
    }

    #[test]
    fn errors_name_the_place() {
        let e = gbnf_to_lark("root ::= \"a\"\nbad = \"b\"\n").unwrap_err();
        assert!(e.0.starts_with("Expected ::= at line 2"), "{e}");
        let e = gbnf_to_lark("root ::= missing\n").unwrap_err();
        assert_eq!(e.0, "Rule 'missing' not found");
        let e = gbnf_to_lark("start ::= \"a\"\n").unwrap_err();
        assert_eq!(e.0, "No 'root' rule found");
        let e = gbnf_to_lark("root ::= \"a\\q\"\n").unwrap_err();
        assert!(e.0.starts_with("Invalid escape sequence \\q"), "{e}");
        let e = gbnf_to_lark("root ::= (\"a\"\n").unwrap_err();
        assert!(e.0.starts_with("Expected ')'"), "{e}");
        let e = gbnf_to_lark("root ::= \"a\"{2,x}\n").unwrap_err();
        assert!(e.0.starts_with("Expected '}'"), "{e}");
    }

    #[test]
    fn lark_is_detected_and_passed_through() {
        assert!(is_lark_syntax("%llguidance {}\nstart: \"a\""));
        assert!(is_lark_syntax("  start : \"a\""));
        assert!(!is_lark_syntax("root ::= \"a\""));
        assert!(!is_lark_syntax("starter ::= \"a\""));
        assert_eq!(any_to_lark("start: \"a\"").unwrap(), "start: \"a\"");
    }
}

//! Unicode helpers of the tokenizers, ported from llama.cpp `src/unicode.cpp` (commit 0c1e570): codepoint
//! category flags, lowercase/NFD maps, the GPT-2 byte↔unicode mapping and the pre-tokenizer regex splitter
//! (llama.cpp's hand-written GPT-2 and LLaMA-3 splitters, and its "collapsed codepoint" trick for the rest).

use std::sync::OnceLock;

use fancy_regex::Regex;

use super::unicode_tables::{FLAGS, LOWERCASE, NFD_FIRST, WHITESPACE};

/// Category bits of `unicode_cpt_flags` (llama.cpp `src/unicode.h`).
pub(crate) const UNDEFINED: u16 = 0x0001;
pub(crate) const NUMBER: u16 = 0x0002;
pub(crate) const LETTER: u16 = 0x0004;
pub(crate) const ACCENT_MARK: u16 = 0x0010;
pub(crate) const PUNCTUATION: u16 = 0x0020;
pub(crate) const SYMBOL: u16 = 0x0040;
pub(crate) const CONTROL: u16 = 0x0080;
/// Not a category: set for codepoints in the White_Space list.
pub(crate) const WHITESPACE_BIT: u16 = 0x0100;

/// The flags of one codepoint (`unicode_cpt_flags_from_cpt`): category bits plus [`WHITESPACE_BIT`].
/// Codepoints past U+10FFFF are [`UNDEFINED`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Flags(pub u16);

impl Flags {
    pub fn of(cpt: u32) -> Flags {
        if cpt >= 0x110000 {
            return Flags(UNDEFINED);
        }
        let idx = FLAGS.partition_point(|&(start, _)| start <= cpt);
        let mut f = FLAGS[idx - 1].1;
        if WHITESPACE.binary_search(&cpt).is_ok() {
            f |= WHITESPACE_BIT;
        }
        Flags(f)
    }
    pub fn is_letter(self) -> bool {
        self.0 & LETTER != 0
    }
    pub fn is_number(self) -> bool {
        self.0 & NUMBER != 0
    }
    pub fn is_whitespace(self) -> bool {
        self.0 & WHITESPACE_BIT != 0
    }
    pub fn is_punctuation(self) -> bool {
        self.0 & PUNCTUATION != 0
    }
    pub fn is_symbol(self) -> bool {
        self.0 & SYMBOL != 0
    }
    pub fn is_control(self) -> bool {
        self.0 & CONTROL != 0
    }
    pub fn is_accent_mark(self) -> bool {
        self.0 & ACCENT_MARK != 0
    }
    /// `as_uint() != 0`: any bit set (false only for positions outside the current segment).
    pub fn any(self) -> bool {
        self.0 != 0
    }
    /// `category_flag()`: the category bits alone.
    pub fn category(self) -> u16 {
        self.0 & 0x00FF
    }
}

/// `unicode_tolower`: simple lowercase mapping, identity where there is none.
pub(crate) fn to_lower(cpt: u32) -> u32 {
    match LOWERCASE.binary_search_by_key(&cpt, |&(from, _)| from) {
        Ok(i) => LOWERCASE[i].1,
        Err(_) => cpt,
    }
}

/// `unicode_cpts_normalize_nfd` for one codepoint: llama.cpp keeps only the first codepoint of the NFD.
pub(crate) fn nfd_first(cpt: u32) -> u32 {
    match NFD_FIRST.binary_search_by_key(&cpt, |&(from, _)| from) {
        Ok(i) => NFD_FIRST[i].1,
        Err(_) => cpt,
    }
}

/// `unicode_len_utf8`: the length of a UTF-8 sequence from its first byte (1 for continuation bytes).
pub(crate) fn utf8_len(first: u8) -> usize {
    const LOOKUP: [usize; 16] = [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 3, 4];
    LOOKUP[(first >> 4) as usize]
}

/// GPT-2's `bytes_to_unicode` table: byte → the codepoint that stands for it in byte-level BPE vocabularies.
fn byte_to_cpt_table() -> &'static [char; 256] {
    static T: OnceLock<[char; 256]> = OnceLock::new();
    T.get_or_init(|| {
        let mut t = ['\0'; 256];
        let mut n = 0u32;
        for b in 0..256u32 {
            let direct = (0x21..=0x7E).contains(&b)
                || (0xA1..=0xAC).contains(&b)
                || (0xAE..=0xFF).contains(&b);
            let c = if direct {
                b
            } else {
                n += 1;
                255 + n
            };
            t[b as usize] = char::from_u32(c).unwrap_or('\u{FFFD}');
        }
        t
    })
}

/// `unicode_byte_to_utf8` as a char.
pub(crate) fn byte_to_char(b: u8) -> char {
    byte_to_cpt_table()[b as usize]
}

/// `unicode_utf8_to_byte`: the byte a byte-level BPE codepoint stands for, if it is one of the 256.
pub(crate) fn char_to_byte(c: char) -> Option<u8> {
    let c = c as u32;
    match c {
        0x21..=0x7E | 0xA1..=0xAC | 0xAE..=0xFF => Some(c as u8),
        0x100..=0x143 => {
            // the 68 bytes that are not printable map to 256.. in byte order
            let idx = (c - 0x100) as usize;
            (0..=255u8)
                .filter(|&b| {
                    !((0x21..=0x7E).contains(&b) || (0xA1..=0xAC).contains(&b) || b >= 0xAE)
                })
                .nth(idx)
        }
        _ => None,
    }
}

/// One step of a pre-tokenizer: a regex of llama.cpp's list, compiled once.
#[derive(Debug)]
pub(crate) enum Splitter {
    /// `unicode_regex_split_custom_gpt2`.
    Gpt2,
    /// `unicode_regex_split_custom_llama3`.
    Llama3,
    /// A general regex over the collapsed text (every non-ASCII codepoint replaced by one stand-in
    /// character for its category) — used when the regex names `\p{..}` categories.
    Collapsed(Regex),
    /// A general regex over the codepoints themselves (non-ASCII whitespace replaced by U+000B).
    Raw(Regex),
}

/// Errors building a pre-tokenizer regex (a bug in the table of regexes, reported rather than panicking).
#[derive(Debug, thiserror::Error)]
#[error("pre-tokenizer regex {regex:?} does not compile: {source}")]
pub struct RegexError {
    regex: String,
    #[source]
    source: Box<fancy_regex::Error>,
}

const GPT2_RE: &str =
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)";
const LLAMA3_RE_A: &str = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";
const LLAMA3_RE_B: &str = "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";

/// Stand-in characters of the collapsed text (llama.cpp uses the bytes 0xD0..0xD5; we use those codepoints).
const COLLAPSED_OTHER: char = '\u{D0}';
/// (category, `\p{..}` names, stand-in, the ASCII members as a regex class body) — `k_ucat_*` of unicode.cpp.
const CATEGORIES: [(u16, &[&str], char, &str); 5] = [
    (NUMBER, &["N"], '\u{D1}', "0-9"),
    (
        LETTER,
        &["L", "Lu", "Ll", "Lt", "Lm", "Lo"],
        '\u{D2}',
        "A-Za-z",
    ),
    (
        PUNCTUATION,
        &["P"],
        '\u{D3}',
        "!-#%-*,-/:-;?-@\\[-\\]_\\{\\}",
    ),
    (ACCENT_MARK, &["M"], '\u{D4}', ""),
    (SYMBOL, &["S"], '\u{D5}', "\\$\\+<->\\^`\\|"),
];

impl Splitter {
    /// Compile one of llama.cpp's pre-tokenizer regexes (written in its ECMAScript dialect).
    pub fn new(expr: &str) -> Result<Splitter, RegexError> {
        if expr == GPT2_RE {
            return Ok(Splitter::Gpt2);
        }
        if expr == LLAMA3_RE_A || expr == LLAMA3_RE_B {
            return Ok(Splitter::Llama3);
        }
        let compile = |re: &str| {
            Regex::new(re).map_err(|e| RegexError {
                regex: expr.to_string(),
                source: Box::new(e),
            })
        };
        if expr.contains("\\p{") {
            Ok(Splitter::Collapsed(compile(&collapse_regex(expr))?))
        } else {
            Ok(Splitter::Raw(compile(expr)?))
        }
    }
}

/// Rewrite `\p{X}` into the collapsed stand-in plus its ASCII members, as `unicode_regex_split` does.
fn collapse_regex(expr: &str) -> String {
    let mut out = String::with_capacity(expr.len() * 2);
    let chars: Vec<char> = expr.chars().collect();
    let mut inside = false;
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '[' && (i == 0 || chars[i - 1] != '\\') {
            out.push('[');
            inside = true;
            i += 1;
            continue;
        }
        if inside && c == ']' && chars[i - 1] != '\\' {
            out.push(']');
            inside = false;
            i += 1;
            continue;
        }
        let category =
            if c == '\\' && i + 3 < chars.len() && chars[i + 1] == 'p' && chars[i + 2] == '{' {
                chars[i + 3..]
                    .iter()
                    .position(|&x| x == '}')
                    .and_then(|close| {
                        let name: String = chars[i + 3..i + 3 + close].iter().collect();
                        CATEGORIES
                            .iter()
                            .find(|(_, names, _, _)| names.contains(&name.as_str()))
                            .map(|&(_, _, stand_in, ascii)| (close, stand_in, ascii))
                    })
            } else {
                None
            };
        if let Some((close, stand_in, ascii)) = category {
            if !inside {
                out.push('[');
            }
            out.push_str(&format!("\\x{{{:X}}}", stand_in as u32));
            out.push_str(ascii);
            if !inside {
                out.push(']');
            }
            i += 3 + close + 1;
            continue;
        }
        out.push(c);
        i += 1;
    }
    out
}

/// The collapsed stand-in of one codepoint.
fn collapse(cpt: u32) -> char {
    if cpt < 128 {
        return char::from_u32(cpt).unwrap_or(COLLAPSED_OTHER);
    }
    let f = Flags::of(cpt);
    if f.is_whitespace() {
        return '\u{0B}';
    }
    let cat = f.category();
    CATEGORIES
        .iter()
        .find(|(c, _, _, _)| *c == cat)
        .map(|(_, _, s, _)| *s)
        .unwrap_or(COLLAPSED_OTHER)
}

/// `unicode_regex_split`: cut `text` into words by applying each splitter in turn to every piece left by
/// the previous one (the parts between matches are kept as pieces too). Returns the words' UTF-8 text.
pub(crate) fn regex_split(text: &str, splitters: &[Splitter]) -> Vec<String> {
    let cpts: Vec<char> = text.chars().collect();
    let mut offsets = vec![cpts.len()];
    let mut collapsed: Option<String> = None;
    let mut raw: Option<String> = None;
    for s in splitters {
        offsets = match s {
            Splitter::Gpt2 => split_gpt2(&cpts, &offsets),
            Splitter::Llama3 => split_llama3(&cpts, &offsets),
            Splitter::Collapsed(re) => {
                let t = collapsed
                    .get_or_insert_with(|| cpts.iter().map(|&c| collapse(c as u32)).collect());
                split_regex(t, re, &offsets)
            }
            Splitter::Raw(re) => {
                let t = raw.get_or_insert_with(|| {
                    cpts.iter()
                        .map(|&c| {
                            if (c as u32) > 0x7F && Flags::of(c as u32).is_whitespace() {
                                '\u{0B}'
                            } else {
                                c
                            }
                        })
                        .collect()
                });
                split_regex(t, re, &offsets)
            }
        };
    }
    let mut words = Vec::with_capacity(offsets.len());
    let mut start = 0;
    for len in offsets {
        words.push(cpts[start..start + len].iter().collect());
        start += len;
    }
    words
}

/// `unicode_regex_split_stl`: inside each piece, every match and every gap between matches become pieces.
fn split_regex(text: &str, re: &Regex, offsets: &[usize]) -> Vec<usize> {
    // char index → byte index of the (possibly collapsed) text
    let mut byte_at: Vec<usize> = text.char_indices().map(|(b, _)| b).collect();
    byte_at.push(text.len());
    let mut out = Vec::with_capacity(offsets.len());
    let mut start = 0usize;
    for &len in offsets {
        let seg = &text[byte_at[start]..byte_at[start + len]];
        let base = byte_at[start];
        let char_of = |b: usize| byte_at.partition_point(|&x| x < base + b) - start;
        let mut prev = 0usize;
        let mut pos = 0usize;
        while pos <= seg.len() {
            let m = match re.find_from_pos(seg, pos) {
                Ok(Some(m)) => m,
                Ok(None) => break,
                Err(e) => {
                    // fancy-regex's backtracking limit: keep the rest of the piece whole rather than fail
                    tracing::warn!(
                        "pre-tokenizer regex gave up on a {}-byte piece: {e}",
                        seg.len()
                    );
                    break;
                }
            };
            let (ms, me) = (char_of(m.start()), char_of(m.end()));
            if ms > prev {
                out.push(ms - prev);
            }
            if me > ms {
                out.push(me - ms);
            }
            prev = me;
            pos = if m.end() > m.start() {
                m.end()
            } else {
                // empty match: step one character forward
                match seg[m.end()..].chars().next() {
                    Some(c) => m.end() + c.len_utf8(),
                    None => break,
                }
            };
        }
        if prev < len {
            out.push(len - prev);
        }
        start += len;
    }
    out
}

/// Cursor over one piece of the codepoint array, with llama.cpp's out-of-range conventions.
struct Piece<'a> {
    cpts: &'a [char],
    ini: usize,
    end: usize,
}

const OUT_OF_RANGE: u32 = 0xFFFF_FFFF;

impl Piece<'_> {
    fn cpt(&self, pos: usize) -> u32 {
        if self.ini <= pos && pos < self.end {
            self.cpts[pos] as u32
        } else {
            OUT_OF_RANGE
        }
    }
    fn flags(&self, pos: usize) -> Flags {
        if self.ini <= pos && pos < self.end {
            Flags::of(self.cpts[pos] as u32)
        } else {
            Flags(0)
        }
    }
}

/// `unicode_regex_split_custom_gpt2`:
/// `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`.
fn split_gpt2(cpts: &[char], offsets: &[usize]) -> Vec<usize> {
    let mut out = Vec::with_capacity(offsets.len());
    let mut start = 0;
    for &len in offsets {
        let p = Piece {
            cpts,
            ini: start,
            end: start + len,
        };
        start += len;
        let mut prev_end = p.ini;
        let mut add = |end: usize, out: &mut Vec<usize>| -> usize {
            let l = end - prev_end;
            if l > 0 {
                out.push(l);
            }
            prev_end = end;
            l
        };
        let mut pos = p.ini;
        while pos < p.end {
            let cpt = p.cpt(pos);
            let flags = p.flags(pos);
            if cpt == '\'' as u32 && pos + 1 < p.end {
                let next = p.cpt(pos + 1);
                if [b's', b't', b'm', b'd'].iter().any(|&c| next == c as u32) {
                    pos += add(pos + 2, &mut out);
                    continue;
                }
                if pos + 2 < p.end {
                    let nn = p.cpt(pos + 2);
                    if ((next == 'r' as u32 || next == 'v' as u32) && nn == 'e' as u32)
                        || (next == 'l' as u32 && nn == 'l' as u32)
                    {
                        pos += add(pos + 3, &mut out);
                        continue;
                    }
                }
            }
            let space = cpt == ' ' as u32;
            let mut f2 = if space { p.flags(pos + 1) } else { flags };
            if f2.is_letter() {
                pos += space as usize;
                while f2.is_letter() {
                    pos += 1;
                    f2 = p.flags(pos);
                }
                add(pos, &mut out);
                continue;
            }
            if f2.is_number() {
                pos += space as usize;
                while f2.is_number() {
                    pos += 1;
                    f2 = p.flags(pos);
                }
                add(pos, &mut out);
                continue;
            }
            let other =
                |f: Flags| !(f.is_whitespace() || f.is_letter() || f.is_number()) && f.any();
            if other(f2) {
                pos += space as usize;
                while other(f2) {
                    pos += 1;
                    f2 = p.flags(pos);
                }
                add(pos, &mut out);
                continue;
            }
            let mut nws = 0;
            while p.flags(pos + nws).is_whitespace() {
                nws += 1;
            }
            if nws > 1 && p.cpt(pos + nws) != OUT_OF_RANGE {
                pos += nws - 1;
                add(pos, &mut out);
                continue;
            }
            if nws > 0 {
                pos += nws;
                add(pos, &mut out);
                continue;
            }
            pos += 1;
            add(pos, &mut out);
        }
    }
    out
}

/// `unicode_regex_split_custom_llama3`: `(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|
///  ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+`.
fn split_llama3(cpts: &[char], offsets: &[usize]) -> Vec<usize> {
    let mut out = Vec::with_capacity(offsets.len());
    let mut start = 0;
    let is_rn = |c: u32| c == '\r' as u32 || c == '\n' as u32;
    for &len in offsets {
        let p = Piece {
            cpts,
            ini: start,
            end: start + len,
        };
        start += len;
        let mut prev_end = p.ini;
        let mut add = |end: usize, out: &mut Vec<usize>| -> usize {
            let l = end - prev_end;
            if l > 0 {
                out.push(l);
            }
            prev_end = end;
            l
        };
        let mut pos = p.ini;
        while pos < p.end {
            let cpt = p.cpt(pos);
            let flags = p.flags(pos);
            if cpt == '\'' as u32 && pos + 1 < p.end {
                let next = to_lower(p.cpt(pos + 1));
                if [b's', b't', b'm', b'd'].iter().any(|&c| next == c as u32) {
                    pos += add(pos + 2, &mut out);
                    continue;
                }
                if pos + 2 < p.end {
                    let nn = to_lower(p.cpt(pos + 2));
                    if ((next == 'r' as u32 || next == 'v' as u32) && nn == 'e' as u32)
                        || (next == 'l' as u32 && nn == 'l' as u32)
                    {
                        pos += add(pos + 3, &mut out);
                        continue;
                    }
                }
            }
            if !(is_rn(cpt) || flags.is_number())
                && (flags.is_letter() || p.flags(pos + 1).is_letter())
            {
                pos += 1;
                while p.flags(pos).is_letter() {
                    pos += 1;
                }
                add(pos, &mut out);
                continue;
            }
            if flags.is_number() {
                let mut ini = pos;
                while p.flags(pos).is_number() {
                    pos += 1;
                    if pos - ini >= 3 {
                        add(pos, &mut out);
                        ini = pos;
                    }
                }
                add(pos, &mut out);
                continue;
            }
            let space = cpt == ' ' as u32;
            let mut f2 = if space { p.flags(pos + 1) } else { flags };
            if !(f2.is_whitespace() || f2.is_letter() || f2.is_number()) && flags.any() {
                pos += space as usize;
                while !(f2.is_whitespace() || f2.is_letter() || f2.is_number()) && f2.any() {
                    pos += 1;
                    f2 = p.flags(pos);
                }
                while is_rn(p.cpt(pos)) {
                    pos += 1;
                }
                add(pos, &mut out);
                continue;
            }
            let mut nws = 0;
            let mut last_rn = 0;
            while p.flags(pos + nws).is_whitespace() {
                if is_rn(p.cpt(pos + nws)) {
                    last_rn = pos + nws + 1;
                }
                nws += 1;
            }
            if last_rn > 0 {
                pos = last_rn;
                add(pos, &mut out);
                continue;
            }
            if nws > 1 && p.cpt(pos + nws) != OUT_OF_RANGE {
                pos += nws - 1;
                add(pos, &mut out);
                continue;
            }
            if nws > 0 {
                pos += nws;
                add(pos, &mut out);
                continue;
            }
            pos += 1;
            add(pos, &mut out);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(text: &str, exprs: &[&str]) -> Vec<String> {
        let s: Vec<Splitter> = exprs.iter().map(|e| Splitter::new(e).unwrap()).collect();
        regex_split(text, &s)
    }

    #[test]
    fn flags_match_llama_tables() {
        assert!(Flags::of('a' as u32).is_letter());
        assert!(Flags::of('7' as u32).is_number());
        assert!(Flags::of(' ' as u32).is_whitespace());
        assert!(Flags::of(0x3000).is_whitespace());
        assert!(Flags::of('!' as u32).is_punctuation());
        assert!(Flags::of('$' as u32).is_symbol());
        assert!(Flags::of(0x0301).is_accent_mark());
        assert_eq!(Flags::of(0x0378).0, UNDEFINED);
        assert_eq!(Flags::of(0x20_0000).0, UNDEFINED);
        assert_eq!(to_lower('Ä' as u32), 'ä' as u32);
        assert_eq!(nfd_first('é' as u32), 'e' as u32);
    }

    #[test]
    fn byte_map_round_trips() {
        for b in 0..=255u8 {
            assert_eq!(char_to_byte(byte_to_char(b)), Some(b));
        }
        assert_eq!(byte_to_char(b' '), 'Ġ');
        assert_eq!(byte_to_char(b'\n'), 'Ċ');
        assert_eq!(char_to_byte('x'), Some(b'x'));
        assert_eq!(char_to_byte('€'), None);
    }

    #[test]
    fn gpt2_splitter() {
        assert_eq!(
            split("Hello world's  end  ", &[GPT2_RE]),
            ["Hello", " world", "'s", " ", " end", "  "]
        );
    }

    #[test]
    fn llama3_splitter() {
        assert_eq!(
            split("Hello 12345\n\n x", &[LLAMA3_RE_B]),
            ["Hello", " ", "123", "45", "\n\n", " x"]
        );
    }

    #[test]
    fn collapsed_regex_splits_digits() {
        assert_eq!(split("ab12é", &["\\p{N}"]), ["ab", "1", "2", "é"]);
        assert_eq!(split("x²y", &["\\p{N}"]), ["x", "²", "y"]);
    }
}

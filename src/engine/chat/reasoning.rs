//! Reasoning ("thinking") text of a reply: the part between a model's thinking markers goes to
//! `reasoning_content`, the rest stays content. Markers and options follow llama.cpp
//! (`common/chat.h` `common_reasoning_format`, `common/chat.cpp`, commit 0c1e570): `<think>…</think>`
//! (DeepSeek R1, Qwen3, QwQ, …), Command R7B's `<|START_THINKING|>…<|END_THINKING|>`, Mistral's
//! `[THINK]…[/THINK]` and Seed-OSS's `<seed:think>…</seed:think>`; a template whose generation
//! prompt already ends with the opening marker (R1 distills: `<｜Assistant｜><think>\n`) makes the
//! reply start inside the reasoning ("forced open").

use std::str::FromStr;

/// llama.cpp's `reasoning_format` (request field and `--reasoning-format` flag).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ReasoningFormat {
    /// Leave thinking text in `content`.
    None,
    /// Extract it into `reasoning_content` (also `deepseek-legacy`, which llama.cpp treats alike
    /// for non-streamed replies).
    Deepseek,
    /// Extract it when the template family has thinking markers (llama.cpp's default).
    #[default]
    Auto,
}

impl FromStr for ReasoningFormat {
    type Err = String;
    /// Parses `none`, `deepseek`, `deepseek-legacy` or `auto`.
    ///
    /// Errors: any other name, with the known ones listed.
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(ReasoningFormat::None),
            "deepseek" | "deepseek-legacy" => Ok(ReasoningFormat::Deepseek),
            "auto" => Ok(ReasoningFormat::Auto),
            other => Err(format!(
                "unknown reasoning format {other:?} (known: none, deepseek, deepseek-legacy, auto)"
            )),
        }
    }
}

/// An opening and a closing thinking marker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThinkMarkers {
    /// E.g. `<think>`.
    pub start: &'static str,
    /// E.g. `</think>`.
    pub end: &'static str,
}

/// The thinking markers llama.cpp knows, most common first.
pub const KNOWN_MARKERS: [ThinkMarkers; 4] = [
    ThinkMarkers {
        start: "<think>",
        end: "</think>",
    },
    ThinkMarkers {
        start: "<|START_THINKING|>",
        end: "<|END_THINKING|>",
    },
    ThinkMarkers {
        start: "[THINK]",
        end: "[/THINK]",
    },
    ThinkMarkers {
        start: "<seed:think>",
        end: "</seed:think>",
    },
];

/// The thinking markers a template's source uses (the first known pair whose closing marker it
/// contains), or `None` for templates without thinking.
pub fn markers_in_template(source: &str) -> Option<ThinkMarkers> {
    KNOWN_MARKERS
        .iter()
        .copied()
        .find(|m| source.contains(m.end))
}

/// Whether a rendered prompt leaves the thinking block open: its end (trailing whitespace aside)
/// is the opening marker, so the model's reply starts inside the reasoning.
pub fn forced_open(prompt: &str, markers: ThinkMarkers) -> bool {
    prompt.trim_end().ends_with(markers.start)
}

/// A reply split into its reasoning and the rest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Split<'a> {
    /// The thinking text, trimmed.
    pub reasoning: String,
    /// The text after the thinking block (leading whitespace removed), for the tool-call parser.
    pub rest: &'a str,
}

/// Length in bytes of the longest proper prefix of any of `markers` that `text` ends with.
pub(crate) fn partial_marker_len(text: &str, markers: &[&str]) -> usize {
    markers
        .iter()
        .map(|m| {
            let max = m.len().saturating_sub(1).min(text.len());
            (1..=max)
                .rev()
                .find(|&k| {
                    m.is_char_boundary(k)
                        && text.is_char_boundary(text.len() - k)
                        && text.ends_with(&m[..k])
                })
                .unwrap_or(0)
        })
        .max()
        .unwrap_or(0)
}

/// Splits `text` at the thinking markers. `forced_open`: the reply starts inside the reasoning.
/// `partial`: the reply is still being generated, so a tail that may be the start of a marker
/// (and trailing whitespace of the reasoning) is held back; an unclosed block is reasoning in both
/// modes (as llama.cpp's `try_parse_reasoning` treats it).
pub fn split(text: &str, markers: ThinkMarkers, forced_open: bool, partial: bool) -> Split<'_> {
    let body_start = if forced_open {
        // A model may still write the opening marker itself.
        let t = text.trim_start();
        if t.starts_with(markers.start) {
            text.len() - t.len() + markers.start.len()
        } else if partial && !t.is_empty() && markers.start.starts_with(t) {
            return Split {
                reasoning: String::new(),
                rest: "",
            };
        } else {
            0
        }
    } else {
        let t = text.trim_start();
        if t.starts_with(markers.start) {
            text.len() - t.len() + markers.start.len()
        } else if partial && markers.start.starts_with(t) {
            // Nothing yet, or the beginning of the opening marker.
            return Split {
                reasoning: String::new(),
                rest: "",
            };
        } else {
            return Split {
                reasoning: String::new(),
                rest: text.trim_start(),
            };
        }
    };
    let body = &text[body_start..];
    match body.find(markers.end) {
        Some(p) => Split {
            reasoning: body[..p].trim().to_string(),
            rest: body[p + markers.end.len()..].trim_start(),
        },
        None => {
            let mut r = body;
            if partial {
                r = &r[..r.len() - partial_marker_len(r, &[markers.end])];
            }
            Split {
                reasoning: r.trim().to_string(),
                rest: "",
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const THINK: ThinkMarkers = KNOWN_MARKERS[0];

    #[test]
    fn formats_parse() {
        assert_eq!("none".parse(), Ok(ReasoningFormat::None));
        assert_eq!("deepseek".parse(), Ok(ReasoningFormat::Deepseek));
        assert_eq!("auto".parse(), Ok(ReasoningFormat::Auto));
        assert!(
            "x".parse::<ReasoningFormat>()
                .unwrap_err()
                .contains("known")
        );
    }

    #[test]
    fn closed_block_is_split() {
        let s = split(
            "<think>\nLet me see.\n</think>\n\nParis.",
            THINK,
            false,
            false,
        );
        assert_eq!(s.reasoning, "Let me see.");
        assert_eq!(s.rest, "Paris.");
    }

    #[test]
    fn forced_open_reply_starts_in_reasoning() {
        let s = split("The user asks.\n</think>\nHi", THINK, true, false);
        assert_eq!(s.reasoning, "The user asks.");
        assert_eq!(s.rest, "Hi");
        assert!(forced_open("<｜Assistant｜><think>\n", THINK));
        assert!(!forced_open("<｜Assistant｜>", THINK));
    }

    #[test]
    fn no_markers_leave_content() {
        let s = split("Just text", THINK, false, false);
        assert_eq!((s.reasoning.as_str(), s.rest), ("", "Just text"));
    }

    #[test]
    fn partial_holds_back_marker_prefixes_and_stays_a_prefix() {
        let full = "<think>abc </think>done";
        let mut prev = String::new();
        for end in 0..=full.len() {
            let s = split(&full[..end], THINK, false, true);
            assert!(!s.reasoning.contains('<'), "{end}: {:?}", s.reasoning);
            assert!(s.reasoning.starts_with(&prev), "{end}");
            prev = s.reasoning;
        }
        assert_eq!(split("<thi", THINK, false, true).rest, "");
        assert_eq!(split(full, THINK, false, false).rest, "done");
    }

    #[test]
    fn markers_are_found_in_templates() {
        assert_eq!(markers_in_template("... '</think>' ..."), Some(THINK));
        assert_eq!(
            markers_in_template("<|START_THINKING|>x<|END_THINKING|>").map(|m| m.start),
            Some("<|START_THINKING|>")
        );
        assert_eq!(markers_in_template("<|im_start|>"), None);
    }
}

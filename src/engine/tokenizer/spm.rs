//! SentencePiece-style BPE (`tokenizer.ggml.model = llama`): score-ordered merges of adjacent symbols with
//! byte fallback (`<0xNN>` tokens). Port of `llm_tokenizer_spm_session` in llama.cpp `src/llama-vocab.cpp`
//! (commit 0c1e570).

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use rustc_hash::FxHashMap as HashMap;

use super::Vocab;
use super::unicode::utf8_len;

/// A symbol: a byte range of the text, linked to its neighbours (`llm_symbol`).
#[derive(Clone, Copy, Debug)]
struct Symbol {
    prev: i64,
    next: i64,
    start: usize,
    n: usize,
}

/// A candidate merge (`llm_bigram_spm`): the best score first, then the leftmost.
#[derive(Debug)]
struct Bigram {
    left: usize,
    right: usize,
    score: f32,
    size: usize,
}

impl PartialEq for Bigram {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Bigram {}
impl PartialOrd for Bigram {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Bigram {
    fn cmp(&self, other: &Self) -> Ordering {
        self.score
            .total_cmp(&other.score)
            .then_with(|| other.left.cmp(&self.left))
    }
}

/// Tokenize one fragment of already-escaped text (spaces replaced by `▁`), appending ids to `out`.
pub(crate) fn tokenize(vocab: &Vocab, text: &[u8], out: &mut Vec<u32>) {
    let mut symbols: Vec<Symbol> = Vec::new();
    let mut offs = 0;
    while offs < text.len() {
        let n = utf8_len(text[offs]).min(text.len() - offs);
        let idx = symbols.len() as i64;
        symbols.push(Symbol {
            prev: idx - 1,
            next: if offs + n == text.len() { -1 } else { idx + 1 },
            start: offs,
            n,
        });
        offs += n;
    }
    let mut queue = BinaryHeap::new();
    let mut rev_merge: HashMap<Vec<u8>, (usize, usize)> = HashMap::default();
    let try_add = |left: i64,
                   right: i64,
                   symbols: &[Symbol],
                   queue: &mut BinaryHeap<Bigram>,
                   rev_merge: &mut HashMap<Vec<u8>, (usize, usize)>| {
        if left < 0 || right < 0 {
            return;
        }
        let (l, r) = (left as usize, right as usize);
        let s = &text[symbols[l].start..symbols[l].start + symbols[l].n + symbols[r].n];
        let Some(id) = vocab.lookup(s) else {
            return;
        };
        queue.push(Bigram {
            left: l,
            right: r,
            score: vocab.tokens[id as usize].score,
            size: s.len(),
        });
        rev_merge.insert(s.to_vec(), (l, r));
    };
    for i in 1..symbols.len() {
        try_add(i as i64 - 1, i as i64, &symbols, &mut queue, &mut rev_merge);
    }
    while let Some(b) = queue.pop() {
        let (ln, rn) = (symbols[b.left].n, symbols[b.right].n);
        if ln == 0 || rn == 0 || ln + rn != b.size {
            continue;
        }
        symbols[b.left].n += rn;
        symbols[b.right].n = 0;
        let rnext = symbols[b.right].next;
        symbols[b.left].next = rnext;
        if rnext >= 0 {
            symbols[rnext as usize].prev = b.left as i64;
        }
        let lprev = symbols[b.left].prev;
        try_add(lprev, b.left as i64, &symbols, &mut queue, &mut rev_merge);
        try_add(b.left as i64, rnext, &symbols, &mut queue, &mut rev_merge);
    }
    if symbols.is_empty() {
        return;
    }
    let mut i: i64 = 0;
    while i != -1 {
        let s = symbols[i as usize];
        resegment(vocab, text, &symbols, &rev_merge, s.start, s.n, out);
        i = s.next;
    }
}

/// Emit a merged symbol as its token, or split it back into the merges that made it, or as bytes.
fn resegment(
    vocab: &Vocab,
    text: &[u8],
    symbols: &[Symbol],
    rev_merge: &HashMap<Vec<u8>, (usize, usize)>,
    start: usize,
    n: usize,
    out: &mut Vec<u32>,
) {
    let s = &text[start..start + n];
    if let Some(id) = vocab.lookup(s) {
        out.push(id);
        return;
    }
    // the recorded halves of a merge: the left one starts here, the right one ends where this one ends
    let halves = rev_merge
        .get(s)
        .map(|&(l, r)| (symbols[l].start, symbols[r].start))
        .filter(|&(ls, rs)| ls == start && start < rs && rs < start + n);
    match halves {
        Some((_, rs)) => {
            resegment(vocab, text, symbols, rev_merge, start, rs - start, out);
            resegment(vocab, text, symbols, rev_merge, rs, start + n - rs, out);
        }
        None => {
            for &b in s {
                if let Some(id) = vocab.byte_to_token(b) {
                    out.push(id);
                }
            }
        }
    }
}

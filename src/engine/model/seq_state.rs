//! Saving and restoring one sequence of the KV cache (llama-server's `POST /slots/{id}?action=save` and
//! `restore`, which call `llama_state_seq_save_file` / `llama_state_seq_load_file`,
//! `src/llama-context.cpp`, commit 0c1e570). The file format is ours, not llama.cpp's: its cells are
//! the cache's own bytes (f16, f32, bf16 or ggml blocks, Walsh–Hadamard-rotated as stored), so a
//! restore continues exactly where the saved sequence stopped.
//!
//! # Format (version 1, every integer little-endian)
//!
//! | field | bytes | meaning |
//! | --- | --- | --- |
//! | magic | 8 | `CYBSLOT\0` |
//! | version | u32 | 1 |
//! | fingerprint | 32 | SHA-256 of the model's GGUF headers and sizes ([`crate::engine::gguf::GgufFile::fingerprint`]) |
//! | file size | u64 | the model's GGUF size (bytes, all parts) |
//! | arch length, arch | u16, that many bytes | `general.architecture` (UTF-8, at most 256 bytes) |
//! | n_vocab | u32 | vocabulary size |
//! | n_layer | u32 | layers of the cache |
//! | type_k, type_v | u32, u32 | ggml type ids of the stored keys and values |
//! | rot_k, rot_v | u32, u32 | Walsh–Hadamard sizes the keys / values are stored rotated by (0 = none) |
//! | per layer: n_embd_k, n_embd_v, window | 3 × u32 | row widths (elements), sliding window (0 = global) |
//! | n_tokens | u32 | tokens of the sequence (positions `0..n_tokens`) |
//! | tokens | n_tokens × u32 | their ids, position order |
//! | per layer: first, n_held | u32, u32 | the positions `first..first + n_held` whose cells follow |
//! | per layer: keys, values | n_held × row_k, then n_held × row_v | the rows as stored, position order |
//!
//! and nothing after. A global layer holds every position (`first = 0`, `n_held = n_tokens`); a
//! sliding-window layer (gemma's iSWA ring) holds only the last `min(n_tokens, cells)` positions — what
//! its ring still has, which is all a continuation attends to. A ring has `min(window, n_ctx)` cells, so
//! a file written by any context holds at least the `min(n_tokens, cells)` positions the ring of any
//! other context that fits the tokens needs: a save restores into a context of another size (a larger
//! ring is filled with what the file has, a smaller one takes the last positions). A file whose
//! sliding layer holds fewer positions than that (not one this code writes) is refused, naming the layer.
//!
//! Every length is checked against what is left of the file, and the token count against the
//! context, before anything is allocated or copied; the whole file is validated before the cache is
//! touched, so a refused file leaves the sequence as it was.

use super::kv_cache::KvCache;
use crate::engine::ggml_type::GgmlType;

/// The file's first 8 bytes.
pub const MAGIC: [u8; 8] = *b"CYBSLOT\0";
/// The format version this build writes and reads.
pub const VERSION: u32 = 1;
/// Longest architecture name accepted (bytes).
const MAX_ARCH: usize = 256;

/// What a slot file must match: the model it was written for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelIdentity {
    /// `general.architecture`.
    pub arch: String,
    /// [`crate::engine::gguf::GgufFile::fingerprint`].
    pub fingerprint: [u8; 32],
    /// The GGUF's size (bytes).
    pub file_size: u64,
    /// Vocabulary size (every saved token must be below it).
    pub n_vocab: usize,
}

/// Why a sequence could not be saved or restored. Each names what was wrong and where.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SeqStateError {
    /// The GPU holding some layers' cache failed to read it back.
    #[error("reading the GPU's KV cache: {0}")]
    Device(String),
    /// The bytes do not start with [`MAGIC`].
    #[error("not a slot save file (its first bytes are not the magic `CYBSLOT`)")]
    Magic,
    /// Another format version.
    #[error("slot file format version {found}; this build reads version {VERSION}")]
    Version {
        /// The file's version.
        found: u32,
    },
    /// The file ends inside a field.
    #[error(
        "the file is truncated: it ends inside {what} at byte {at} ({need} bytes needed, {have} left)"
    )]
    Truncated {
        /// The field.
        what: String,
        /// Its offset.
        at: usize,
        /// Bytes it needs.
        need: u64,
        /// Bytes left.
        have: usize,
    },
    /// Bytes after the last layer's cells.
    #[error("{0} unexpected bytes after the last layer's cells")]
    Trailing(usize),
    /// The file was written for another model or cache layout.
    #[error("the file's {what} is {file}; this {owner}'s is {ours}")]
    Mismatch {
        /// What differs (`key type`, `layer 3 sliding window`, …).
        what: String,
        /// The file's value.
        file: String,
        /// Ours.
        ours: String,
        /// Whose value `ours` is: `model`, `KV cache` or `format`.
        owner: &'static str,
    },
    /// More tokens than the slot's context.
    #[error("the file holds {n_tokens} tokens, more than the slot's context of {n_ctx}")]
    TooLong {
        /// Tokens in the file.
        n_tokens: u64,
        /// The context (tokens).
        n_ctx: usize,
    },
    /// A token id outside the vocabulary.
    #[error("token {index} of the file ({token}) is not in the vocabulary of {n_vocab}")]
    BadToken {
        /// Its position.
        index: usize,
        /// Its id.
        token: u32,
        /// Vocabulary size.
        n_vocab: usize,
    },
    /// A layer's held positions are inconsistent with the tokens or with this cache.
    #[error("layer {layer}: {message}")]
    Layer {
        /// Layer index.
        layer: usize,
        /// What is wrong.
        message: String,
    },
    /// The sequence id is outside the cache, or the tokens given to a save are not what it holds.
    #[error("{0}")]
    Sequence(String),
}

fn ggml_name(id: u32) -> String {
    GgmlType::from_id(id).map_or_else(
        || format!("ggml type id {id}"),
        |t| t.name().to_ascii_lowercase(),
    )
}

fn put_u32(out: &mut Vec<u8>, v: usize) {
    // Every value written fits: sizes of a cache that exists in memory (checked by the callers).
    out.extend_from_slice(&(v as u32).to_le_bytes());
}

/// The per-layer header fields `(n_embd_k, n_embd_v, window)` of `kv`.
fn layer_layout(kv: &KvCache) -> Vec<[u32; 3]> {
    (0..kv.n_layer())
        .map(|l| {
            [
                kv.n_embd_kv() as u32,
                kv.n_embd_kv() as u32,
                kv.window(l).unwrap_or(0) as u32,
            ]
        })
        .collect()
}

/// Bytes of the file of a sequence of `n_tokens` tokens with every layer holding `held[l]` of them.
fn body_bytes(kv: &KvCache, n_tokens: usize, held: impl Iterator<Item = usize>) -> usize {
    let (rk, rv) = kv.row_bytes();
    header_bytes(kv) + 4 + 4 * n_tokens + held.map(|h| 8 + h * (rk + rv)).sum::<usize>()
}

fn header_bytes(kv: &KvCache) -> usize {
    // magic, version, fingerprint, size, arch (length only), n_vocab, n_layer, types, rotations, layers
    8 + 4 + 32 + 8 + 2 + 4 + 4 + 8 + 8 + 12 * kv.n_layer()
}

/// The largest file a sequence of `kv` can produce (every position of the context held), for
/// `id`'s model: the bound a reader allocates up to.
pub fn max_bytes(kv: &KvCache, id: &ModelIdentity) -> usize {
    let n = kv.n_ctx();
    body_bytes(kv, n, (0..kv.n_layer()).map(|l| kv.cells(l).min(n))) + id.arch.len().min(MAX_ARCH)
}

/// [`SeqStateError::Sequence`] unless `seq` is one of the cache's sequences.
fn check_seq(kv: &KvCache, seq: usize) -> Result<(), SeqStateError> {
    if seq >= kv.n_seq() {
        return Err(SeqStateError::Sequence(format!(
            "sequence {seq} is not in the cache of {}",
            kv.n_seq()
        )));
    }
    Ok(())
}

/// Serializes sequence `seq` of `kv` with its `tokens` (exactly the cache's positions of `seq`, in
/// order) in the format above. Returns the file's bytes.
///
/// Errors: [`SeqStateError::Sequence`] when `seq` is not in the cache or `tokens` is not as long as
/// the cached sequence.
pub fn save(
    kv: &KvCache,
    id: &ModelIdentity,
    seq: usize,
    tokens: &[u32],
) -> Result<Vec<u8>, SeqStateError> {
    check_seq(kv, seq)?;
    if tokens.len() != kv.seq_len(seq) {
        return Err(SeqStateError::Sequence(format!(
            "{} tokens given for sequence {seq}, which caches {} positions",
            tokens.len(),
            kv.seq_len(seq)
        )));
    }
    let held: Vec<(usize, usize)> = (0..kv.n_layer()).map(|l| kv.held(l, seq)).collect();
    let arch = &id.arch.as_bytes()[..id.arch.len().min(MAX_ARCH)];
    let mut out =
        Vec::with_capacity(body_bytes(kv, tokens.len(), held.iter().map(|h| h.1)) + arch.len());
    out.extend_from_slice(&MAGIC);
    put_u32(&mut out, VERSION as usize);
    out.extend_from_slice(&id.fingerprint);
    out.extend_from_slice(&id.file_size.to_le_bytes());
    out.extend_from_slice(&(arch.len() as u16).to_le_bytes());
    out.extend_from_slice(arch);
    put_u32(&mut out, id.n_vocab);
    put_u32(&mut out, kv.n_layer());
    let (tk, tv) = kv.types();
    put_u32(&mut out, tk.ggml().id() as usize);
    put_u32(&mut out, tv.ggml().id() as usize);
    let (rot_k, rot_v) = kv.rotations();
    put_u32(&mut out, rot_k.unwrap_or(0));
    put_u32(&mut out, rot_v.unwrap_or(0));
    for l in layer_layout(kv) {
        for v in l {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
    put_u32(&mut out, tokens.len());
    for &t in tokens {
        out.extend_from_slice(&t.to_le_bytes());
    }
    for (l, &(first, n)) in held.iter().enumerate() {
        put_u32(&mut out, first);
        put_u32(&mut out, n);
        kv.export_rows(l, seq, first, first + n, &mut out)
            .map_err(SeqStateError::Device)?;
    }
    Ok(out)
}

/// A reader over the file's bytes whose every read is checked against what is left.
struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: u64, what: impl Fn() -> String) -> Result<&'a [u8], SeqStateError> {
        let have = self.b.len() - self.at;
        match usize::try_from(n) {
            Ok(n) if n <= have => {
                let s = &self.b[self.at..self.at + n];
                self.at += n;
                Ok(s)
            }
            _ => Err(SeqStateError::Truncated {
                what: what(),
                at: self.at,
                need: n,
                have,
            }),
        }
    }
    fn u32(&mut self, what: impl Fn() -> String) -> Result<u32, SeqStateError> {
        let s = self.take(4, what)?;
        Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    }
}

/// Checks `bytes` (a file of [`save`]) against `kv` and `id`, then replaces sequence `seq` of `kv` with
/// it: its cells and its length. Returns the tokens (position order).
///
/// Errors (the cache unchanged): [`SeqStateError::Magic`], [`SeqStateError::Version`],
/// [`SeqStateError::Mismatch`] (another model file, architecture, vocabulary, layer count, row width,
/// window, key or value type, rotation), [`SeqStateError::TooLong`], [`SeqStateError::BadToken`],
/// [`SeqStateError::Layer`], [`SeqStateError::Truncated`], [`SeqStateError::Trailing`],
/// [`SeqStateError::Sequence`].
pub fn load(
    kv: &mut KvCache,
    id: &ModelIdentity,
    seq: usize,
    bytes: &[u8],
) -> Result<Vec<u32>, SeqStateError> {
    check_seq(kv, seq)?;
    if bytes.len() < MAGIC.len() || bytes[..MAGIC.len()] != MAGIC {
        return Err(SeqStateError::Magic);
    }
    let mut r = Reader {
        b: bytes,
        at: MAGIC.len(),
    };
    let s = |x: &str| {
        let x = x.to_string();
        move || x.clone()
    };
    let version = r.u32(s("the version"))?;
    if version != VERSION {
        return Err(SeqStateError::Version { found: version });
    }
    let mismatch = |what: &str, file: String, ours: String, owner| SeqStateError::Mismatch {
        what: what.to_string(),
        file,
        ours,
        owner,
    };
    let fingerprint = r.take(32, s("the model fingerprint"))?;
    let size = r.take(8, s("the model size"))?;
    let file_size = u64::from_le_bytes(size.try_into().expect("8 bytes"));
    let arch_len = r.take(2, s("the architecture's length"))?;
    let arch_len = u16::from_le_bytes([arch_len[0], arch_len[1]]) as usize;
    if arch_len > MAX_ARCH {
        return Err(mismatch(
            "architecture name length",
            format!("{arch_len} bytes"),
            format!("at most {MAX_ARCH}"),
            "format",
        ));
    }
    let arch = String::from_utf8_lossy(r.take(arch_len as u64, s("the architecture"))?);
    if arch != id.arch {
        return Err(mismatch(
            "architecture",
            format!("`{arch}`"),
            format!("`{}`", id.arch),
            "model",
        ));
    }
    if fingerprint != id.fingerprint || file_size != id.file_size {
        return Err(mismatch(
            "model (GGUF size and header fingerprint)",
            format!("{file_size} bytes with fingerprint {}", hex8(fingerprint)),
            format!(
                "{} bytes with fingerprint {}",
                id.file_size,
                hex8(&id.fingerprint)
            ),
            "model",
        ));
    }
    let n_vocab = r.u32(s("the vocabulary size"))?;
    if n_vocab as usize != id.n_vocab {
        return Err(mismatch(
            "vocabulary size",
            n_vocab.to_string(),
            id.n_vocab.to_string(),
            "model",
        ));
    }
    let n_layer = r.u32(s("the layer count"))?;
    if n_layer as usize != kv.n_layer() {
        return Err(mismatch(
            "layer count",
            n_layer.to_string(),
            kv.n_layer().to_string(),
            "KV cache",
        ));
    }
    let (tk, tv) = kv.types();
    for (what, want, flag) in [("key type", tk, "-ctk"), ("value type", tv, "-ctv")] {
        let got = r.u32(s(what))?;
        if got != want.ggml().id() {
            return Err(mismatch(
                what,
                ggml_name(got),
                format!("{} ({flag})", want.name()),
                "KV cache",
            ));
        }
    }
    let (rot_k, rot_v) = kv.rotations();
    for (what, want) in [
        ("key rotation (Walsh–Hadamard size, 0 = none)", rot_k),
        ("value rotation (Walsh–Hadamard size, 0 = none)", rot_v),
    ] {
        let got = r.u32(s(what))?;
        if got as usize != want.unwrap_or(0) {
            return Err(mismatch(
                what,
                got.to_string(),
                want.unwrap_or(0).to_string(),
                "KV cache",
            ));
        }
    }
    for (l, want) in layer_layout(kv).into_iter().enumerate() {
        for (k, name) in [
            "key row width",
            "value row width",
            "sliding window (0 = global)",
        ]
        .into_iter()
        .enumerate()
        {
            let got = r.u32(|| format!("layer {l} {name}"))?;
            if got != want[k] {
                return Err(mismatch(
                    &format!("layer {l} {name}"),
                    got.to_string(),
                    want[k].to_string(),
                    "KV cache",
                ));
            }
        }
    }
    let n_tokens = r.u32(s("the token count"))? as usize;
    if n_tokens > kv.n_ctx() {
        return Err(SeqStateError::TooLong {
            n_tokens: n_tokens as u64,
            n_ctx: kv.n_ctx(),
        });
    }
    // Bounded by n_ctx above, and by the bytes left.
    let raw = r.take(4 * n_tokens as u64, s("the tokens"))?;
    let tokens: Vec<u32> = raw
        .chunks_exact(4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    if let Some((index, &token)) = tokens
        .iter()
        .enumerate()
        .find(|(_, t)| **t as usize >= id.n_vocab)
    {
        return Err(SeqStateError::BadToken {
            index,
            token,
            n_vocab: id.n_vocab,
        });
    }
    let (rk, rv) = kv.row_bytes();
    // (first position written, key bytes, value bytes) per layer, checked before any is copied.
    let mut layers: Vec<(usize, &[u8], &[u8])> = Vec::with_capacity(kv.n_layer());
    for l in 0..kv.n_layer() {
        let first = r.u32(|| format!("layer {l}'s first position"))? as usize;
        let n_held = r.u32(|| format!("layer {l}'s position count"))? as usize;
        let bad = |message: String| SeqStateError::Layer { layer: l, message };
        if first.checked_add(n_held) != Some(n_tokens) {
            return Err(bad(format!(
                "holds positions {first}..{} of a sequence of {n_tokens} tokens (it must end at the last)",
                first as u64 + n_held as u64
            )));
        }
        let cells = kv.cells(l);
        let need = n_tokens.min(cells);
        if kv.window(l).is_none() && n_held != n_tokens {
            return Err(bad(format!(
                "a global layer must hold all {n_tokens} positions; the file holds {n_held}"
            )));
        }
        if n_held < need {
            return Err(bad(format!(
                "slides over {} positions; the file holds the last {n_held} of them, but this \
                 context's ring needs the last {need}",
                kv.window(l).unwrap_or(0)
            )));
        }
        let k = r.take(n_held as u64 * rk as u64, || format!("layer {l} keys"))?;
        let v = r.take(n_held as u64 * rv as u64, || format!("layer {l} values"))?;
        // Only the last `need` positions go into the ring (a larger saving ring held more).
        let skip = n_held - need;
        layers.push((first + skip, &k[skip * rk..], &v[skip * rv..]));
    }
    if r.at != bytes.len() {
        return Err(SeqStateError::Trailing(bytes.len() - r.at));
    }
    for (l, (p0, k, v)) in layers.into_iter().enumerate() {
        kv.import_rows(l, seq, p0, k, v);
    }
    kv.set_len(seq, n_tokens);
    Ok(tokens)
}

/// The first 8 bytes of a fingerprint in hex (enough to tell two apart in a message).
fn hex8(f: &[u8]) -> String {
    f.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::super::kv_cache::KvType;
    use super::*;

    fn ident() -> ModelIdentity {
        ModelIdentity {
            arch: "llama".into(),
            fingerprint: [7; 32],
            file_size: 12345,
            n_vocab: 100,
        }
    }

    /// A cache of 3 layers (the middle one sliding over `window`), 2 sequences, `n_ctx` 16, rows of
    /// 64 elements, with `len` positions of sequence 1 written.
    fn filled(tk: KvType, tv: KvType, window: usize, n_ctx: usize, len: usize) -> KvCache {
        let mut c = KvCache::with_windows(&[None, Some(window), None], 2, n_ctx, 64, tk, tv)
            .with_rotations(64);
        for l in 0..3 {
            for p in 0..len {
                let k: Vec<f32> = (0..64)
                    .map(|i| ((p * 13 + i * 7 + l) % 29) as f32 / 10.0 - 1.4)
                    .collect();
                let v: Vec<f32> = k.iter().map(|x| x * -0.5 + 0.1).collect();
                c.write(l, 1, p, &k, &v);
            }
        }
        c.set_len(1, len);
        c
    }

    fn tokens(n: usize) -> Vec<u32> {
        (0..n as u32).map(|i| (i * 7) % 100).collect()
    }

    /// Every layer's held rows of `seq`, as stored.
    fn cells(c: &KvCache, seq: usize) -> Vec<Vec<u8>> {
        (0..c.n_layer())
            .map(|l| {
                let (f, n) = c.held(l, seq);
                let mut out = Vec::new();
                c.export_rows(l, seq, f, f + n, &mut out).unwrap();
                out
            })
            .collect()
    }

    #[test]
    fn round_trip_is_bit_exact_for_every_type_and_into_another_sequence() {
        for tk in KvType::ALL {
            for tv in [KvType::F16, tk] {
                let src = filled(tk, tv, 4, 16, 11);
                let bytes = save(&src, &ident(), 1, &tokens(11)).unwrap();
                assert!(bytes.len() <= max_bytes(&src, &ident()), "{tk:?}/{tv:?}");
                let mut dst = KvCache::with_windows(&[None, Some(4), None], 2, 16, 64, tk, tv)
                    .with_rotations(64);
                let got = load(&mut dst, &ident(), 0, &bytes).unwrap();
                assert_eq!(got, tokens(11));
                assert_eq!(dst.seq_len(0), 11);
                assert_eq!(dst.seq_len(1), 0, "other sequence untouched");
                assert_eq!(cells(&dst, 0), cells(&src, 1), "{tk:?}/{tv:?}");
                // The sliding layer holds the last 4 positions, in their ring cells.
                assert_eq!(dst.held(1, 0), (7, 4));
                // Attention reads the same bytes: the ring's cells are where the source has them.
                let (a, b) = (dst.ring(1, 0), src.ring(1, 1));
                assert_eq!(a.k.to_f32(), b.k.to_f32());
                assert_eq!(a.v.to_f32(), b.v.to_f32());
                // And the restored sequence can be saved again to the same bytes.
                assert_eq!(save(&dst, &ident(), 0, &tokens(11)).unwrap(), bytes);
            }
        }
    }

    #[test]
    fn empty_sequence_round_trips() {
        let src = filled(KvType::F16, KvType::F16, 4, 16, 0);
        let bytes = save(&src, &ident(), 1, &[]).unwrap();
        let mut dst = filled(KvType::F16, KvType::F16, 4, 16, 5);
        assert_eq!(
            load(&mut dst, &ident(), 1, &bytes).unwrap(),
            Vec::<u32>::new()
        );
        assert_eq!(dst.seq_len(1), 0);
    }

    #[test]
    fn a_ring_restores_into_a_smaller_context_and_refuses_one_that_needs_more_past() {
        // Saved with n_ctx 16 (ring of 8 cells): restorable into n_ctx 12 (ring of 8) and 6 (ring of 6).
        let src = filled(KvType::F32, KvType::F32, 8, 16, 5);
        let bytes = save(&src, &ident(), 1, &tokens(5)).unwrap();
        let mut dst =
            KvCache::with_windows(&[None, Some(8), None], 1, 12, 64, KvType::F32, KvType::F32);
        assert!(load(&mut dst, &ident(), 0, &bytes).is_ok());
        // A longer sequence in a ring of 4 cells (window 4 in n_ctx 4) into a ring of 8 (n_ctx 8).
        let small = filled(KvType::F32, KvType::F32, 8, 4, 4);
        let bytes = save(&small, &ident(), 1, &tokens(4)).unwrap();
        let mut big =
            KvCache::with_windows(&[None, Some(8), None], 2, 8, 64, KvType::F32, KvType::F32);
        assert!(
            load(&mut big, &ident(), 1, &bytes).is_ok(),
            "4 of 4 held: enough"
        );
        let mut small2 =
            KvCache::with_windows(&[None, Some(3), None], 1, 3, 64, KvType::F32, KvType::F32);
        let mut c =
            KvCache::with_windows(&[None, Some(3), None], 1, 3, 64, KvType::F32, KvType::F32);
        c.set_len(0, 3);
        let b3 = save(&c, &ident(), 0, &tokens(3)).unwrap();
        assert!(load(&mut small2, &ident(), 0, &b3).is_ok());
        // Hand-made: a file whose sliding layer holds fewer positions than the ring needs.
        let src = filled(KvType::F32, KvType::F32, 4, 16, 10);
        let mut bytes = save(&src, &ident(), 1, &tokens(10)).unwrap();
        let hdr = header_bytes(&src) + 5 + 4 + 40;
        let (rk, rv) = src.row_bytes();
        let l1 = hdr + 8 + 10 * (rk + rv);
        // Layer 1: first 6, n 4 → claim first 7, n 3 and drop one row of each.
        bytes[l1..l1 + 4].copy_from_slice(&7u32.to_le_bytes());
        bytes[l1 + 4..l1 + 8].copy_from_slice(&3u32.to_le_bytes());
        let k0 = l1 + 8;
        bytes.drain(k0 + 4 * rk..k0 + 4 * rk + rv);
        bytes.drain(k0..k0 + rk);
        let mut dst = filled(KvType::F32, KvType::F32, 4, 16, 2);
        let before = cells(&dst, 1);
        match load(&mut dst, &ident(), 1, &bytes) {
            Err(SeqStateError::Layer { layer: 1, message }) => {
                assert!(message.contains("needs the last 4"), "{message}")
            }
            other => panic!("{other:?}"),
        }
        assert_eq!((dst.seq_len(1), cells(&dst, 1)), (2, before), "unchanged");
    }

    #[test]
    fn refusals_name_what_is_wrong_and_leave_the_sequence_unchanged() {
        let src = filled(KvType::Q8_0, KvType::Q8_0, 4, 16, 9);
        let good = save(&src, &ident(), 1, &tokens(9)).unwrap();
        let fresh = || filled(KvType::Q8_0, KvType::Q8_0, 4, 16, 3);
        let check = |bytes: &[u8], dst: &mut KvCache, want: &dyn Fn(&SeqStateError) -> bool| {
            let before = (dst.seq_len(1), cells(dst, 1));
            let e = load(dst, &ident(), 1, bytes).expect_err("refused");
            assert!(want(&e), "unexpected: {e}");
            assert_eq!(
                (dst.seq_len(1), cells(dst, 1)),
                before,
                "changed after: {e}"
            );
            e.to_string()
        };
        // Garbage and the wrong magic.
        let m = check(b"hello world, not a slot", &mut fresh(), &|e| {
            *e == SeqStateError::Magic
        });
        assert!(m.contains("magic"));
        check(b"", &mut fresh(), &|e| *e == SeqStateError::Magic);
        // Another version.
        let mut b = good.clone();
        b[8..12].copy_from_slice(&2u32.to_le_bytes());
        check(&b, &mut fresh(), &|e| {
            *e == SeqStateError::Version { found: 2 }
        });
        // Truncated at every length: never a panic, always Truncated (or Magic when too short).
        for n in 0..good.len() {
            let e = load(&mut fresh(), &ident(), 1, &good[..n]).expect_err("truncated");
            assert!(
                matches!(e, SeqStateError::Truncated { .. } | SeqStateError::Magic),
                "{n}: {e}"
            );
        }
        let m = check(&good[..good.len() - 1], &mut fresh(), &|e| {
            matches!(e, SeqStateError::Truncated { .. })
        });
        assert!(m.contains("layer 2 values"), "{m}");
        // Trailing bytes.
        let mut b = good.clone();
        b.push(0);
        check(&b, &mut fresh(), &|e| *e == SeqStateError::Trailing(1));
        // Another model file, architecture, vocabulary.
        for (f, what) in [
            (
                ModelIdentity {
                    fingerprint: [8; 32],
                    ..ident()
                },
                "model (GGUF size and header fingerprint) is 12345 bytes",
            ),
            (
                ModelIdentity {
                    file_size: 1,
                    ..ident()
                },
                "this model's is 1 bytes",
            ),
            (
                ModelIdentity {
                    arch: "qwen2".into(),
                    ..ident()
                },
                "architecture is `llama`; this model's is `qwen2`",
            ),
            (
                ModelIdentity {
                    n_vocab: 101,
                    ..ident()
                },
                "vocabulary",
            ),
        ] {
            let e = load(&mut fresh(), &f, 1, &good).expect_err("other model");
            assert!(e.to_string().contains(what), "{e}");
        }
        // Another cache: key type, value type, rotation, window, layer count, row width.
        let others = [
            (
                filled(KvType::F16, KvType::Q8_0, 4, 16, 0),
                "key type is q8_0; this KV cache's is f16 (-ctk)",
            ),
            (
                filled(KvType::Q8_0, KvType::Q4_0, 4, 16, 0),
                "value type is q8_0; this KV cache's is q4_0 (-ctv)",
            ),
            (
                KvCache::with_windows(
                    &[None, Some(4), None],
                    2,
                    16,
                    64,
                    KvType::Q8_0,
                    KvType::Q8_0,
                ),
                "key rotation (Walsh–Hadamard size, 0 = none) is 64; this KV cache's is 0",
            ),
            (
                filled(KvType::Q8_0, KvType::Q8_0, 5, 16, 0),
                "layer 1 sliding window (0 = global) is 4; this KV cache's is 5",
            ),
            (
                KvCache::with_windows(&[None, Some(4)], 2, 16, 64, KvType::Q8_0, KvType::Q8_0)
                    .with_rotations(64),
                "layer count is 3; this KV cache's is 2",
            ),
            (
                KvCache::with_windows(
                    &[None, Some(4), None],
                    2,
                    16,
                    128,
                    KvType::Q8_0,
                    KvType::Q8_0,
                )
                .with_rotations(64),
                "layer 0 key row width is 64; this KV cache's is 128",
            ),
        ];
        for (mut c, what) in others {
            let m = check(&good, &mut c, &|e| {
                matches!(e, SeqStateError::Mismatch { .. })
            });
            assert!(m.contains(what), "{what}: {m}");
        }
        // More tokens than the context.
        let mut short =
            KvCache::with_windows(&[None, Some(4), None], 2, 8, 64, KvType::Q8_0, KvType::Q8_0)
                .with_rotations(64);
        check(&good, &mut short, &|e| {
            *e == SeqStateError::TooLong {
                n_tokens: 9,
                n_ctx: 8,
            }
        });
        // A hostile token count: refused before anything is allocated.
        let at = header_bytes(&src) + 5;
        let mut b = good.clone();
        b[at..at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        check(&b, &mut fresh(), &|e| {
            matches!(e, SeqStateError::TooLong { .. })
        });
        // A token outside the vocabulary.
        let mut b = good.clone();
        b[at + 4 + 8..at + 4 + 12].copy_from_slice(&100u32.to_le_bytes());
        check(&b, &mut fresh(), &|e| {
            *e == SeqStateError::BadToken {
                index: 2,
                token: 100,
                n_vocab: 100,
            }
        });
        // A hostile layer count of positions.
        let l0 = at + 4 + 36;
        let mut b = good.clone();
        b[l0 + 4..l0 + 8].copy_from_slice(&u32::MAX.to_le_bytes());
        check(&b, &mut fresh(), &|e| {
            matches!(e, SeqStateError::Layer { layer: 0, .. })
        });
        // A global layer that holds only part of the sequence.
        let mut b = good.clone();
        b[l0..l0 + 4].copy_from_slice(&1u32.to_le_bytes());
        b[l0 + 4..l0 + 8].copy_from_slice(&8u32.to_le_bytes());
        let m = check(&b, &mut fresh(), &|e| {
            matches!(e, SeqStateError::Layer { layer: 0, .. })
        });
        assert!(m.contains("global layer"), "{m}");
        // A sequence outside the cache; a save whose tokens are not what the sequence holds.
        assert!(matches!(
            load(&mut fresh(), &ident(), 2, &good),
            Err(SeqStateError::Sequence(_))
        ));
        assert!(matches!(
            save(&src, &ident(), 1, &tokens(8)),
            Err(SeqStateError::Sequence(_))
        ));
        assert!(matches!(
            save(&src, &ident(), 5, &[]),
            Err(SeqStateError::Sequence(_))
        ));
        // The good file still loads after all that.
        let mut d = fresh();
        assert_eq!(load(&mut d, &ident(), 1, &good).unwrap(), tokens(9));
        assert_eq!(cells(&d, 1), cells(&src, 1));
    }
}

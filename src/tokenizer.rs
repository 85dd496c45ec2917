//! Tokenization through the `tokenizers` crate, for every model (TinyMem's 14-symbol math
//! vocabulary ships as a `tokenizer.json` too, so there is one code path).
//!
//! Invariants:
//! - Text is encoded exactly as given: no special tokens are added, so `score` and audits see
//!   the same ids the model was trained on. Decoding keeps special tokens as text.
//! - A character the normalizer deletes (as TinyMem's does for every character outside its 14
//!   symbols) is an error naming the field, the character and its position in characters, never
//!   silently dropped; characters a normalizer rewrites (lower-casing) or merges into a
//!   neighbour (NFC) pass (tested below).
//! - Failures inside the `tokenizers` crate come back as [`Error::Tokenizer`]; nothing is kept
//!   between calls.

use std::path::Path;

use crate::error::{Error, Result};

/// A loaded `tokenizer.json`.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .finish()
    }
}

impl Tokenizer {
    pub fn from_file(path: &Path) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?;
        Ok(Self { inner })
    }

    pub fn from_inner(inner: tokenizers::Tokenizer) -> Self {
        Self { inner }
    }

    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// Token ids of `text`, without special tokens. A character outside the vocabulary is an
    /// [`Error::InvalidInput`] for the field `prompt` (see [`Tokenizer::encode_field`]).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        self.encode_field("prompt", text)
    }

    /// [`Tokenizer::encode`], naming `field` when `text` holds a character the vocabulary
    /// cannot represent: `character 'Ú' (U+00DA) at position 3 is not in the model's
    /// vocabulary` (the position counts characters from 0).
    pub fn encode_field(&self, field: &str, text: &str) -> Result<Vec<u32>> {
        if let Some((pos, c)) = self.first_dropped(text)? {
            return Err(Error::invalid(
                field,
                format!(
                    "character {c:?} (U+{:04X}) at position {pos} is not in the model's vocabulary",
                    c as u32
                ),
            ));
        }
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// The first character of `text` (its position in characters, and itself) that the
    /// normalizer deletes: such a character would reach the model as nothing at all. A character
    /// counts as deleted when no normalized character comes from it and it normalizes to nothing
    /// on its own, so one that a normalizer rewrites (lower-casing) or merges into its neighbour
    /// (NFC composing `e` + U+0301 into `é`) passes.
    fn first_dropped(&self, text: &str) -> Result<Option<(usize, char)>> {
        use tokenizers::tokenizer::normalizer::Range;
        use tokenizers::{NormalizedString, Normalizer};
        let Some(norm) = self.inner.get_normalizer() else {
            return Ok(None);
        };
        let normalize = |t: &str| -> Result<NormalizedString> {
            let mut ns = NormalizedString::from(t);
            norm.normalize(&mut ns)
                .map_err(|e| Error::Tokenizer(e.to_string()))?;
            Ok(ns)
        };
        let ns = normalize(text)?;
        if ns.get() == text {
            return Ok(None);
        }
        // Mark every original byte that some normalized character comes from.
        let mut covered = vec![false; text.len()];
        for (b, c) in ns.get().char_indices() {
            if let Some(r) = ns.convert_offsets(Range::Normalized(b..b + c.len_utf8())) {
                let end = r.end.min(covered.len());
                covered[r.start.min(end)..end].fill(true);
            }
        }
        let mut kept = std::collections::HashSet::new();
        for (pos, (b, c)) in text.char_indices().enumerate() {
            if covered[b] || kept.contains(&c) {
                continue;
            }
            if normalize(c.encode_utf8(&mut [0; 4]))?.get().is_empty() {
                return Ok(Some((pos, c)));
            }
            kept.insert(c);
        }
        Ok(None)
    }

    /// Text of `ids` (special tokens included as text).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, false)
            .map_err(|e| Error::Tokenizer(e.to_string()))
    }

    /// Size of the vocabulary including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The string of one token id, if it exists.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Writes `tokenizer.json` to `path` (pretty-printed, via a temporary file and a rename).
    pub fn save(&self, path: &Path) -> Result<()> {
        let json = self
            .inner
            .to_string(true)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        crate::util::write_atomic(path, json.as_bytes())
    }
}

/// Trains a byte-level BPE tokenizer (GPT-2's scheme: any text encodes, nothing is unknown or
/// dropped) on `texts`, with at most `vocab_size` entries: `special` first (ids 0, 1, …), the
/// 256 byte symbols, then merges of pairs seen at least twice, most frequent first.
///
/// The same texts and settings give the same `tokenizer.json` byte for byte (pinned by a test):
/// a model's card can name its tokenizer by content.
pub fn train_byte_level_bpe<I, S>(
    texts: I,
    vocab_size: usize,
    special: &[&str],
) -> Result<Tokenizer>
where
    I: Iterator<Item = S> + Send,
    S: AsRef<str> + Send,
{
    use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
    use tokenizers::models::TrainerWrapper;
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    use tokenizers::AddedToken;
    let floor = special.len() + ByteLevel::alphabet().len();
    if vocab_size < floor {
        return Err(Error::invalid(
            "vocab_size",
            format!("{vocab_size} is below the {floor} entries every byte-level vocabulary holds (256 bytes + {} special)", special.len()),
        ));
    }
    let mut trainer: TrainerWrapper = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(special.iter().map(|s| AddedToken::from(*s, true)).collect())
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build()
        .into();
    let mut inner = tokenizers::Tokenizer::new(BPE::default());
    inner.with_pre_tokenizer(Some(ByteLevel::default().add_prefix_space(false)));
    inner.with_decoder(Some(ByteLevel::default()));
    inner
        .train(&mut trainer, texts)
        .map_err(|e| Error::Tokenizer(format!("training BPE: {e}")))?;
    Ok(Tokenizer { inner })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A trained byte-level BPE: reproducible byte for byte, within its vocabulary size, special
    /// tokens first, merges that shorten what it saw, and a lossless round trip of any text
    /// (accents, CJK, emoji, tabs and newlines), through a saved `tokenizer.json` too.
    #[test]
    fn a_trained_byte_level_bpe_is_reproducible_and_round_trips_any_text() {
        let corpus: Vec<String> = (0..300)
            .map(|i| format!("The quick brown fox {i} jumps over the lazy dog.\n    def parse(x): return x + {i}\n"))
            .collect();
        let train = |n| train_byte_level_bpe(corpus.iter(), n, &["<|endoftext|>"]);
        let (a, b) = (train(420).unwrap(), train(420).unwrap());
        let json = |t: &Tokenizer| t.inner().to_string(false).unwrap();
        assert_eq!(json(&a), json(&b));
        assert!((258..=420).contains(&a.vocab_size()), "{}", a.vocab_size());
        assert_eq!(a.id_to_token(0).as_deref(), Some("<|endoftext|>"));
        let seen = "The quick brown fox jumps over the lazy dog.";
        assert!(a.encode(seen).unwrap().len() < 15, "merges learnt");
        let dir = tempfile::tempdir().unwrap();
        a.save(&dir.path().join("tokenizer.json")).unwrap();
        let loaded = Tokenizer::from_file(&dir.path().join("tokenizer.json")).unwrap();
        for text in [
            seen,
            "naïve café — 東京 🚀",
            "tabs\tand\nnewlines  ",
            "<|endoftext|>x",
        ] {
            let ids = a.encode(text).unwrap();
            assert_eq!(a.decode(&ids).unwrap(), text);
            assert_eq!(loaded.encode(text).unwrap(), ids);
        }
        let err = train(100).expect_err("too small").to_string();
        assert!(err.contains("vocab_size"), "{err}");
    }
    use tokenizers::models::wordlevel::WordLevel;
    use tokenizers::normalizers::{unicode::NFC, utils::Lowercase, Sequence};
    use tokenizers::pre_tokenizers::whitespace::Whitespace;

    /// A word-level tokenizer over `words` (plus `[UNK]`) with `normalizer`.
    fn word_level(words: &[&str], normalizer: Option<tokenizers::NormalizerWrapper>) -> Tokenizer {
        let vocab = std::iter::once("[UNK]")
            .chain(words.iter().copied())
            .enumerate()
            .map(|(i, w)| (w.to_string(), i as u32))
            .collect();
        let model = WordLevel::builder()
            .vocab(vocab)
            .unk_token("[UNK]".into())
            .build()
            .unwrap();
        let mut tk = tokenizers::Tokenizer::new(model);
        tk.with_normalizer(normalizer).unwrap();
        tk.with_pre_tokenizer(Some(Whitespace {}));
        Tokenizer::from_inner(tk)
    }

    #[test]
    fn rewritten_characters_pass_and_only_deleted_ones_are_refused() {
        // No normalizer: nothing is deleted (whitespace split by the pre-tokenizer is not).
        let tk = word_level(&["héllo", "world"], None);
        assert_eq!(tk.encode(" héllo\tworld ").unwrap(), vec![1, 2]);
        // NFC composes e + U+0301 into é, lower-casing rewrites: both map to something.
        let nfc = Sequence::new(vec![NFC.into(), Lowercase.into()]);
        let tk = word_level(&["héllo", "world"], Some(nfc.into()));
        assert_eq!(tk.encode("HE\u{301}llo World").unwrap(), vec![1, 2]);
        // TinyMem's normalizer deletes: that is refused, naming the first deleted character.
        let tk = crate::tinymem::tokenizer::build().unwrap();
        let e = tk
            .encode_field("prompt[1]", "^1 2 é 3")
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "invalid prompt[1]: character 'é' (U+00E9) at position 5 is not in the model's \
             vocabulary"
        );
    }
}

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
}

#[cfg(test)]
mod tests {
    use super::*;
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

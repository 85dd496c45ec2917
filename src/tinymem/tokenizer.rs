//! TinyMem's 14-symbol math vocabulary as a Hugging Face `tokenizer.json`, so that every model
//! goes through one tokenization code path.
//!
//! Invariants:
//! - One character is one token ('0'–'9' → 0–9, '^' BOS 10, '$' EOS 11, ' ' 12, '_' PAD 13) and
//!   decoding concatenates the symbols; a test pins it to [`super::vocab`].
//! - The `tokenizer.json`'s normaliser deletes any other character (spec §1.1, as the reference
//!   and [`super::vocab::encode_text`] do), but [`Tokenizer::encode`] refuses text holding such
//!   a character, naming it and its position: a prompt is never silently changed.
//! - [`write`] replaces the file atomically.

use std::collections::HashMap;

use tokenizers::decoders::fuse::Fuse;
use tokenizers::models::wordlevel::WordLevel;
use tokenizers::normalizers::replace::Replace;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{SplitDelimiterBehavior, Tokenizer as HfTokenizer};

use super::vocab;
use crate::error::{Error, Result};
use crate::tokenizer::Tokenizer;

/// Builds the TinyMem tokenizer.
pub fn build() -> Result<Tokenizer> {
    let err =
        |e: tokenizers::Error| Error::Tokenizer(format!("building the TinyMem tokenizer: {e}"));
    let vocab_map: HashMap<String, u32> = (0..vocab::VOCAB_SIZE as u32)
        .map(|id| (vocab::id_to_char(id).to_string(), id))
        .collect();
    let model = WordLevel::builder()
        .vocab(vocab_map.into_iter().collect())
        .unk_token(vocab::PAD_CHAR.to_string())
        .build()
        .map_err(err)?;
    let mut tk = HfTokenizer::new(model);
    tk.with_normalizer(Some(
        Replace::new(
            tokenizers::normalizers::replace::ReplacePattern::Regex("[^0-9^$ _]".into()),
            "",
        )
        .map_err(err)?,
    ))
    .map_err(err)?;
    tk.with_pre_tokenizer(Some(
        Split::new(
            SplitPattern::Regex(".".into()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(err)?,
    ));
    tk.with_decoder(Some(Fuse::new()));
    Ok(Tokenizer::from_inner(tk))
}

/// Writes `tokenizer.json` to `path`.
pub fn write(path: &std::path::Path) -> Result<()> {
    let tk = build()?;
    let json = tk
        .inner()
        .to_string(true)
        .map_err(|e| Error::Tokenizer(e.to_string()))?;
    crate::util::write_atomic(path, json.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agrees_with_the_vocabulary() {
        let tk = build().unwrap();
        assert_eq!(tk.vocab_size(), vocab::VOCAB_SIZE);
        for text in ["^7 14 21$", "^12 -5 x7$__", "", "  ", "^$"] {
            // The tokenizer.json itself drops what the reference drops...
            let ids = tk.inner().encode(text, false).unwrap().get_ids().to_vec();
            assert_eq!(ids, vocab::encode_text(text), "{text:?}");
            // ...and `encode` gives the same ids for text inside the vocabulary.
            if !text.contains(['-', 'x']) {
                assert_eq!(tk.encode(text).unwrap(), ids, "{text:?}");
            }
        }
        assert_eq!(tk.encode("^7 14$").unwrap(), vec![10, 7, 12, 1, 4, 11]);
        let ids = vocab::encode_values(&[7, 14, 21]);
        assert_eq!(tk.decode(&ids).unwrap(), vocab::decode(&ids));
        assert_eq!(tk.decode(&[10, 7, 12, 13]).unwrap(), "^7 _");
    }

    #[test]
    fn characters_outside_the_vocabulary_are_named_not_dropped() {
        let tk = build().unwrap();
        for (text, pos, c) in [
            ("Ú", 0, 'Ú'),
            ("^12 -5", 4, '-'),
            ("^1\n2", 2, '\n'),
            ("^1 2\t", 4, '\t'),
            ("^😀", 1, '😀'),
        ] {
            let e = tk.encode(text).unwrap_err().to_string();
            assert!(
                e.contains(&format!("{c:?}")) && e.contains(&format!("at position {pos} ")),
                "{text:?}: {e}"
            );
            assert!(e.starts_with("invalid prompt:"), "{e}");
        }
        let e = tk
            .encode_field("sequences[2]", "^1x")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("sequences[2]") && e.contains("'x' (U+0078) at position 2"),
            "{e}"
        );
    }

    #[test]
    fn survives_a_json_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        write(&path).unwrap();
        let back = Tokenizer::from_file(&path).unwrap();
        assert_eq!(back.encode("^7 14$").unwrap(), vec![10, 7, 12, 1, 4, 11]);
        assert_eq!(back.decode(&[10, 1, 12, 11]).unwrap(), "^1 $");
    }
}

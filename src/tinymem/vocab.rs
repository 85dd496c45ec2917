//! The TinyMem math vocabulary: 14 character-level tokens (spec §1.1).
//!
//! Ids 0–9 are the digits, 10 is BOS `'^'`, 11 is EOS `'$'`, 12 is the separator `' '` and
//! 13 is PAD, which has no character in the reference tokenizer and is shown as `'_'` here.
//! A sequence of values is written as `"^" + " ".join(values) + "$"`, one token per character.
//!
//! Invariants:
//! - Any other character (notably a `'-'` sign) is silently dropped, exactly as the reference
//!   does, so −1 encodes like 1.
//! - Every id this module produces is `< VOCAB_SIZE`.
//! - [`encode_values`] never pads; [`pad_to`] never truncates (it errors instead).
//! - [`decode`] is total (ids `>= VOCAB_SIZE` are shown as `'?'`), so it is safe on untrusted
//!   ids.

use thiserror::Error;

/// Number of tokens in the math vocabulary.
pub const VOCAB_SIZE: usize = 14;
/// Beginning of sequence, `'^'`; always at position 0.
pub const BOS: u32 = 10;
/// End of sequence, `'$'`; right after the last number.
pub const EOS: u32 = 11;
/// Separator between numbers, `' '`.
pub const SEP: u32 = 12;
/// Padding; right-fills a sequence up to `max_ctx`. Shown as [`PAD_CHAR`].
pub const PAD: u32 = 13;
/// How PAD is shown by [`decode`] and read by [`encode_text`] (a lethe extension: the reference
/// tokenizer has no character for PAD and would drop `'_'`).
pub const PAD_CHAR: char = '_';
/// Context length used by every TinyMem run (the model's `n_positions`).
pub const MAX_CTX: usize = 150;

/// Errors from vocabulary operations.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum VocabError {
    /// The sequence is longer than the context it must be padded to.
    #[error("sequence of {len} tokens does not fit max_ctx = {max_ctx}")]
    TooLong { len: usize, max_ctx: usize },
}

/// The token id of one character, or `None` for a character outside the vocabulary.
/// `'_'` maps to [`PAD`] (see [`PAD_CHAR`]).
pub fn char_to_id(c: char) -> Option<u32> {
    match c {
        '0'..='9' => Some(c as u32 - '0' as u32),
        '^' => Some(BOS),
        '$' => Some(EOS),
        ' ' => Some(SEP),
        PAD_CHAR => Some(PAD),
        _ => None,
    }
}

/// The character shown for a token id; `'?'` for ids outside the vocabulary.
pub fn id_to_char(id: u32) -> char {
    match id {
        0..=9 => char::from(b'0' + id as u8),
        BOS => '^',
        EOS => '$',
        SEP => ' ',
        PAD => PAD_CHAR,
        _ => '?',
    }
}

/// Appends the decimal digits of `v` (one token each) to `out`.
fn push_digits(out: &mut Vec<u32>, mut v: u64) {
    let mut buf = [0u32; 20];
    let mut n = 0;
    loop {
        buf[n] = (v % 10) as u32;
        n += 1;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    out.extend(buf[..n].iter().rev());
}

/// Tokenizes `"^" + " ".join(str(v) for v in values) + "$"`, not padded.
///
/// A minus sign is not in the vocabulary and is dropped, so a negative value encodes as its
/// absolute value (spec §1.1, §6 item 16).
pub fn encode_values(values: &[i64]) -> Vec<u32> {
    let mut out = Vec::with_capacity(2 + values.len() * 6);
    out.push(BOS);
    for (k, &v) in values.iter().enumerate() {
        if k > 0 {
            out.push(SEP);
        }
        push_digits(&mut out, v.unsigned_abs());
    }
    out.push(EOS);
    out
}

/// Right-pads `ids` with [`PAD`] to exactly `max_ctx` tokens; errors (never truncates) when
/// `ids` is already longer.
pub fn pad_to(mut ids: Vec<u32>, max_ctx: usize) -> Result<Vec<u32>, VocabError> {
    if ids.len() > max_ctx {
        return Err(VocabError::TooLong {
            len: ids.len(),
            max_ctx,
        });
    }
    ids.resize(max_ctx, PAD);
    Ok(ids)
}

/// Tokenizes text character by character; characters outside the vocabulary are dropped.
/// Not padded. `decode(&encode_text(s)) == s` for any `s` built from vocabulary characters.
pub fn encode_text(text: &str) -> Vec<u32> {
    text.chars().filter_map(char_to_id).collect()
}

/// Shows ids as text: PAD as `'_'`, ids `>= VOCAB_SIZE` as `'?'` (decode is for display and
/// never fails).
pub fn decode(ids: &[u32]) -> String {
    ids.iter().map(|&id| id_to_char(id)).collect()
}

/// Length of `ids` without its trailing PAD tokens (the "real" length of a padded row).
pub fn unpadded_len(ids: &[u32]) -> usize {
    ids.iter().rposition(|&id| id != PAD).map_or(0, |p| p + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vocabulary_ids_match_the_spec_table() {
        assert_eq!(VOCAB_SIZE, 14);
        assert_eq!((BOS, EOS, SEP, PAD), (10, 11, 12, 13));
        assert_eq!(MAX_CTX, 150);
        for d in 0..10u32 {
            assert_eq!(char_to_id(char::from_digit(d, 10).unwrap()), Some(d));
        }
        assert_eq!(char_to_id('^'), Some(10));
        assert_eq!(char_to_id('$'), Some(11));
        assert_eq!(char_to_id(' '), Some(12));
        assert_eq!(char_to_id('_'), Some(13));
        assert_eq!(char_to_id('-'), None);
        assert_eq!(char_to_id('a'), None);
    }

    #[test]
    fn encode_values_example() {
        assert_eq!(encode_values(&[7, 14]), vec![10, 7, 12, 1, 4, 11]);
        assert_eq!(encode_values(&[0]), vec![10, 0, 11]);
        assert_eq!(encode_values(&[]), vec![10, 11]);
        assert_eq!(encode_values(&[20139]), vec![10, 2, 0, 1, 3, 9, 11]);
    }

    #[test]
    fn minus_sign_is_dropped() {
        assert_eq!(encode_values(&[-1, 5]), encode_values(&[1, 5]));
        assert_eq!(encode_text("^-1 5$"), encode_values(&[1, 5]));
        assert_eq!(
            encode_values(&[i64::MIN]),
            encode_text("^9223372036854775808$")
        );
    }

    #[test]
    fn pad_to_pads_and_refuses_to_truncate() {
        let ids = encode_values(&[7, 14]);
        let padded = pad_to(ids.clone(), 10).unwrap();
        assert_eq!(padded, vec![10, 7, 12, 1, 4, 11, 13, 13, 13, 13]);
        assert_eq!(pad_to(ids.clone(), 6).unwrap(), ids);
        assert_eq!(
            pad_to(ids, 5),
            Err(VocabError::TooLong { len: 6, max_ctx: 5 })
        );
    }

    #[test]
    fn encode_text_drops_unknown_characters() {
        assert_eq!(encode_text("^7 x14$"), vec![10, 7, 12, 1, 4, 11]);
        assert_eq!(encode_text(""), Vec::<u32>::new());
    }

    #[test]
    fn decode_shows_pad_and_unknown_ids() {
        assert_eq!(decode(&[10, 7, 12, 1, 4, 11, 13, 13]), "^7 14$__");
        assert_eq!(decode(&[10, 14, 999, 11]), "^??$");
        let s = "^12 3$___";
        assert_eq!(decode(&encode_text(s)), s);
    }

    #[test]
    fn unpadded_len_ignores_trailing_pad_only() {
        assert_eq!(
            unpadded_len(&pad_to(encode_values(&[7, 14]), 150).unwrap()),
            6
        );
        assert_eq!(unpadded_len(&[13, 13]), 0);
        assert_eq!(unpadded_len(&[]), 0);
        assert_eq!(unpadded_len(&[10, 13, 2]), 3);
    }
}

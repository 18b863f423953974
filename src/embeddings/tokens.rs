//! Token counts: for per-input limits checked before batching, for the per-call token cap, and
//! for each caller's `usage`, which must not depend on whom it was batched with or whether its
//! answer came from the cache.
//!
//! OpenAI's embedding models use cl100k_base, counted exactly (GitHub's `bpe` with OpenAI's
//! tables: the same counts as tiktoken, faster; tests compare it with tiktoken-rs). For
//! other models (OpenAI-compatible servers with their own tokenizers) the upstream's reported
//! total for a call is shared among its inputs in proportion to an estimate, so the parts add
//! up to what the upstream billed.

use std::{collections::HashSet, sync::OnceLock};

use bpe_openai::Tokenizer as Bpe;

use super::request::Input;

/// Bytes per token assumed when estimating text of an unknown tokenizer (OpenAI's rule of thumb
/// for English).
const BYTES_PER_TOKEN_ESTIMATE: usize = 4;

#[derive(Clone, Copy)]
pub enum Tokenizer {
    Exact(&'static Cl100k),
    Unknown,
}

/// cl100k_base, with tiktoken's own shortcut: a pre-tokenized piece that is a token as a whole
/// is one token, without running the byte-pair merge (which allocates per piece). Most pieces
/// of ordinary text are whole words that are tokens, so most of the merge work is skipped (the
/// pre-tokenizing regex is most of what is left; figures in benches/README.md). tiktoken
/// encodes such a piece the same way, so the counts stay tiktoken's.
pub struct Cl100k {
    bpe: &'static Bpe,
    /// The bytes of every token (about 100,000; 2 MiB).
    whole: HashSet<&'static [u8], foldhash::fast::RandomState>,
}

/// The cl100k tables, once loaded.
static CL100K: OnceLock<Cl100k> = OnceLock::new();

impl Cl100k {
    fn get() -> &'static Cl100k {
        CL100K.get_or_init(|| {
            let bpe = bpe_openai::cl100k_base();
            let whole = (0..bpe.bpe.num_tokens())
                .filter_map(|id| u32::try_from(id).ok())
                .map(|id| bpe.bpe.token_bytes(id))
                .collect();
            Cl100k { bpe, whole }
        })
    }

    fn count(&self, text: &str) -> usize {
        let text = self.bpe.normalize(text);
        self.bpe
            .split(text.as_str())
            .map(|piece| match self.whole.contains(piece.as_bytes()) {
                true => 1,
                false => self.bpe.bpe.count(piece.as_bytes()),
            })
            .sum()
    }
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Tokenizer::Exact(_) => f.write_str("cl100k_base"),
            Tokenizer::Unknown => f.write_str("unknown"),
        }
    }
}

/// Whether `model` (or an Azure deployment named after one) is an OpenAI embedding model, all of
/// which use cl100k_base.
pub fn uses_cl100k(model: &str) -> bool {
    model.contains("text-embedding-3") || model.contains("text-embedding-ada-002")
}

/// Loads the cl100k tables at start, on a blocking thread, when the engine is on: the first
/// callers after a start (a new pod, often under the very burst that scaled it out) would
/// otherwise wait for them, a second or more of their deadline on a busy machine.
pub fn preload() {
    tokio::task::spawn_blocking(|| {
        Cl100k::get();
    });
}

/// Whether the cl100k tables are loaded (readiness waits for them when the engine is on).
pub fn loaded() -> bool {
    CL100K.get().is_some()
}

/// Loads the cl100k tables if a request needs them before `preload` is done, on a blocking
/// thread, so loading never stalls an async worker.
pub async fn load_for(model: Option<&str>) {
    if CL100K.get().is_some() || !model.is_some_and(uses_cl100k) {
        return;
    }
    let _ = tokio::task::spawn_blocking(|| {
        Cl100k::get();
    })
    .await;
}

impl Tokenizer {
    pub fn for_model(model: Option<&str>) -> Tokenizer {
        match model {
            Some(m) if uses_cl100k(m) => Tokenizer::Exact(Cl100k::get()),
            _ => Tokenizer::Unknown,
        }
    }

    /// The exact count, when this tokenizer is known. Token-id inputs count their ids.
    pub fn count(&self, input: &Input) -> Option<u64> {
        match (self, input) {
            (_, Input::Tokens(ids)) => Some(ids.len() as u64),
            (Tokenizer::Exact(bpe), Input::Text(s)) => Some(bpe.count(s) as u64),
            (Tokenizer::Unknown, Input::Text(_)) => None,
        }
    }
}

pub fn estimate(input: &Input) -> u64 {
    match input {
        Input::Tokens(ids) => ids.len() as u64,
        Input::Text(s) => s.len().div_ceil(BYTES_PER_TOKEN_ESTIMATE).max(1) as u64,
    }
}

/// Splits `total` into integer parts proportional to `weights` that add up to `total` exactly
/// (largest remainder method).
pub fn apportion(total: u64, weights: &[u64]) -> Vec<u64> {
    let sum: u64 = weights.iter().sum();
    if weights.is_empty() {
        return Vec::new();
    }
    if sum == 0 {
        let mut parts = vec![total / weights.len() as u64; weights.len()];
        let rest = total - parts.iter().sum::<u64>();
        for p in parts.iter_mut().take(rest as usize) {
            *p += 1;
        }
        return parts;
    }
    let exact: Vec<(u64, u128)> = weights
        .iter()
        .map(|&w| {
            let scaled = u128::from(total) * u128::from(w);
            ((scaled / u128::from(sum)) as u64, scaled % u128::from(sum))
        })
        .collect();
    let mut parts: Vec<u64> = exact.iter().map(|(q, _)| *q).collect();
    let mut rest = total - parts.iter().sum::<u64>();
    let mut order: Vec<usize> = (0..weights.len()).collect();
    order.sort_by(|&a, &b| exact[b].1.cmp(&exact[a].1).then(a.cmp(&b)));
    for i in order {
        if rest == 0 {
            break;
        }
        parts[i] += 1;
        rest -= 1;
    }
    parts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openai_models_are_counted_exactly_with_cl100k() {
        let t = Tokenizer::for_model(Some("text-embedding-3-small"));
        // "hello world" is two cl100k tokens; OpenAI bills it as 2.
        assert_eq!(t.count(&Input::Text("hello world".into())), Some(2));
        assert_eq!(t.count(&Input::Tokens(vec![1, 2, 3])), Some(3));
        let azure = Tokenizer::for_model(Some("my-text-embedding-ada-002-deployment"));
        assert!(matches!(azure, Tokenizer::Exact(_)));
    }

    #[test]
    fn counts_are_tiktokens_on_awkward_text() {
        let t = Tokenizer::for_model(Some("text-embedding-3-small"));
        let tiktoken = tiktoken_rs::cl100k_base_singleton();
        let long = "word ".repeat(3000);
        for s in [
            "",
            "  leading and trailing   ",
            "a\n\n\tb",
            "日本語のテキスト",
            "emoji 🎉🎉 ok",
            "don't won't I'll 's 're 've 'm 'll 'd",
            "1234567890123 3.14159",
            "https://example.com/a?b=c#d",
            "CamelCaseWordsHere",
            "   \t\n  ",
            &long,
        ] {
            assert_eq!(
                t.count(&Input::Text(s.into())),
                Some(tiktoken.encode_ordinary(s).len() as u64),
                "{s:?}"
            );
        }
    }

    #[test]
    fn counts_are_tiktokens_on_thousands_of_generated_texts() {
        // Words that are tokens, words that are not, rare scripts, digits, punctuation and
        // whitespace runs, mixed at random: both ways of counting a piece get exercised.
        const PARTS: [&str; 24] = [
            "the",
            " the",
            " food",
            " was",
            " delicious",
            "Zyxwvut",
            " qqqqq",
            "embedcar",
            "日本",
            "語",
            "🎉",
            "é",
            "ñ",
            "12",
            "345678",
            ".",
            ",",
            "'s",
            "'LL",
            "  ",
            "\n",
            "\t ",
            "-->",
            "::",
        ];
        let t = Tokenizer::for_model(Some("text-embedding-3-small"));
        let tiktoken = tiktoken_rs::cl100k_base_singleton();
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        for _ in 0..3000 {
            let mut text = String::new();
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            for k in 0..(state % 12) {
                let pick = (state >> (4 * k)) as usize % PARTS.len();
                text.push_str(PARTS[pick]);
            }
            assert_eq!(
                t.count(&Input::Text(text.clone())),
                Some(tiktoken.encode_ordinary(&text).len() as u64),
                "{text:?}"
            );
        }
    }

    #[test]
    fn other_models_estimate_text_but_count_token_ids() {
        let t = Tokenizer::for_model(Some("bge-large"));
        assert_eq!(t.count(&Input::Text("abcdefgh".into())), None);
        assert_eq!(estimate(&Input::Text("abcdefgh".into())), 2);
        assert_eq!(t.count(&Input::Tokens(vec![5; 7])), Some(7));
    }

    #[test]
    fn apportioned_parts_add_up_to_the_total() {
        assert_eq!(apportion(10, &[1, 1, 1]), vec![4, 3, 3]);
        assert_eq!(apportion(7, &[2, 0, 5]), vec![2, 0, 5]);
        assert_eq!(apportion(3, &[0, 0]), vec![2, 1]);
        for total in [0u64, 1, 17, 1000] {
            let w = [3, 9, 1, 27, 4];
            assert_eq!(apportion(total, &w).iter().sum::<u64>(), total);
        }
        assert!(apportion(5, &[]).is_empty());
    }
}

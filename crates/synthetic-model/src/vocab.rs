//! A byte-level BPE vocabulary shaped like Qwen3's (llama.cpp `gpt2` model, `qwen2` pre-tokenizer).
//!
//! The 256 byte tokens make every string tokenizable. On top, merges are learned at build
//! time from a list of common English words, so a random model's argmax picks often decode
//! to words instead of byte soup, and prompts tokenize into realistic-looking pieces. The
//! full-size vocabulary is padded with made-up syllable words to Qwen3's size. The special
//! tokens keep their exact Qwen3 / MiniCPM-o strings because llama.cpp and mtmd find them by
//! text: `<|im_end|>` ends a turn, `<image>`/`<slice>` frame image embeddings.

use std::collections::{HashMap, HashSet};

/// llama.cpp `LLAMA_TOKEN_TYPE_*` values.
const NORMAL: i32 = 1;
const CONTROL: i32 = 3;

/// Special tokens, placed at the end of the vocabulary in this order.
pub const SPECIALS: [&str; 12] = [
    ENDOFTEXT,
    IM_START,
    IM_END,
    "<think>",
    "</think>",
    "<image>",
    "</image>",
    "<slice>",
    "</slice>",
    "<image_id>",
    "</image_id>",
    UNK,
];
pub const ENDOFTEXT: &str = "<|endoftext|>";
pub const IM_START: &str = "<|im_start|>";
pub const IM_END: &str = "<|im_end|>";
pub const UNK: &str = "<unk>";

/// Smallest vocabulary that holds the byte tokens and the specials.
pub const MIN_VOCAB: u32 = 256 + SPECIALS.len() as u32;

/// ChatML, which llama.cpp's `llama_chat_apply_template` recognises by `<|im_start|>`.
pub const CHAT_TEMPLATE: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

pub struct Vocab {
    pub tokens: Vec<String>,
    pub types: Vec<i32>,
    pub merges: Vec<String>,
}

impl Vocab {
    /// Builds a vocabulary of exactly `n_vocab` tokens (`n_vocab >= MIN_VOCAB`).
    pub fn build(n_vocab: u32) -> Vocab {
        assert!(n_vocab >= MIN_VOCAB);
        let n_normal = (n_vocab - SPECIALS.len() as u32) as usize;
        let bytes = byte_chars();
        let mut tokens: Vec<String> = bytes.iter().map(|c| c.to_string()).collect();
        let mut seen: HashSet<String> = tokens.iter().cloned().collect();

        let merges = learn_merges(&bytes, n_normal - tokens.len(), &mut tokens, &mut seen);

        let mut i = 0u64;
        while tokens.len() < n_normal {
            let word = syllable_word(i);
            i += 1;
            if seen.insert(word.clone()) {
                tokens.push(word);
            }
        }
        let mut types = vec![NORMAL; tokens.len()];
        tokens.extend(SPECIALS.iter().map(|s| s.to_string()));
        types.resize(tokens.len(), CONTROL);
        Vocab {
            tokens,
            types,
            merges,
        }
    }

    /// Ids of the word tokens: after the 256 byte tokens, before the specials.
    pub fn words(&self) -> std::ops::Range<u64> {
        256..(self.tokens.len() - SPECIALS.len()) as u64
    }

    /// The id of a special token.
    pub fn id(&self, special: &str) -> u32 {
        let at = SPECIALS
            .iter()
            .position(|s| *s == special)
            .expect("a special token");
        (self.tokens.len() - SPECIALS.len() + at) as u32
    }
}

/// GPT-2's reversible byte-to-unicode mapping: printable bytes stand for themselves, the
/// rest (space, newline, controls...) map to code points from U+0100 up, so ' ' is 'Ġ'.
fn byte_chars() -> Vec<char> {
    let printable = |b: u32| {
        (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b)
    };
    let mut next = 0x100;
    (0..256u32)
        .map(|b| {
            if printable(b) {
                char::from_u32(b).unwrap()
            } else {
                next += 1;
                char::from_u32(next - 1).unwrap()
            }
        })
        .collect()
}

/// Byte-pair-encoding training over [`WORDS`] (each preceded by a space, as text has them),
/// most common words weighted highest. Stops after `max` new tokens or when nothing is left
/// to merge. Deterministic: ties break on the pair's text.
fn learn_merges(
    bytes: &[char],
    max: usize,
    tokens: &mut Vec<String>,
    seen: &mut HashSet<String>,
) -> Vec<String> {
    let space = bytes[b' ' as usize];
    let mut words: Vec<(Vec<String>, u64)> = WORDS
        .iter()
        .enumerate()
        .map(|(rank, w)| {
            let symbols = std::iter::once(space)
                .chain(w.chars())
                .map(String::from)
                .collect();
            (symbols, (WORDS.len() - rank) as u64)
        })
        .collect();
    let mut merges = Vec::new();
    let mut added = 0;
    while added < max {
        let mut counts: HashMap<(&str, &str), u64> = HashMap::new();
        for (symbols, weight) in &words {
            for pair in symbols.windows(2) {
                *counts.entry((&pair[0], &pair[1])).or_default() += weight;
            }
        }
        let Some(((a, b), _)) = counts
            .into_iter()
            .max_by(|(p, n), (q, m)| n.cmp(m).then_with(|| q.cmp(p)))
        else {
            break;
        };
        let (a, b) = (a.to_string(), b.to_string());
        let joined = format!("{a}{b}");
        for (symbols, _) in &mut words {
            let mut i = 0;
            while i + 1 < symbols.len() {
                if symbols[i] == a && symbols[i + 1] == b {
                    symbols[i] = joined.clone();
                    symbols.remove(i + 1);
                }
                i += 1;
            }
        }
        merges.push(format!("{a} {b}"));
        if seen.insert(joined.clone()) {
            tokens.push(joined);
            added += 1;
        }
    }
    merges
}

/// The `i`th made-up word: consonant-vowel syllables after a space, e.g. "Ġbaku".
fn syllable_word(mut i: u64) -> String {
    const C: &[u8] = b"bdfghklmnprstvz";
    const V: &[u8] = b"aeiou";
    let base = (C.len() * V.len()) as u64;
    let mut w = String::from("Ġ");
    loop {
        let s = (i % base) as usize;
        w.push(C[s / V.len()] as char);
        w.push(V[s % V.len()] as char);
        i /= base;
        if i == 0 {
            return w;
        }
        i -= 1;
    }
}

/// Common English words, most frequent first, plus words a video commentary would use.
const WORDS: &[&str] = &[
    "the", "of", "and", "to", "a", "in", "is", "it", "you", "that", "he", "was", "for", "on",
    "are", "with", "as", "his", "they", "be", "at", "one", "have", "this", "from", "or", "had",
    "by", "not", "word", "but", "what", "some", "we", "can", "out", "other", "were", "all",
    "there", "when", "up", "use", "your", "how", "said", "an", "each", "she", "which", "do",
    "their", "time", "if", "will", "way", "about", "many", "then", "them", "write", "would",
    "like", "so", "these", "her", "long", "make", "thing", "see", "him", "two", "has", "look",
    "more", "day", "could", "go", "come", "did", "number", "sound", "no", "most", "people", "my",
    "over", "know", "water", "than", "call", "first", "who", "may", "down", "side", "been", "now",
    "find", "any", "new", "work", "part", "take", "get", "place", "made", "live", "where", "after",
    "back", "little", "only", "round", "man", "year", "came", "show", "every", "good", "me",
    "give", "our", "under", "name", "very", "through", "just", "form", "great", "think", "say",
    "help", "low", "line", "turn", "cause", "much", "mean", "before", "move", "right", "boy",
    "old", "too", "same", "tell", "does", "set", "three", "want", "air", "well", "also", "play",
    "small", "end", "put", "home", "read", "hand", "large", "add", "even", "land", "here", "must",
    "big", "high", "such", "follow", "act", "why", "ask", "men", "change", "went", "light", "kind",
    "off", "need", "house", "picture", "try", "us", "again", "animal", "point", "mother", "world",
    "near", "build", "self", "earth", "father", "head", "stand", "own", "page", "should",
    "country", "found", "answer", "school", "grow", "study", "still", "learn", "plant", "cover",
    "food", "sun", "four", "between", "state", "keep", "eye", "never", "last", "let", "thought",
    "city", "tree", "cross", "farm", "hard", "start", "might", "story", "saw", "far", "sea",
    "draw", "left", "late", "run", "while", "close", "night", "real", "life", "few", "north",
    "open", "seem", "together", "next", "white", "children", "begin", "walk", "example", "paper",
    "group", "always", "music", "those", "both", "mark", "often", "letter", "until", "mile",
    "river", "car", "feet", "care", "second", "book", "carry", "took", "science", "eat", "room",
    "friend", "began", "idea", "fish", "mountain", "stop", "once", "base", "hear", "horse", "cut",
    "sure", "watch", "color", "face", "wood", "main", "enough", "plain", "girl", "usual", "young",
    "ready", "above", "ever", "red", "list", "though", "feel", "talk", "bird", "soon", "body",
    "dog", "family", "direct", "pose", "leave", "song", "measure", "door", "product", "black",
    "short", "class", "wind", "question", "happen", "complete", "ship", "area", "half", "rock",
    "order", "fire", "south", "problem", "piece", "told", "knew", "pass", "since", "top", "whole",
    "king", "space", "heard", "best", "hour", "better", "true", "during", "hundred", "five",
    "remember", "step", "early", "hold", "west", "ground", "interest", "reach", "fast", "verb",
    "sing", "listen", "six", "table", "travel", "less", "morning", "ten", "simple", "several",
    "toward", "war", "lay", "against", "pattern", "slow", "center", "love", "person", "money",
    "serve", "appear", "road", "map", "rain", "rule", "pull", "cold", "notice", "voice", "power",
    "town", "fine", "drive", "street", "player", "ball", "goal", "team", "game", "camera",
    "screen", "video", "frame", "scene", "moving", "running", "walking", "standing", "sitting",
    "holding", "looking", "blue", "green", "yellow", "bright", "dark", "sky", "cloud", "window",
    "wall", "floor", "chair", "phone", "bike", "bus", "train", "crowd", "field", "grass", "shirt",
    "hat", "smile", "wave", "jump", "quick", "slowly", "behind", "front", "across", "into", "onto",
    "around", "busy",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_follow_gpt2_mapping() {
        let b = byte_chars();
        assert_eq!(b.len(), 256);
        assert_eq!(b[b' ' as usize], 'Ġ');
        assert_eq!(b[b'\n' as usize], 'Ċ');
        assert_eq!(b[b'a' as usize], 'a');
        assert_eq!(b[0], 'Ā');
        assert_eq!(b.iter().collect::<HashSet<_>>().len(), 256);
    }

    #[test]
    fn tiny_and_full_vocabularies_are_exact_unique_and_mergeable() {
        for n in [MIN_VOCAB, 512, 151_748] {
            let v = Vocab::build(n);
            assert_eq!(v.tokens.len(), n as usize);
            assert_eq!(v.types.len(), n as usize);
            assert_eq!(
                v.tokens.iter().collect::<HashSet<_>>().len(),
                n as usize,
                "unique"
            );
            assert!(v.tokens.iter().all(|t| !t.is_empty()));
            for special in SPECIALS {
                let id = v.id(special) as usize;
                assert_eq!(v.tokens[id], special);
                assert_eq!(v.types[id], CONTROL);
            }
            // llama.cpp needs every merge result to be a token and merges to be "a b".
            let known: HashSet<&str> = v.tokens.iter().map(String::as_str).collect();
            for m in &v.merges {
                let (a, b) = m.split_once(' ').expect("merge has a space");
                assert!(known.contains(a) && known.contains(b), "{m}");
                assert!(known.contains(format!("{a}{b}").as_str()), "{m}");
            }
        }
    }

    #[test]
    fn merges_learn_common_words() {
        let v = Vocab::build(151_748);
        for w in ["Ġthe", "Ġand", "Ġplayer", "Ġcamera"] {
            assert!(v.tokens.iter().any(|t| t == w), "{w}");
        }
        assert!(v.merges.len() > 500);
    }
}

//! Stream ids: short, URL-safe names chosen by the user (`door`, `game`) or given in order
//! (`s1`, `s2`…). They appear in routes (`/api/streams/{id}/mjpeg`), metric labels and file
//! names, so the alphabet is kept to what needs no escaping anywhere.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Longest id, in characters.
pub const MAX_ID_LEN: usize = 32;

/// A checked stream id: `[a-z0-9_-]{1,32}`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct StreamId(String);

impl StreamId {
    pub fn new(id: &str) -> Result<StreamId, String> {
        let ok = !id.is_empty()
            && id.len() <= MAX_ID_LEN
            && id
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
        if ok {
            Ok(StreamId(id.to_string()))
        } else {
            Err(format!(
                "'{}' is not a stream id: use 1 to {MAX_ID_LEN} of a-z, 0-9, '_' and '-'",
                id.chars().take(40).collect::<String>()
            ))
        }
    }

    /// The `n`-th automatic id: `s1`, `s2`, …
    pub fn nth(n: usize) -> StreamId {
        StreamId(format!("s{n}"))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for StreamId {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        StreamId::new(&s)
    }
}

impl From<StreamId> for String {
    fn from(id: StreamId) -> String {
        id.0
    }
}

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::borrow::Borrow<str> for StreamId {
    fn borrow(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alphabet_and_length() {
        for good in ["a", "door", "cam_2", "s-1", &"x".repeat(32)] {
            assert!(StreamId::new(good).is_ok(), "{good}");
        }
        for bad in ["", "Door", "a b", "a/b", "é", "../x", &"x".repeat(33)] {
            let err = StreamId::new(bad).unwrap_err();
            assert!(err.contains("not a stream id"), "{err}");
        }
        assert_eq!(StreamId::nth(3).as_str(), "s3");
    }

    #[test]
    fn serde_checks_too() {
        assert!(serde_json::from_str::<StreamId>("\"ok\"").is_ok());
        assert!(serde_json::from_str::<StreamId>("\"NOT OK\"").is_err());
    }
}

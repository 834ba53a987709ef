//! The embeddings of recent image chunks, kept by picture.

use std::collections::VecDeque;
use std::sync::Arc;

/// A picture's content key and the slice number within it.
pub(super) type ChunkKey = (String, usize);

/// The embeddings of recent image chunks, oldest dropped first: a frame is encoded once,
/// whether it comes pushed, in a request, or again after a rebuild.
pub(super) struct EmbeddingCache {
    pub(super) entries: VecDeque<(ChunkKey, Arc<Vec<f32>>)>,
    capacity: usize,
}

impl EmbeddingCache {
    pub(super) fn new(capacity: usize) -> EmbeddingCache {
        EmbeddingCache {
            entries: VecDeque::new(),
            capacity,
        }
    }

    pub(super) fn get(&self, key: &ChunkKey) -> Option<Arc<Vec<f32>>> {
        self.entries
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
    }

    pub(super) fn insert(&mut self, key: ChunkKey, value: Arc<Vec<f32>>) {
        if self.entries.len() == self.capacity {
            self.entries.pop_front();
        }
        self.entries.push_back((key, value));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oldest_entry_leaves_first_and_the_newest_copy_wins() {
        let mut cache = EmbeddingCache::new(2);
        let key = |n: &str| (n.to_string(), 0);
        cache.insert(key("a"), Arc::new(vec![1.0]));
        cache.insert(key("b"), Arc::new(vec![2.0]));
        cache.insert(key("a"), Arc::new(vec![3.0]));
        assert_eq!(cache.get(&key("a")).as_deref(), Some(&vec![3.0]));
        assert_eq!(cache.get(&key("b")).as_deref(), Some(&vec![2.0]));
        cache.insert(key("c"), Arc::new(vec![4.0]));
        assert_eq!(cache.entries.len(), 2);
        assert!(cache.get(&key("b")).is_none(), "b was the oldest left");
        assert!(
            cache.get(&(String::from("c"), 1)).is_none(),
            "another slice"
        );
    }
}

//! State an output keeps per stream, reachable from the stream's handle by its type (the
//! alert rules the API edits, the rules' triggers): the stream holds it without knowing
//! what it is, so a new output adds its own without a field here (`http::Extensions`'
//! shape).

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

type Entry = Arc<dyn Any + Send + Sync>;

#[derive(Default)]
pub(crate) struct Extensions {
    entries: Mutex<HashMap<TypeId, Entry>>,
}

impl Extensions {
    /// The stream's one `T`, made with `T::default()` the first time it is asked for.
    pub(crate) fn get<T: Default + Send + Sync + 'static>(&self) -> Arc<T> {
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        let entry = entries
            .entry(TypeId::of::<T>())
            .or_insert_with(|| Arc::new(T::default()) as Entry)
            .clone();
        entry
            .downcast::<T>()
            .expect("an entry is stored under its own type's id")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_value_per_type() {
        let extensions = Extensions::default();
        let a = extensions.get::<Mutex<Vec<u32>>>();
        a.lock().unwrap().push(7);
        assert_eq!(*extensions.get::<Mutex<Vec<u32>>>().lock().unwrap(), [7]);
        assert_eq!(*extensions.get::<Mutex<u32>>().lock().unwrap(), 0);
    }
}

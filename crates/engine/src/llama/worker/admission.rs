//! Admission: which waiting requests start now, and whose sequence they take.
//!
//! A pure function over what waits and what the sequences are doing; the worker applies
//! its answer. Requests are taken best first (priority, then arrival). One starts when its
//! stream's sequence is idle (no answer running, nothing queued); a stream without a
//! sequence takes a free one, or else the sequence of the stream idle longest that nothing
//! waits for (that stream starts over at its next request). With a shared system piece,
//! a request whose sequence must get its system piece waits while another sequence is
//! still evaluating the same piece, so the piece is evaluated once and copied to the
//! others (see `Worker::share_system`) instead of once per stream in the same step.

use std::hash::{Hash, Hasher};
use std::time::Instant;

use super::sequence::Seq;
use super::{key, Waiting, Worker};
use crate::EngineError;

impl Worker {
    /// Starts waiting requests whose sequences are idle, best first.
    pub(super) fn admit(&mut self) {
        if self.waiting.is_empty() {
            return;
        }
        self.waiting.sort_by_key(|w| (w.job.priority, w.serial));
        let wants: Vec<Want> = self
            .waiting
            .iter()
            .map(|w| Want {
                stream: key(&w.job),
                system: system_hash(&w.job.request.system),
            })
            .collect();
        let mut slots: Vec<Slot> = self
            .seqs
            .iter()
            .map(|(&stream, s)| Slot {
                stream,
                idle: s.idle(),
                last_used: s.last_used,
                system: s
                    .system
                    .as_deref()
                    .map(|t| (system_hash(t), s.next_pos >= s.sys_len)),
            })
            .collect();
        // The template counts as a sequence that holds its piece evaluated and never idles.
        if let Some((system, _)) = self.template.as_ref().and_then(|t| t.system.as_ref()) {
            slots.push(Slot {
                stream: TEMPLATE,
                idle: false,
                last_used: Instant::now(),
                system: Some((system_hash(system), true)),
            });
        }
        let starts = admit(&wants, &slots, self.free.len(), self.template.is_some());
        if starts.is_empty() {
            return;
        }
        let mut taken: Vec<Option<Waiting>> = std::mem::take(&mut self.waiting)
            .into_iter()
            .map(Some)
            .collect();
        for Start { index, evict } in starts {
            if let Some(victim) = evict {
                self.release(victim);
            }
            let Some(Waiting { serial, job }) = taken[index].take() else {
                continue;
            };
            let stream = key(&job);
            if !self.seqs.contains_key(&stream) {
                let Some(id) = self.free.pop() else {
                    taken[index] = Some(Waiting { serial, job });
                    continue;
                };
                self.seqs.insert(stream, Seq::new(id, self.window));
            }
            let tx = job.tx.clone();
            if let Err(e) = self.start(stream, serial, job) {
                fail_start(&self.in_flight, &tx, e);
            }
        }
        self.waiting = taken.into_iter().flatten().collect();
    }
}

/// The template's place among the slots (no stream has this id: `ANONYMOUS` is `u64::MAX`).
const TEMPLATE: u64 = u64::MAX - 1;

/// A request that could not start: its caller gets the error, and it is no longer in flight.
fn fail_start(in_flight: &std::sync::atomic::AtomicUsize, tx: &super::Reply, error: EngineError) {
    in_flight.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    let _ = tx.blocking_send(Err(error));
}

/// Names a system piece for comparison (admission compares many, often).
pub(super) fn system_hash(system: &str) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    system.hash(&mut h);
    h.finish()
}

/// A waiting request, in the order it is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Want {
    pub stream: u64,
    /// A hash of its system piece.
    pub system: u64,
}

/// A stream's sequence as admission sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    pub stream: u64,
    pub idle: bool,
    pub last_used: Instant,
    /// The hash of the system piece it holds or evaluates, and whether it is evaluated.
    pub system: Option<(u64, bool)>,
}

/// Starts the waiting request `index`, first freeing `evict`'s sequence if given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Start {
    pub index: usize,
    pub evict: Option<u64>,
}

/// What starts now, in order. `free`: sequences not in use; `share`: whether system
/// pieces are shared between sequences.
pub fn admit(wants: &[Want], slots: &[Slot], free: usize, share: bool) -> Vec<Start> {
    let mut slots: Vec<Slot> = slots.to_vec();
    let mut free = free;
    let mut starts = Vec::new();
    for (index, want) in wants.iter().enumerate() {
        let started_here = |s: &u64| starts.iter().any(|st: &Start| wants[st.index].stream == *s);
        let mut evict = None;
        match slots.iter().position(|s| s.stream == want.stream) {
            Some(i) if !slots[i].idle => continue,
            Some(_) => {}
            None if free > 0 => free -= 1,
            None => {
                let victim = slots
                    .iter()
                    .filter(|s| {
                        s.idle
                            && !started_here(&s.stream)
                            && !wants.iter().any(|w| w.stream == s.stream)
                    })
                    .min_by_key(|s| s.last_used);
                let Some(victim) = victim else {
                    continue;
                };
                evict = Some(victim.stream);
            }
        }
        let own = slots.iter().position(|s| s.stream == want.stream);
        let has_system = own.is_some_and(|i| slots[i].system.map(|(h, _)| h) == Some(want.system));
        let evaluated = slots.iter().any(|s| s.system == Some((want.system, true)));
        if share && !has_system && !evaluated {
            let pending_elsewhere = slots
                .iter()
                .any(|s| s.stream != want.stream && s.system == Some((want.system, false)));
            if pending_elsewhere {
                if own.is_none() && evict.is_none() {
                    free += 1; // the free sequence stays free
                }
                continue;
            }
        }
        if let Some(victim) = evict {
            slots.retain(|s| s.stream != victim);
        }
        // From here the sequence is busy, with this system piece (evaluated if it was, or
        // copied from an evaluated one; else evaluated by this request).
        let slot = Slot {
            stream: want.stream,
            idle: false,
            last_used: Instant::now(),
            system: Some((want.system, has_system || (share && evaluated))),
        };
        match own {
            Some(i) if evict.is_none() => slots[i] = slot,
            _ => {
                slots.retain(|s| s.stream != want.stream);
                slots.push(slot);
            }
        }
        starts.push(Start { index, evict });
    }
    starts
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn want(stream: u64) -> Want {
        Want { stream, system: 7 }
    }

    fn slot(stream: u64, idle: bool, age_s: u64) -> Slot {
        Slot {
            stream,
            idle,
            last_used: base() - Duration::from_secs(age_s),
            system: Some((7, true)),
        }
    }

    fn base() -> Instant {
        static BASE: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
        *BASE.get_or_init(|| Instant::now() + Duration::from_secs(3600))
    }

    fn indexes(starts: &[Start]) -> Vec<usize> {
        starts.iter().map(|s| s.index).collect()
    }

    #[test]
    fn an_idle_sequence_starts_and_a_busy_one_waits() {
        let slots = [slot(1, true, 0), slot(2, false, 0)];
        let starts = admit(&[want(2), want(1)], &slots, 0, false);
        assert_eq!(indexes(&starts), [1]);
        assert_eq!(starts[0].evict, None);
    }

    #[test]
    fn one_request_per_stream_at_a_time() {
        let starts = admit(&[want(1), want(1)], &[slot(1, true, 0)], 0, false);
        assert_eq!(indexes(&starts), [0]);
    }

    #[test]
    fn a_new_stream_takes_a_free_sequence_then_the_one_idle_longest() {
        let slots = [slot(1, true, 5), slot(2, true, 50), slot(3, false, 99)];
        let starts = admit(&[want(10), want(11), want(12)], &slots, 1, false);
        assert_eq!(
            starts,
            [
                Start {
                    index: 0,
                    evict: None
                },
                Start {
                    index: 1,
                    evict: Some(2)
                },
                Start {
                    index: 2,
                    evict: Some(1)
                },
            ],
            "busy stream 3 keeps its sequence"
        );
    }

    #[test]
    fn a_sequence_a_later_request_waits_for_is_not_taken() {
        let slots = [slot(1, true, 50), slot(2, true, 5)];
        let starts = admit(&[want(10), want(1)], &slots, 0, false);
        assert_eq!(
            starts,
            [
                Start {
                    index: 0,
                    evict: Some(2)
                },
                Start {
                    index: 1,
                    evict: None
                }
            ]
        );
        assert!(admit(&[want(10)], &[slot(1, false, 9)], 0, false).is_empty());
    }

    #[test]
    fn with_sharing_one_stream_evaluates_a_new_system_piece_and_the_others_wait() {
        let fresh = |stream| Want { stream, system: 9 };
        let starts = admit(&[fresh(1), fresh(2), fresh(3)], &[], 4, true);
        assert_eq!(indexes(&starts), [0], "one evaluates, two wait for it");
        // Without sharing each evaluates its own.
        assert_eq!(
            indexes(&admit(&[fresh(1), fresh(2), fresh(3)], &[], 4, false)),
            [0, 1, 2]
        );
        // Once it is evaluated the others start (and copy it).
        let evaluated = Slot {
            system: Some((9, true)),
            ..slot(1, true, 0)
        };
        assert_eq!(
            indexes(&admit(&[fresh(2), fresh(3)], &[evaluated], 3, true)),
            [0, 1]
        );
        // A stream that already holds its piece never waits.
        let pending = Slot {
            system: Some((9, false)),
            ..slot(1, false, 0)
        };
        let holds = Slot {
            system: Some((9, true)),
            ..slot(2, true, 0)
        };
        assert_eq!(
            indexes(&admit(&[fresh(2), fresh(3)], &[pending, holds], 3, true)),
            [0, 1],
            "stream 3 copies from stream 2"
        );
    }
}

//! The queue of [`crate::Durability::Buffered`] mode: events as plain copies, their strings in
//! one text buffer.
//!
//! An [`AuditEvent`]'s names are `Arc<str>`s shared with the caller's context and identity.
//! Queued as clones, every record would move those reference counts between the calling thread
//! and the writer thread (which drops them): cache-line transfers that cost more than the rest
//! of the caller's share of auditing. Copying the few short strings instead keeps each thread on
//! its own memory.

use jiff::Timestamp;
use phiseal::audit::AuditEvent;

use crate::format::RecordView;

/// Byte range of one string in [`QueuedEvents::text`].
#[derive(Debug, Clone, Copy)]
struct Span {
    start: usize,
    end: usize,
}

/// One queued event: its fixed-size members, and spans for its strings.
#[derive(Debug, Clone, Copy)]
struct QueuedEvent {
    time: Timestamp,
    uid: Option<u32>,
    pid: Option<u32>,
    action: &'static str,
    key_version: Option<u32>,
    from_key_version: Option<u32>,
    key_source: Option<&'static str>,
    result: &'static str,
    actor: Span,
    tenant: Option<Span>,
    field: Option<Span>,
    record: Option<Span>,
    root_key: Option<Span>,
    request_id: Span,
}

/// Text reserved for `events` events: names and ids are short.
fn text_capacity(events: usize) -> usize {
    events.saturating_mul(64)
}

/// Queued events, in order.
#[derive(Debug, Default)]
pub(crate) struct QueuedEvents {
    events: Vec<QueuedEvent>,
    text: String,
}

impl QueuedEvents {
    /// An empty queue with room for `events` events.
    pub(crate) fn with_capacity(events: usize) -> Self {
        Self {
            events: Vec::with_capacity(events),
            text: String::with_capacity(text_capacity(events)),
        }
    }

    /// Number of queued events.
    pub(crate) fn len(&self) -> usize {
        self.events.len()
    }

    /// Whether nothing is queued.
    pub(crate) fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    fn span(&mut self, s: &str) -> Span {
        let start = self.text.len();
        self.text.push_str(s);
        Span {
            start,
            end: self.text.len(),
        }
    }

    /// Appends a copy of `e`.
    pub(crate) fn push(&mut self, e: &AuditEvent) {
        let queued = QueuedEvent {
            time: e.time,
            uid: e.actor.uid,
            pid: e.actor.pid,
            action: e.action.as_str(),
            key_version: e.key_version,
            from_key_version: e.from_key_version,
            key_source: e.key_source.map(|k| k.as_str()),
            result: e.outcome.as_str(),
            actor: self.span(&e.actor.identity),
            tenant: e.tenant.as_ref().map(|t| self.span(t.as_str())),
            field: e.field.as_deref().map(|f| self.span(f)),
            record: e.record.as_deref().map(|r| self.span(r)),
            root_key: e.root_key.as_deref().map(|k| self.span(k)),
            request_id: self.span(&e.request_id),
        };
        self.events.push(queued);
    }

    /// Empties the queue, keeping its memory unless it grew beyond 16 times what
    /// [`QueuedEvents::with_capacity`]`(events)` reserves (a burst, or long strings).
    pub(crate) fn clear(&mut self, events: usize) {
        self.events.clear();
        self.text.clear();
        if self.events.capacity() > events.saturating_mul(16)
            || self.text.capacity() > text_capacity(events).saturating_mul(16)
        {
            *self = Self::with_capacity(events);
        }
    }

    /// The queued events, in order.
    pub(crate) fn views(&self) -> Vec<RecordView<'_>> {
        let text = |s: Span| self.text.get(s.start..s.end).unwrap_or_default();
        self.events
            .iter()
            .map(|e| RecordView {
                time: e.time,
                actor: text(e.actor),
                uid: e.uid,
                pid: e.pid,
                action: e.action,
                tenant: e.tenant.map(text),
                field: e.field.map(text),
                record: e.record.map(text),
                key_version: e.key_version,
                from_key_version: e.from_key_version,
                key_source: e.key_source,
                root_key: e.root_key.map(text),
                result: e.result,
                request_id: text(e.request_id),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]
    use std::sync::Arc;

    use phiseal::audit::{Action, Actor, KeySource, Outcome};
    use phiseal::context::TenantId;

    use super::*;

    fn event(i: usize, full: bool) -> AuditEvent {
        AuditEvent {
            time: Timestamp::from_second(i as i64).unwrap(),
            actor: Actor {
                identity: Arc::from(format!("actor-{i}")),
                uid: full.then_some(1000),
                pid: full.then_some(42),
            },
            action: if full {
                Action::Decrypt
            } else {
                Action::RotateKey
            },
            tenant: full.then(|| TenantId::new(format!("t{i}")).unwrap()),
            field: full.then(|| Arc::from("ssn")),
            record: full.then(|| Arc::from(format!("r\"{i}é"))),
            key_version: full.then_some(3),
            from_key_version: None,
            key_source: full.then_some(KeySource::Stale),
            root_key: None,
            outcome: if full {
                Outcome::Error("key_destroyed")
            } else {
                Outcome::Attempt
            },
            request_id: Arc::from(format!("req-{i}")),
        }
    }

    #[test]
    fn queued_copies_read_back_as_the_events() {
        let events: Vec<AuditEvent> = (0..50).map(|i| event(i, i % 3 != 0)).collect();
        let mut q = QueuedEvents::with_capacity(4);
        for round in 0..2 {
            for e in &events {
                q.push(e);
            }
            assert_eq!(q.len(), events.len());
            let views = q.views();
            for (v, e) in views.iter().zip(&events) {
                let want = RecordView::of(e);
                assert_eq!(format!("{v:?}"), format!("{want:?}"), "round {round}");
            }
            q.clear(4);
            assert!(q.is_empty() && q.views().is_empty());
        }
    }

    #[test]
    fn clear_gives_back_memory_a_burst_took() {
        let mut q = QueuedEvents::with_capacity(4);
        let mut long = event(1, true);
        long.request_id = Arc::from("x".repeat(64 * 1024));
        q.push(&long);
        q.clear(4);
        assert!(
            q.text.capacity() <= text_capacity(4) * 16,
            "{}",
            q.text.capacity()
        );
        for i in 0..1000 {
            q.push(&event(i, true));
        }
        q.clear(4);
        assert!(q.events.capacity() <= 4 * 16, "{}", q.events.capacity());
    }
}

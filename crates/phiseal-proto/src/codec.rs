//! The codec of the generated services: prost's, except that a process can refuse, before
//! decoding, a message with more top-level fields than it allows ([`limit_top_level_fields`]).
//!
//! Decoding a repeated field allocates per item far more than the item's bytes on the wire:
//! an empty `EncryptRequest` is 2 bytes in a batch and about 100 in memory, so a 4 MiB batch
//! of them would make a server allocate hundreds of megabytes before any of its own checks
//! (identity, policy, batch size) could run. Every repeated field of a `phiseal.v1` request is
//! a top-level field, so counting those bounds what decoding allocates. The count is a scan of
//! the message's bytes (tags and lengths only), without allocating.

use std::sync::OnceLock;

use prost::Message;
use prost::bytes::Buf;
use tonic::Status;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// The process's limit on top-level fields per decoded message, and the status that refuses
/// a message over it.
struct FieldLimit {
    max: usize,
    refuse: Box<dyn Fn() -> Status + Send + Sync>,
}

static LIMIT: OnceLock<FieldLimit> = OnceLock::new();

/// Makes every message that this process decodes with [`BoundedCodec`] (the generated
/// servers' requests, the generated clients' responses) refused with `refuse()` when it has
/// more than `max` top-level fields, before it is decoded. A server sets it once at start
/// (to its largest batch, say); a process that never calls it decodes without the check.
/// Returns false, changing nothing, if the limit was already set.
pub fn limit_top_level_fields(
    max: usize,
    refuse: impl Fn() -> Status + Send + Sync + 'static,
) -> bool {
    LIMIT
        .set(FieldLimit {
            max,
            refuse: Box::new(refuse),
        })
        .is_ok()
}

/// Whether `message` has more than `max` top-level fields. A message that is not well-formed
/// protobuf is counted up to where it stops being so (the decoder then refuses it, at that
/// point: nothing after it is decoded). A group (wire types 3 and 4, which proto3 does not
/// use but a decoder skips as an unknown field) counts as one field, its content skipped.
pub fn has_more_fields_than(message: &[u8], max: usize) -> bool {
    let mut rest = message;
    let mut count = 0usize;
    // Groups open around the current position: a field inside one is not top-level.
    let mut depth = 0usize;
    while !rest.is_empty() {
        if depth == 0 && count == max {
            return true;
        }
        let Some(key) = varint(&mut rest) else {
            return false;
        };
        let skip = match key & 0b111 {
            0 => match varint(&mut rest) {
                Some(_) => 0,
                None => return false,
            },
            1 => 8,
            2 => match varint(&mut rest).and_then(|len| usize::try_from(len).ok()) {
                Some(len) => len,
                None => return false,
            },
            3 => {
                depth += 1;
                continue;
            }
            4 => match depth.checked_sub(1) {
                Some(outer) => {
                    depth = outer;
                    if depth == 0 {
                        count += 1;
                    }
                    continue;
                }
                // An end without a start: the decoder refuses it here.
                None => return false,
            },
            5 => 4,
            _ => return false,
        };
        match rest.get(skip..) {
            Some(after) => rest = after,
            None => return false,
        }
        if depth == 0 {
            count += 1;
        }
    }
    false
}

/// Reads a base-128 varint of at most 10 bytes from the front of `bytes`.
fn varint(bytes: &mut &[u8]) -> Option<u64> {
    let mut value = 0u64;
    for (i, &byte) in bytes.iter().enumerate().take(10) {
        value |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            *bytes = bytes.get(i + 1..)?;
            return Some(value);
        }
    }
    None
}

/// prost's codec with the check of [`limit_top_level_fields`] before decoding.
#[derive(Debug, Clone)]
pub struct BoundedCodec<T, U>(ProstCodec<T, U>);

impl<T, U> Default for BoundedCodec<T, U> {
    fn default() -> Self {
        Self(ProstCodec::default())
    }
}

impl<T, U> Codec for BoundedCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = BoundedDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        self.0.encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        BoundedDecoder(self.0.decoder())
    }
}

/// prost's decoder with the check of [`limit_top_level_fields`] before decoding.
#[derive(Debug, Clone)]
pub struct BoundedDecoder<U>(ProstDecoder<U>);

impl<U: Message + Default> Decoder for BoundedDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        if let Some(limit) = LIMIT.get() {
            // A `DecodeBuf` is one contiguous buffer: its chunk is the whole message.
            if has_more_fields_than(buf.chunk(), limit.max) {
                return Err((limit.refuse)());
            }
        }
        self.0.decode(buf)
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.0.buffer_settings()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_top_level_fields_of_every_wire_type() {
        // field 1 varint 150, field 2 bytes "hi", field 3 fixed64, field 4 fixed32.
        let message = [
            0x08, 0x96, 0x01, 0x12, 0x02, b'h', b'i', 0x19, 1, 2, 3, 4, 5, 6, 7, 8, 0x25, 1, 2, 3,
            4,
        ];
        assert!(!has_more_fields_than(&message, 4));
        assert!(has_more_fields_than(&message, 3));
        assert!(!has_more_fields_than(&[], 0));
    }

    #[test]
    fn a_group_counts_as_one_field_and_does_not_end_the_count() {
        // An empty group of field 3 (which a decoder skips as unknown), then many items:
        // still counted (before, the scan stopped at the group and let them be decoded).
        let mut message = vec![0x1b, 0x1c];
        message.extend([0x0a, 0x00].repeat(100));
        assert!(has_more_fields_than(&message, 100));
        assert!(!has_more_fields_than(&message, 101));
        // Nested groups with fields inside: one top-level field.
        let nested = [0x1b, 0x08, 0x01, 0x23, 0x24, 0x12, 0x00, 0x1c, 0x0a, 0x00];
        assert!(!has_more_fields_than(&nested, 2));
        assert!(has_more_fields_than(&nested, 1));
    }

    #[test]
    fn a_batch_of_empty_items_is_counted_without_decoding() {
        // `repeated EncryptRequest items = 1`, two million empty items: 4 MB on the wire.
        let batch: Vec<u8> = [0x0a, 0x00].repeat(2_000_000);
        assert!(has_more_fields_than(&batch, 10_000));
        assert!(!has_more_fields_than(&batch, 2_000_000));
    }

    #[test]
    fn malformed_input_stops_the_count_without_panicking() {
        // A length past the end, an unterminated varint, an end-group without a start, a
        // huge length, an overlong varint.
        for bad in [
            &[0x0a, 0x05, 1][..],
            &[0x08, 0x80][..],
            &[0x0c][..],
            &[
                0x0a, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01,
            ][..],
            &[0x80; 11][..],
        ] {
            assert!(!has_more_fields_than(bad, 5));
        }
        // Counted up to where it breaks: two good fields, then garbage.
        assert!(has_more_fields_than(&[0x08, 1, 0x08, 2, 0x0c], 1));
    }
}

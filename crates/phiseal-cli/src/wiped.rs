//! Reading secrets (plaintext on stdin, token files) into memory that is wiped.
//!
//! `Read::read_to_end` into a `Zeroizing<Vec<u8>>` wipes only the final buffer: each time it
//! grows the vector, the allocator frees the previous buffer with the bytes read so far still
//! in it. [`read_to_end_wiped`] grows its buffer with [`phiseal::reserve_wiped`], which wipes
//! every buffer it outgrows.

use std::io::{ErrorKind, Read};

use zeroize::Zeroizing;

/// Bytes read per `read` call.
const CHUNK: usize = 8192;

/// Reads `reader` to its end into a buffer that is wiped when dropped; every buffer outgrown
/// on the way, and the read chunk, are wiped too.
pub(crate) fn read_to_end_wiped(reader: &mut impl Read) -> std::io::Result<Zeroizing<Vec<u8>>> {
    let mut bytes = Zeroizing::new(Vec::with_capacity(CHUNK));
    let mut chunk = Zeroizing::new([0u8; CHUNK]);
    loop {
        let n = match reader.read(chunk.as_mut_slice()) {
            Ok(0) => return Ok(bytes),
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        let piece = chunk.get(..n).ok_or_else(|| {
            std::io::Error::other("a reader claimed more bytes than it was given")
        })?;
        phiseal::reserve_wiped(&mut bytes, piece.len());
        bytes.extend_from_slice(piece);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]
    use super::*;

    /// Yields its data in pieces of `step` bytes, with an `Interrupted` error before each.
    struct Stutter {
        data: Vec<u8>,
        at: usize,
        step: usize,
        interrupt: bool,
    }

    impl Read for Stutter {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            self.interrupt = !self.interrupt;
            if self.interrupt {
                return Err(ErrorKind::Interrupted.into());
            }
            let n = self.step.min(buf.len()).min(self.data.len() - self.at);
            buf[..n].copy_from_slice(&self.data[self.at..self.at + n]);
            self.at += n;
            Ok(n)
        }
    }

    #[test]
    fn reads_everything_in_order_across_growth_and_interruptions() {
        for (len, step) in [(0, 1), (1, 1), (8191, 8192), (8193, 100), (100_000, 7_001)] {
            let data: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
            let mut reader = Stutter {
                data: data.clone(),
                at: 0,
                step,
                interrupt: false,
            };
            let read = read_to_end_wiped(&mut reader).unwrap();
            assert_eq!(*read, data, "{len} bytes in steps of {step}");
        }
    }

    #[test]
    fn errors_are_returned() {
        struct Broken;
        impl Read for Broken {
            fn read(&mut self, _: &mut [u8]) -> std::io::Result<usize> {
                Err(ErrorKind::BrokenPipe.into())
            }
        }
        let err = read_to_end_wiped(&mut Broken).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::BrokenPipe);
    }
}

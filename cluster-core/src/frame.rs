//! Length-prefixed frames: the byte layer of the channel.
//!
//! A frame is a 6-byte header (payload length as `u32` little endian, the number of file
//! descriptors that travel with it, flags) followed by a postcard payload. Descriptors arrive
//! as `SCM_RIGHTS` data with the first byte of the `sendmsg` that carries them, so with or
//! before the first byte of their frame. The first frame of a `sendmsg` that announces
//! descriptors carries [`OPENS_GROUP`]: the reader then knows which frames share the
//! descriptors of one `recvmsg`, and when the kernel could not install all of them (the
//! receiver is at its descriptor limit, `MSG_CTRUNC`) it knows exactly which frames lost theirs.

use std::fmt;

/// Bytes in a frame header.
pub const HEADER_LEN: usize = 6;
/// Header flag: the first frame of a `sendmsg` that announces descriptors.
pub const OPENS_GROUP: u8 = 1;
/// Most descriptors one frame (and one `sendmsg`) may carry: the kernel's `SCM_MAX_FD`.
pub const MAX_FDS_PER_FRAME: usize = 253;
/// Default limit on a frame's payload: 16 MiB.
pub const DEFAULT_MAX_FRAME: usize = 16 * 1024 * 1024;

/// Why a byte stream could not be split into frames.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameError {
    /// The header announces a payload above the limit.
    TooLarge {
        /// Announced payload length.
        len: usize,
        /// The configured limit.
        max: usize,
    },
    /// The header announces more descriptors than a frame may carry.
    TooManyFds(usize),
    /// The header has flags this build does not know.
    UnknownFlags(u8),
    /// The stream ended inside a frame.
    Truncated {
        /// Bytes of the unfinished frame that had arrived.
        have: usize,
    },
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameError::TooLarge { len, max } => {
                write!(f, "frame of {len} bytes exceeds the limit of {max} bytes")
            }
            FrameError::TooManyFds(n) => write!(
                f,
                "frame announces {n} file descriptors; at most {MAX_FDS_PER_FRAME} are allowed"
            ),
            FrameError::UnknownFlags(bits) => {
                write!(f, "frame header has unknown flags {bits:#04x}")
            }
            FrameError::Truncated { have } => {
                write!(
                    f,
                    "channel closed inside a frame ({have} bytes of it received)"
                )
            }
        }
    }
}

impl std::error::Error for FrameError {}

/// Appends a frame header for `len` payload bytes and `nfds` descriptors, without flags.
pub fn put_header(buf: &mut Vec<u8>, len: usize, nfds: usize) {
    debug_assert!(nfds <= MAX_FDS_PER_FRAME);
    buf.extend_from_slice(&(len as u32).to_le_bytes());
    buf.push(nfds as u8);
    buf.push(0);
}

/// Marks the frame whose header starts at `at` as the first of its `sendmsg` to announce
/// descriptors ([`OPENS_GROUP`]).
pub fn mark_opens_group(buf: &mut [u8], at: usize) {
    buf[at + 5] |= OPENS_GROUP;
}

/// One frame, as [`Decoder::next_frame`] returns it.
#[derive(Debug, PartialEq, Eq)]
pub struct Frame<'a> {
    /// Descriptors announced.
    pub fds: usize,
    /// Whether it is the first frame of its `sendmsg` to announce descriptors.
    pub opens_group: bool,
    /// The postcard payload.
    pub payload: &'a [u8],
}

/// Rewrites the length of the header that starts at `at`.
pub fn patch_len(buf: &mut [u8], at: usize, len: usize) {
    buf[at..at + 4].copy_from_slice(&(len as u32).to_le_bytes());
}

/// Appends one frame carrying `nfds` descriptors: the header, then `msg` encoded in place by
/// postcard (no intermediate buffer). Returns the payload length; on an encoding error the
/// buffer is left as it was.
pub fn encode<T: serde::Serialize + ?Sized>(
    buf: &mut Vec<u8>,
    msg: &T,
    nfds: usize,
) -> postcard::Result<usize> {
    let at = buf.len();
    put_header(buf, 0, nfds);
    if let Err(e) = postcard::serialize_with_flavor(msg, AppendTo(buf)) {
        buf.truncate(at);
        return Err(e);
    }
    let len = buf.len() - at - HEADER_LEN;
    patch_len(buf, at, len);
    Ok(len)
}

/// A postcard flavor that appends to a borrowed buffer, so frames are encoded in place.
struct AppendTo<'a>(&'a mut Vec<u8>);

impl postcard::ser_flavors::Flavor for AppendTo<'_> {
    type Output = ();

    fn try_push(&mut self, data: u8) -> postcard::Result<()> {
        self.0.push(data);
        Ok(())
    }

    fn try_extend(&mut self, data: &[u8]) -> postcard::Result<()> {
        self.0.extend_from_slice(data);
        Ok(())
    }

    fn finalize(self) -> postcard::Result<()> {
        Ok(())
    }
}

/// Splits a byte stream into frames, reusing one buffer.
///
/// The buffer never grows beyond one maximal frame plus its header plus one read, whatever
/// the peer sends: the length is checked before anything is allocated for the payload.
#[derive(Debug)]
pub struct Decoder {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    max_frame: usize,
}

/// Size of one read into the decoder's buffer.
pub const READ_CHUNK: usize = 64 * 1024;

impl Decoder {
    /// A decoder that refuses payloads above `max_frame` bytes.
    pub fn new(max_frame: usize) -> Self {
        Decoder {
            buf: vec![0; READ_CHUNK],
            start: 0,
            end: 0,
            max_frame,
        }
    }

    /// Room to read into; call [`Decoder::filled`] with the count read.
    pub fn spare(&mut self) -> &mut [u8] {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        let want = self.wanted();
        if self.buf.len() - self.end < want {
            // Move the unread tail to the front before growing.
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            if self.buf.len() - self.end < want {
                let new_len = self.end + want;
                self.buf.resize(new_len, 0);
            }
        }
        &mut self.buf[self.end..]
    }

    /// How much room the next read should have: a whole pending frame if its header is in,
    /// otherwise one chunk.
    fn wanted(&self) -> usize {
        let have = self.end - self.start;
        if have >= HEADER_LEN {
            let len = self.peek_len();
            if len <= self.max_frame && have < HEADER_LEN + len {
                return (HEADER_LEN + len - have).max(READ_CHUNK);
            }
        }
        READ_CHUNK
    }

    fn peek_len(&self) -> usize {
        let h = &self.buf[self.start..self.start + 4];
        u32::from_le_bytes([h[0], h[1], h[2], h[3]]) as usize
    }

    /// Records that `n` bytes were read into [`Decoder::spare`].
    pub fn filled(&mut self, n: usize) {
        self.end += n;
        debug_assert!(self.end <= self.buf.len());
    }

    /// Whether [`next_frame`](Self::next_frame) would return without more bytes (a frame, or
    /// an error).
    pub fn has_frame(&self) -> bool {
        let have = self.end - self.start;
        // Exactly when `next_frame` returns something: a whole frame, or an error its header
        // alone shows (too large, too many descriptors).
        have >= HEADER_LEN && {
            let len = self.peek_len();
            let nfds = self.buf[self.start + 4] as usize;
            let flags = self.buf[self.start + 5];
            len > self.max_frame
                || nfds > MAX_FDS_PER_FRAME
                || flags & !OPENS_GROUP != 0
                || have >= HEADER_LEN + len
        }
    }

    /// The next whole frame, or `None` until more bytes arrive.
    pub fn next_frame(&mut self) -> Result<Option<Frame<'_>>, FrameError> {
        let have = self.end - self.start;
        if have < HEADER_LEN {
            return Ok(None);
        }
        let len = self.peek_len();
        if len > self.max_frame {
            return Err(FrameError::TooLarge {
                len,
                max: self.max_frame,
            });
        }
        let nfds = self.buf[self.start + 4] as usize;
        if nfds > MAX_FDS_PER_FRAME {
            return Err(FrameError::TooManyFds(nfds));
        }
        let flags = self.buf[self.start + 5];
        if flags & !OPENS_GROUP != 0 {
            return Err(FrameError::UnknownFlags(flags));
        }
        if have < HEADER_LEN + len {
            return Ok(None);
        }
        let from = self.start + HEADER_LEN;
        self.start = from + len;
        Ok(Some(Frame {
            fds: nfds,
            opens_group: flags & OPENS_GROUP != 0,
            payload: &self.buf[from..from + len],
        }))
    }

    /// Checks, at end of stream, that no frame was cut off.
    pub fn finish(&self) -> Result<(), FrameError> {
        match self.end - self.start {
            0 => Ok(()),
            have => Err(FrameError::Truncated { have }),
        }
    }

    /// Bytes currently allocated for the buffer.
    pub fn capacity(&self) -> usize {
        self.buf.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn frame(payload: &[u8], nfds: usize) -> Vec<u8> {
        let mut v = Vec::new();
        put_header(&mut v, payload.len(), nfds);
        v.extend_from_slice(payload);
        v
    }

    fn feed(
        d: &mut Decoder,
        mut bytes: &[u8],
        chunk: usize,
    ) -> Result<Vec<(usize, Vec<u8>)>, FrameError> {
        let mut out = Vec::new();
        while !bytes.is_empty() {
            let spare = d.spare();
            let n = spare.len().min(chunk).min(bytes.len());
            spare[..n].copy_from_slice(&bytes[..n]);
            d.filled(n);
            bytes = &bytes[n..];
            loop {
                // `has_frame` predicts exactly whether `next_frame` returns without a read.
                let has = d.has_frame();
                match d.next_frame() {
                    Ok(Some(f)) => {
                        assert!(has);
                        out.push((f.fds, f.payload.to_vec()));
                    }
                    Ok(None) => {
                        assert!(!has);
                        break;
                    }
                    Err(e) => {
                        assert!(has);
                        return Err(e);
                    }
                }
            }
        }
        Ok(out)
    }

    #[test]
    fn round_trip_in_one_read_and_byte_by_byte() {
        let mut stream = frame(b"hello", 0);
        stream.extend(frame(b"", 2));
        stream.extend(frame(&[7; 100_000], 1));
        for chunk in [1, 3, 4096, usize::MAX] {
            let mut d = Decoder::new(1 << 20);
            let got = feed(&mut d, &stream, chunk).unwrap();
            assert_eq!(got.len(), 3);
            assert_eq!(got[0], (0, b"hello".to_vec()));
            assert_eq!(got[1], (2, vec![]));
            assert_eq!(got[2].1.len(), 100_000);
            d.finish().unwrap();
        }
    }

    #[test]
    fn oversized_frame_is_refused_before_allocation() {
        let mut d = Decoder::new(1024);
        let mut head = Vec::new();
        put_header(&mut head, u32::MAX as usize, 0);
        let err = feed(&mut d, &head, usize::MAX).unwrap_err();
        assert_eq!(
            err,
            FrameError::TooLarge {
                len: u32::MAX as usize,
                max: 1024
            }
        );
        assert!(d.capacity() <= READ_CHUNK);
    }

    #[test]
    fn truncated_frame_is_reported() {
        let mut d = Decoder::new(1024);
        let f = frame(b"abcdef", 0);
        feed(&mut d, &f[..7], usize::MAX).unwrap();
        assert_eq!(d.finish(), Err(FrameError::Truncated { have: 7 }));
    }

    #[test]
    fn a_header_with_too_many_descriptors_is_a_frame_to_report_before_its_payload() {
        // A small length, 255 descriptors, and only part of the payload here.
        let bytes = [10, 0, 0, 0, 255, 0, 1, 2];
        let mut d = Decoder::new(1024);
        let r = feed(&mut d, &bytes, bytes.len());
        assert!(matches!(r, Err(FrameError::TooManyFds(255))), "{r:?}");
        let bytes = [10, 0, 0, 0, 1, 0x82, 1, 2];
        let mut d = Decoder::new(1024);
        let r = feed(&mut d, &bytes, bytes.len());
        assert!(matches!(r, Err(FrameError::UnknownFlags(0x82))), "{r:?}");
    }

    #[test]
    fn the_group_flag_travels_with_its_frame() {
        let mut stream = frame(b"a", 0);
        let at = stream.len();
        stream.extend(frame(b"b", 2));
        mark_opens_group(&mut stream, at);
        stream.extend(frame(b"c", 1));
        let mut d = Decoder::new(64);
        d.spare()[..stream.len()].copy_from_slice(&stream);
        d.filled(stream.len());
        let mut flags = vec![];
        while let Some(f) = d.next_frame().unwrap() {
            flags.push((f.fds, f.opens_group));
        }
        assert_eq!(flags, [(0, false), (2, true), (1, false)]);
    }

    proptest! {
        #[test]
        fn any_bytes_give_frames_or_an_error(bytes in proptest::collection::vec(any::<u8>(), 0..4096),
                                             chunk in 1usize..600, max in 0usize..2048) {
            let mut d = Decoder::new(max);
            // An error is a fine outcome; a panic or a huge buffer is not.
            if let Ok(frames) = feed(&mut d, &bytes, chunk) {
                for (nfds, p) in frames {
                    prop_assert!(nfds <= MAX_FDS_PER_FRAME);
                    prop_assert!(p.len() <= max);
                }
                let _ = d.finish();
            }
            prop_assert!(d.capacity() <= READ_CHUNK + max + HEADER_LEN);
        }

        #[test]
        fn frames_survive_any_chunking(payloads in proptest::collection::vec(
                proptest::collection::vec(any::<u8>(), 0..300), 0..20), chunk in 1usize..700) {
            let mut stream = Vec::new();
            for p in &payloads { stream.extend(frame(p, p.len() % 4)); }
            let mut d = Decoder::new(300);
            let got = feed(&mut d, &stream, chunk).unwrap();
            prop_assert_eq!(got.len(), payloads.len());
            for ((nfds, g), p) in got.iter().zip(&payloads) {
                prop_assert_eq!(g, p);
                prop_assert_eq!(*nfds, p.len() % 4);
            }
            prop_assert!(d.finish().is_ok());
        }
    }
}

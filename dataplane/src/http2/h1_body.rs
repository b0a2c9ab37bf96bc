//! An HTTP/1.1 body taken from a read buffer as DATA frames' payloads: the request
//! bodies the bridge sends to HTTP/2 apps ([`super::bridge`]) and the response
//! bodies of HTTP/1.1 apps sent to HTTP/2 clients ([`super::stream`]). HTTP/2 frames
//! its own data, so the chunk framing is dropped and only the payload goes on; a
//! chunked body's trailers stay with its decoder for the caller.

use bytes::Bytes;

use crate::http::chunked::{ChunkError, ChunkedDecoder};
use crate::http::parse::BodyFraming;
use crate::relay::ReadBuf;

/// Where one HTTP/1.1 body stands: its bytes still to come (by length) or its
/// chunked decoder, and whether it has ended.
pub(super) struct H1Body {
    remaining: u64,
    chunks: Option<ChunkedDecoder>,
    done: bool,
}

impl H1Body {
    /// A body of `framing`, a chunked one read with `decoder` (requests refuse
    /// forbidden trailer fields, responses drop them later). A body to the end of
    /// its connection ([`BodyFraming::Eof`]) ends by [`H1Body::end`].
    pub(super) fn new(framing: BodyFraming, decoder: fn() -> ChunkedDecoder) -> Self {
        Self {
            remaining: match framing {
                BodyFraming::Length(n) => n,
                _ => u64::MAX,
            },
            chunks: (framing == BodyFraming::Chunked).then(decoder),
            done: false,
        }
    }

    /// Takes what of the body `buf` holds: its payload (empty when there was
    /// only framing, or nothing), and whether any byte of `buf` was the body's.
    /// Bytes past the body's end stay in `buf`.
    pub(super) fn take(&mut self, buf: &mut ReadBuf) -> Result<(Bytes, bool), ChunkError> {
        if buf.is_empty() || self.done {
            return Ok((Bytes::new(), false));
        }
        let filled = buf.filled();
        let (data, consumed) = match &mut self.chunks {
            Some(d) => {
                let step = d.decode(filled)?;
                self.done = step.done;
                (Bytes::copy_from_slice(&filled[step.data]), step.consumed)
            }
            None => {
                let n = (filled.len() as u64).min(self.remaining) as usize;
                self.remaining -= n as u64;
                self.done = self.remaining == 0;
                (Bytes::copy_from_slice(&filled[..n]), n)
            }
        };
        buf.consume(consumed);
        Ok((data, consumed > 0))
    }

    /// Whether the body has ended.
    pub(super) fn done(&self) -> bool {
        self.done
    }

    /// Ends a body that runs to the end of its connection, which came.
    pub(super) fn end(&mut self) {
        self.done = true;
    }

    /// A chunked body's trailer fields, once it has ended (none for others).
    pub(super) fn trailers(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.chunks.iter().flat_map(ChunkedDecoder::trailers)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `input` in pieces of `step` bytes and takes after each: the payload
    /// gathered, whether the body ended, and what stayed in the buffer.
    fn run(framing: BodyFraming, input: &[u8], step: usize) -> (Vec<u8>, bool, Vec<u8>) {
        let mut body = H1Body::new(framing, ChunkedDecoder::for_request);
        let mut buf = ReadBuf::new(64);
        let mut payload = Vec::new();
        for piece in input.chunks(step) {
            buf.push(piece);
            while !body.done() {
                let (data, progressed) = body.take(&mut buf).expect("a valid body");
                payload.extend_from_slice(&data);
                if !progressed {
                    break;
                }
            }
        }
        (payload, body.done(), buf.filled().to_vec())
    }

    #[test]
    fn a_body_is_taken_whole_and_no_further_in_any_pieces() {
        // What it is, its framing, the bytes sent, the payload taken, what stays.
        type Row<'a> = (&'a str, BodyFraming, &'a [u8], &'a [u8], &'a [u8]);
        let rows: &[Row<'_>] = &[
            ("length", BodyFraming::Length(5), b"hello", b"hello", b""),
            (
                "length, pipelined after",
                BodyFraming::Length(5),
                b"helloGET",
                b"hello",
                b"GET",
            ),
            ("empty length", BodyFraming::Length(0), b"", b"", b""),
            (
                "chunked",
                BodyFraming::Chunked,
                b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
                b"abcde",
                b"",
            ),
            (
                "chunked, pipelined after",
                BodyFraming::Chunked,
                b"1\r\nx\r\n0\r\n\r\nGET / HTTP/1.1",
                b"x",
                b"GET / HTTP/1.1",
            ),
            (
                "chunked with a trailer",
                BodyFraming::Chunked,
                b"1\r\ny\r\n0\r\nx-t: 1\r\n\r\n",
                b"y",
                b"",
            ),
        ];
        for (name, framing, input, payload, left) in rows {
            for step in [1, 2, 7, 64] {
                let (got, done, rest) = run(*framing, input, step);
                // An empty body by length has nothing to take: it ends at once
                // only for the caller that sees `remaining == 0` before reading.
                if input.is_empty() {
                    assert!(got.is_empty(), "{name}");
                    continue;
                }
                assert_eq!(&got, payload, "{name}, pieces of {step}");
                assert!(done, "{name}, pieces of {step}: not ended");
                assert_eq!(&rest, left, "{name}, pieces of {step}: what stayed");
            }
        }
    }

    #[test]
    fn a_chunked_bodys_trailers_stay_for_the_caller_and_bad_framing_fails() {
        let mut body = H1Body::new(BodyFraming::Chunked, ChunkedDecoder::new);
        let mut buf = ReadBuf::new(64);
        buf.push(b"0\r\nx-t: 1\r\n\r\n");
        body.take(&mut buf).expect("a valid body");
        assert!(body.done());
        let trailers: Vec<_> = body.trailers().collect();
        assert_eq!(trailers, [(&b"x-t"[..], &b"1"[..])]);

        let mut body = H1Body::new(BodyFraming::Chunked, ChunkedDecoder::new);
        buf = ReadBuf::new(64);
        buf.push(b"zz\r\n");
        assert!(body.take(&mut buf).is_err());

        let mut body = H1Body::new(BodyFraming::Eof, ChunkedDecoder::new);
        buf = ReadBuf::new(64);
        buf.push(b"all of it");
        let (data, _) = body.take(&mut buf).expect("any bytes");
        assert_eq!(&data[..], b"all of it");
        assert!(!body.done() && body.trailers().next().is_none());
        body.end();
        assert!(body.done());
    }
}

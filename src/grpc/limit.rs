//! The control-message size limit on the gRPC server: votes, pre-votes and transfer-leader
//! requests are a few dozen bytes, so a larger one is refused before the server reads (or
//! reserves room for) its body.

use std::pin::Pin;
use std::task::Context;
use std::task::Poll;

use bytes::Bytes;
use http_body::Frame;
use tonic::Status;
use tonic::body::Body;

use super::marked;

/// The unary control methods: small requests only.
const CONTROL_PATHS: [&str; 3] = [
    "/raftwire.v1.Raft/Vote",
    "/raftwire.v1.Raft/PreVote",
    "/raftwire.v1.Raft/TransferLeader",
];

/// The gRPC message prefix: a compression flag and a 4-byte length.
const PREFIX_LEN: usize = 5;

/// Wraps the body of a control request in a [`Limited`] body; other requests pass untouched.
pub(crate) fn limit_control(req: http::Request<Body>, max: usize) -> http::Request<Body> {
    let path = req.uri().path();
    let Some(rpc) = CONTROL_PATHS.iter().find(|p| **p == path) else {
        return req;
    };
    let rpc = rpc.rsplit('/').next().unwrap_or(rpc);
    // A declared length already over the limit is refused before any byte is read.
    let declared = req
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let (parts, body) = req.into_parts();
    let limited = Limited {
        inner: body,
        rpc,
        max,
        seen: 0,
        prefix: Vec::with_capacity(PREFIX_LEN),
        refused: declared.is_some_and(|n| n > (max + PREFIX_LEN) as u64),
    };
    http::Request::from_parts(parts, Body::new(limited))
}

/// A request body that fails with `ResourceExhausted` as soon as the gRPC message it carries
/// announces more than `max` bytes, or more than `max` bytes (plus the prefix) arrive.
struct Limited {
    inner: Body,
    rpc: &'static str,
    max: usize,
    /// Body bytes seen so far.
    seen: usize,
    /// The first bytes of the body, until the message prefix is complete.
    prefix: Vec<u8>,
    /// Set once the limit is known to be exceeded.
    refused: bool,
}

impl Limited {
    fn refusal(&self, len: usize) -> Status {
        if len == usize::MAX {
            tracing::warn!(rpc = self.rpc, "refusing a compressed control request");
            return marked(Status::resource_exhausted(format!(
                "{} request is compressed: control messages never are (their limit is {} bytes)",
                self.rpc, self.max
            )));
        }
        tracing::warn!(
            rpc = self.rpc,
            len,
            max = self.max,
            "refusing an oversized control request (max_control_message_size)"
        );
        marked(Status::resource_exhausted(format!(
            "{} request of {len} bytes exceeds the limit of {} bytes for control messages",
            self.rpc, self.max
        )))
    }

    /// Checks a data frame; the announced or received length when it breaks the limit.
    fn over_limit(&mut self, data: &Bytes) -> Option<usize> {
        self.seen += data.len();
        if self.prefix.len() < PREFIX_LEN {
            let take = (PREFIX_LEN - self.prefix.len()).min(data.len());
            self.prefix.extend_from_slice(&data[..take]);
            if self.prefix.len() == PREFIX_LEN {
                // A compressed message's prefix gives its compressed size, which says nothing
                // of what it inflates to: control messages are never compressed.
                if self.prefix[0] != 0 {
                    return Some(usize::MAX);
                }
                let announced =
                    u32::from_be_bytes([self.prefix[1], self.prefix[2], self.prefix[3], self.prefix[4]])
                        as usize;
                if announced > self.max {
                    return Some(announced);
                }
            }
        }
        (self.seen > self.max + PREFIX_LEN).then(|| self.seen - PREFIX_LEN)
    }
}

impl http_body::Body for Limited {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = &mut *self;
        if this.refused {
            return Poll::Ready(Some(Err(this.refusal(this.seen))));
        }
        let frame = match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => frame,
            other => return other,
        };
        if let Some(len) = frame.data_ref().and_then(|data| this.over_limit(data)) {
            // Nothing more is read: the call fails, and hyper resets the rest of the stream.
            this.refused = true;
            return Poll::Ready(Some(Err(this.refusal(len))));
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        !self.refused && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limited(max: usize) -> Limited {
        Limited {
            inner: Body::empty(),
            rpc: "Vote",
            max,
            seen: 0,
            prefix: Vec::new(),
            refused: false,
        }
    }

    #[test]
    fn an_announced_length_over_the_limit_is_refused_from_the_prefix() {
        let mut l = limited(100);
        // The prefix split across frames.
        assert_eq!(l.over_limit(&Bytes::from_static(&[0, 0, 0])), None);
        assert_eq!(l.over_limit(&Bytes::from_static(&[1, 0])), Some(256));
    }

    #[test]
    fn bytes_past_the_limit_are_refused_even_under_a_small_announcement() {
        let mut l = limited(10);
        assert_eq!(l.over_limit(&Bytes::from_static(&[0, 0, 0, 0, 10])), None);
        assert_eq!(l.over_limit(&Bytes::from(vec![0u8; 10])), None);
        assert_eq!(l.over_limit(&Bytes::from_static(&[0])), Some(11));
    }
}

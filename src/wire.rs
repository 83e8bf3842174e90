//! The one encoding trait application types travel through.

use std::fmt;

use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::DecodeError;
use crate::error::EncodeError;

/// How an application value (log payload, response, node description) becomes bytes on the
/// wire and back.
///
/// raftwire never interprets these bytes: they travel as a protobuf `bytes` field on gRPC and
/// as a length-prefixed slice on QUIC. Implementations for `Bytes` are zero-copy in both
/// directions: `encode` clones the reference-counted buffer and `decode` receives a slice
/// of the receive buffer.
pub trait WireMessage: Sized + Send + Sync + 'static {
    /// Encodes `self` into a buffer that is sent as-is.
    ///
    /// Fails only for values the format cannot represent (for example a serde map with
    /// non-string keys under [`Json`]); the RPC that carried it fails with that reason.
    fn encode(&self) -> Result<Bytes, EncodeError>;

    /// Decodes a value from exactly the bytes `encode` produced.
    ///
    /// Returns an error rather than a default for input that is not a valid encoding.
    fn decode(bytes: Bytes) -> Result<Self, DecodeError>;
}

impl WireMessage for Bytes {
    fn encode(&self) -> Result<Bytes, EncodeError> {
        Ok(self.clone())
    }

    fn decode(bytes: Bytes) -> Result<Self, DecodeError> {
        Ok(bytes)
    }
}

impl WireMessage for Vec<u8> {
    fn encode(&self) -> Result<Bytes, EncodeError> {
        Ok(Bytes::copy_from_slice(self))
    }

    fn decode(bytes: Bytes) -> Result<Self, DecodeError> {
        Ok(bytes.to_vec())
    }
}

impl WireMessage for String {
    fn encode(&self) -> Result<Bytes, EncodeError> {
        Ok(Bytes::copy_from_slice(self.as_bytes()))
    }

    fn decode(bytes: Bytes) -> Result<Self, DecodeError> {
        String::from_utf8(bytes.to_vec()).map_err(|e| DecodeError::invalid("string", e))
    }
}

impl WireMessage for openraft::impls::BasicNode {
    fn encode(&self) -> Result<Bytes, EncodeError> {
        Ok(Bytes::copy_from_slice(self.addr.as_bytes()))
    }

    fn decode(bytes: Bytes) -> Result<Self, DecodeError> {
        let addr = String::decode(bytes).map_err(|e| e.within("addr"))?;
        Ok(openraft::impls::BasicNode { addr })
    }
}

/// Adapter that carries any serde type as JSON, so an application never writes protobuf.
///
/// Use it as the type config's `D`, `R` or `Node` (it forwards `Debug`, `Display`, `Eq` and
/// `Clone` to the inner value), or call `Json::<T>::encode_value` from your own
/// [`WireMessage`] impl.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Json<T>(pub T);

impl<T: fmt::Debug> fmt::Debug for Json<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl<T: fmt::Display> fmt::Display for Json<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl<T> WireMessage for Json<T>
where
    T: Serialize + DeserializeOwned + Send + Sync + 'static,
{
    fn encode(&self) -> Result<Bytes, EncodeError> {
        serde_json::to_vec(&self.0)
            .map(Bytes::from)
            .map_err(|e| EncodeError(e.to_string()))
    }

    fn decode(bytes: Bytes) -> Result<Self, DecodeError> {
        serde_json::from_slice(&bytes)
            .map(Json)
            .map_err(|e| DecodeError::invalid("json", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_travel_without_a_copy() {
        let b = Bytes::from(vec![1u8; 4096]);
        let wire = b.encode().unwrap();
        assert_eq!(wire.as_ptr(), b.as_ptr());
        let back = Bytes::decode(wire.clone()).unwrap();
        assert_eq!(back.as_ptr(), wire.as_ptr());
    }

    #[test]
    fn json_adapter_round_trips_and_refuses_garbage() {
        #[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
        struct Cmd {
            key: String,
            n: u32,
        }
        let v = Json(Cmd {
            key: "a".into(),
            n: 7,
        });
        assert_eq!(Json::<Cmd>::decode(v.encode().unwrap()).unwrap(), v);
        let err = Json::<Cmd>::decode(Bytes::from_static(b"{\"key\":1}")).unwrap_err();
        assert_eq!(err.field(), "json");
    }

    #[test]
    fn json_encode_failure_is_an_error_not_a_default() {
        let mut map = std::collections::BTreeMap::new();
        map.insert((1u8, 2u8), 3u8);
        assert!(Json(map).encode().is_err());
    }

    #[test]
    fn strings_must_be_utf8() {
        assert_eq!(
            String::decode(Bytes::from_static(&[0xff, 0xfe]))
                .unwrap_err()
                .field(),
            "string"
        );
        let node = openraft::impls::BasicNode {
            addr: "10.0.0.1:5001".into(),
        };
        assert_eq!(
            openraft::impls::BasicNode::decode(node.encode().unwrap()).unwrap(),
            node
        );
    }
}

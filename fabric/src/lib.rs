//! ClaudeFS RPC.
//!
//! One transport API with two operations, shaped so a libfabric provider slots in beside TCP:
//! a two-sided [`Client::call`] (request, response, matched by id, many in flight per
//! connection) and a one-sided [`Client::read_region`] ("read N bytes at offset O of
//! registered region K"). Over TCP the server answers a region read from the registered buffer
//! itself; over RDMA the client will pull the bytes with `fi_read` and the server CPU is not
//! involved. Frames are versioned and checksummed ([`frame`]); every queue and frame has a cap.

#![deny(unsafe_code)]

pub mod auth;
pub mod blocking;
pub mod client;
pub mod frame;
pub mod ofi;
pub mod region;
pub mod server;

pub use auth::{AuthError, JoinToken, Secret};
pub use blocking::{BlockingClient, FailoverClient};
pub use client::{Client, ClientConfig};
pub use frame::FrameError;
pub use region::{Region, RegionKey, RegionTable};
pub use server::{Server, ServerConfig, Service, ServiceFuture};

use std::time::Duration;

/// Error codes carried by error frames (the frame's `method` field).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorCode {
    /// No such method.
    UnknownMethod,
    /// The request payload was malformed.
    BadRequest,
    /// The frame was larger than the receiver's cap.
    TooLarge,
    /// The payload failed its checksum in transit.
    Checksum,
    /// The server is at its limit; try again later.
    Busy,
    /// The region key is unknown or was revoked.
    BadRegionKey,
    /// The region read goes past the region's end.
    OutOfRange,
    /// The service failed.
    Internal,
    /// A service-defined code (>= 1000), e.g. an errno.
    Service(u32),
}

impl ErrorCode {
    /// Wire value.
    pub fn to_u32(self) -> u32 {
        match self {
            ErrorCode::UnknownMethod => 1,
            ErrorCode::BadRequest => 2,
            ErrorCode::TooLarge => 3,
            ErrorCode::Checksum => 4,
            ErrorCode::Busy => 5,
            ErrorCode::BadRegionKey => 6,
            ErrorCode::OutOfRange => 7,
            ErrorCode::Internal => 8,
            ErrorCode::Service(c) => {
                // Below 1000 the wire value would decode as another code: a caller's bug.
                assert!(c >= 1000, "service error codes start at 1000, got {c}");
                c
            }
        }
    }
    /// From the wire value.
    pub fn from_u32(v: u32) -> ErrorCode {
        match v {
            1 => ErrorCode::UnknownMethod,
            2 => ErrorCode::BadRequest,
            3 => ErrorCode::TooLarge,
            4 => ErrorCode::Checksum,
            5 => ErrorCode::Busy,
            6 => ErrorCode::BadRegionKey,
            7 => ErrorCode::OutOfRange,
            1000.. => ErrorCode::Service(v),
            _ => ErrorCode::Internal,
        }
    }
}

/// What a call can fail with.
#[derive(Clone, Debug, thiserror::Error)]
pub enum RpcError {
    /// No connection could be made within the connect timeout.
    #[error("cannot connect to {addr}: {reason}")]
    Connect {
        /// Server address.
        addr: String,
        /// The last error.
        reason: String,
    },
    /// The server refused the connection's handshake (no token, or the wrong one). Retrying
    /// with the same token cannot help.
    #[error("{addr}: {reason}")]
    Refused {
        /// Server address.
        addr: String,
        /// Why (an [`AuthError`]).
        reason: AuthError,
    },
    /// The connection dropped before the reply came; the request may or may not have run.
    #[error("connection to {addr} lost: {reason}")]
    ConnectionLost {
        /// Server address.
        addr: String,
        /// Why.
        reason: String,
    },
    /// No reply within the request's timeout.
    #[error("request {method} to {addr} timed out after {timeout:?}")]
    Timeout {
        /// Server address.
        addr: String,
        /// Method called.
        method: u32,
        /// The timeout.
        timeout: Duration,
    },
    /// The server answered with an error.
    #[error("server error {code:?}: {message}")]
    Remote {
        /// Code.
        code: ErrorCode,
        /// Message.
        message: String,
    },
    /// The request is larger than the frame cap.
    #[error("request of {len} bytes exceeds the {max}-byte frame cap")]
    TooLarge {
        /// Payload length.
        len: usize,
        /// Cap.
        max: u32,
    },
    /// The peer broke the protocol.
    #[error("protocol error from {addr}: {reason}")]
    Protocol {
        /// Peer.
        addr: String,
        /// What it did.
        reason: String,
    },
}

/// An error a service returns: a code and a message for the caller.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{code:?}: {message}")]
pub struct ServiceError {
    /// Code sent to the caller.
    pub code: ErrorCode,
    /// Message sent to the caller.
    pub message: String,
}

impl ServiceError {
    /// A new error.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> ServiceError {
        ServiceError {
            code,
            message: message.into(),
        }
    }
}

/// Maps a failed client handshake: a refusal is final, anything else is a failed connect.
pub(crate) fn handshake_error(addr: &str, e: AuthError) -> RpcError {
    match e {
        AuthError::TokenRequired | AuthError::Refused => RpcError::Refused {
            addr: addr.to_string(),
            reason: e,
        },
        other => RpcError::Connect {
            addr: addr.to_string(),
            reason: other.to_string(),
        },
    }
}

/// Turns a reply frame into the call's result (shared by the async and blocking clients).
pub(crate) fn reply_result(reply: frame::Frame, addr: &str) -> Result<bytes::Bytes, RpcError> {
    match reply.kind {
        frame::Kind::Response | frame::Kind::Pong => Ok(reply.payload),
        frame::Kind::Error => Err(RpcError::Remote {
            code: ErrorCode::from_u32(reply.method),
            message: String::from_utf8_lossy(&reply.payload).into_owned(),
        }),
        other => Err(RpcError::Protocol {
            addr: addr.to_string(),
            reason: format!("unexpected {other:?} reply"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::ErrorCode;

    #[test]
    fn error_codes_survive_the_wire() {
        let codes = [
            ErrorCode::UnknownMethod,
            ErrorCode::BadRequest,
            ErrorCode::TooLarge,
            ErrorCode::Checksum,
            ErrorCode::Busy,
            ErrorCode::BadRegionKey,
            ErrorCode::OutOfRange,
            ErrorCode::Internal,
            ErrorCode::Service(1000),
            ErrorCode::Service(1005),
            ErrorCode::Service(9_000),
            ErrorCode::Service(u32::MAX),
        ];
        for c in codes {
            assert_eq!(ErrorCode::from_u32(c.to_u32()), c);
        }
    }

    #[test]
    #[should_panic(expected = "service error codes start at 1000")]
    fn a_service_code_below_1000_is_a_bug() {
        let _ = ErrorCode::Service(900).to_u32();
    }
}

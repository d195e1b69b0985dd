//! The host's attestation agent: after measured start it keeps the TPM open and answers
//! verifier challenges with quotes, on one local unix socket.
//!
//! The controller (the host's only door) connects once, before its sandbox forbids `connect`,
//! and relays `POST /v1/host/attest` to the agent. The agent never sees a token, a request from
//! the network or a volume key: it only quotes the measurement PCR over a nonce it is given.
//!
//! Wire format, one JSON object per line each way (a request line is at most
//! [`MAX_REQUEST_LINE`] bytes): request `{"nonce":"<64 hex>"}` or
//! `{"nonce":"<64 hex>","instance":"<id>"}`; answer the [`crate::attest::Evidence`] or
//! `{"error":"<code>"}`. Both are wire types of `bulkhead-rot-proto`. Requests on one connection
//! are served in order; connections one at a time (the TPM is one device).
//!
//! With an instance, the quote's qualifying data is
//! [`crate::attest::qualifying_data`]`(nonce, instance)` = SHA-256(nonce || instance id): the
//! evidence then says "this host, measured so, runs this instance", and a verifier expecting
//! another instance (or none) refuses it. The controller asks for it only for an instance its
//! backend runs.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};

use crate::host::Host;

// The line protocol is a wire type (`bulkhead-rot-proto`), shared with the controller.
pub use bulkhead_rot_proto::{parse_request, AgentError, AgentRequest, MAX_REQUEST_LINE};

fn answer(host: &mut Host, line: &[u8]) -> String {
    let result = parse_request(line).and_then(|call| {
        if call.credential.is_some() {
            // Process hosts are endorsed at provisioning (`bulkhead-launcher
            // activate-credential`), not through the controller.
            return Err(AgentError::CredentialUnsupported);
        }
        if let Some(r) = call.release_applied {
            // Measured before the quote: the evidence shows the release applied.
            host.record_release_applied(r.version, &r.manifest_sha384)
                .map_err(|e| {
                    tracing::warn!(error = %e, "measuring the applied release failed");
                    AgentError::MeasureFailed
                })?;
        }
        let qualifying = crate::attest::qualifying_data(&call.nonce, call.instance.as_deref());
        host.attest(&qualifying).map_err(|e| {
            tracing::warn!(error = %e, "quote failed");
            AgentError::QuoteFailed
        })
    });
    if let Err(e) = &result {
        tracing::info!(code = e.code(), "challenge refused");
    }
    bulkhead_rot_proto::encode_reply(&result.map(bulkhead_rot_proto::HostEvidence::Measured))
}

/// Serves one connection until the peer closes it or sends a line that is too long.
pub fn serve_connection(host: &mut Host, stream: UnixStream) {
    let Ok(w) = stream.try_clone() else { return };
    let mut w = w;
    let mut r = BufReader::new(stream);
    loop {
        let mut line = Vec::with_capacity(MAX_REQUEST_LINE);
        // Read at most one byte more than allowed: a longer line is refused without buffering it.
        let limit = u64::try_from(MAX_REQUEST_LINE).unwrap_or(u64::MAX) + 1;
        match r.by_ref().take(limit).read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let too_long = line.last() != Some(&b'\n');
        let reply = if too_long {
            bulkhead_rot_proto::encode_reply(&Err(AgentError::TooLong))
        } else {
            line.pop();
            answer(host, &line)
        };
        if w.write_all(reply.as_bytes()).is_err() || w.write_all(b"\n").is_err() {
            return;
        }
        if too_long {
            return;
        }
    }
}

/// Accepts connections one at a time, forever.
pub fn serve(host: &mut Host, listener: &UnixListener) {
    for conn in listener.incoming() {
        match conn {
            Ok(s) => serve_connection(host, s),
            Err(e) => tracing::warn!(error = %e, "accept failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn requests_are_strict() {
        let n = "ab".repeat(32);
        assert!(parse_request(format!(r#"{{"nonce":"{n}"}}"#).as_bytes()).is_ok());
        let call =
            parse_request(format!(r#"{{"nonce":"{n}","instance":"i-1"}}"#).as_bytes()).unwrap();
        assert_eq!(call.instance.as_deref(), Some("i-1"));
        assert_eq!(
            parse_request(format!(r#"{{"nonce":"{n}","instance":"../x"}}"#).as_bytes()),
            Err(AgentError::BadInstance)
        );
        assert_eq!(
            parse_request(format!(r#"{{"nonce":"{n}","instance":""}}"#).as_bytes()),
            Err(AgentError::BadInstance)
        );
        for bad in [
            String::new(),
            "{}".to_string(),
            r#"{"nonce":"abcd"}"#.to_string(),
            format!(r#"{{"nonce":"{}"}}"#, "zz".repeat(32)),
            format!(r#"{{"nonce":"{n}","pcr":7}}"#),
            format!(r#"{{"nonce":"{}"}}"#, "ab".repeat(33)),
        ] {
            assert!(parse_request(bad.as_bytes()).is_err(), "{bad}");
        }
        assert_eq!(
            parse_request(&[b' '; MAX_REQUEST_LINE + 1]),
            Err(AgentError::TooLong)
        );
    }
}

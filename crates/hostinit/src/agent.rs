//! `bulkhead-host-agent`: the sealed host's attestation agent. It opens the TPM, prints the
//! attestation key on the console (`BULKHEAD-HOST-AK <hex>`: the AK an operator asks the
//! control plane to enrol, which the control plane certifies against the TPM's EK before it
//! trusts it), reads the TPM's EK certificate, then answers verifier nonces on a unix socket
//! (mode 0600) that only the controller connects to, with [`BootEvidence`]: a quote over
//! SHA-256 PCRs 4, 9, 11, 12 and 23, their values, and the EK certificate.
//!
//! Same line protocol as `bulkhead_rot::agent` (`{"nonce":"<64 hex>","instance"?:…}` in, one
//! JSON object out); with an instance the qualifying data is SHA-256(nonce ‖ instance id). A
//! request may carry a `credential` (a verifier's TPM2_MakeCredential for the AK it enrols):
//! the agent has the TPM activate it with the EK and returns the secret as `activated` in the
//! evidence; when the TPM refuses (the credential was made for an AK that is not in this TPM,
//! or for another TPM's EK) the evidence carries no `activated` and the verifier refuses.
//!
//! `bulkhead-host-agent --socket PATH --host HOST [--tcti device:/dev/tpmrm0]`

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::ExitCode;

use bulkhead_rot::boot::BOOT_PCRS;
use bulkhead_rot::tpm::Tpm;
use bulkhead_rot_proto::{
    encode_reply, parse_request, qualifying_data, AgentError, AkPublic, BootEvidence, HostEvidence,
    EVIDENCE_FORMAT, MAX_REQUEST_LINE,
};

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
}

/// What the agent holds for its answers.
struct Identity {
    host: String,
    ak: AkPublic,
    /// The EK certificate (DER, hex), if the TPM's manufacturer stored one.
    ek_certificate: Option<String>,
}

fn answer(tpm: &mut Tpm, id: &Identity, line: &[u8]) -> String {
    let result = parse_request(line).and_then(|call| {
        let activated = match &call.credential {
            None => None,
            Some(c) => match tpm.activate_credential(c) {
                Ok(secret) => Some(hex::encode(secret.as_slice())),
                Err(e) => {
                    tracing::warn!(error = %e, "the TPM refused the credential");
                    None
                }
            },
        };
        let qd = qualifying_data(&call.nonce, call.instance.as_deref());
        let (quote, values) = tpm.quote_sha256_pcrs(&BOOT_PCRS, &qd).map_err(|e| {
            tracing::error!(error = %e, "quote failed");
            AgentError::QuoteFailed
        })?;
        Ok(HostEvidence::Boot(BootEvidence {
            format: EVIDENCE_FORMAT.to_string(),
            host: id.host.clone(),
            ak: id.ak.clone(),
            quote,
            pcrs: BOOT_PCRS
                .iter()
                .copied()
                .zip(values.iter().map(hex::encode))
                .collect(),
            ek_certificate: id.ek_certificate.clone(),
            activated,
        }))
    });
    encode_reply(&result)
}

fn serve(tpm: &mut Tpm, id: &Identity, stream: UnixStream) {
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    loop {
        let mut line = Vec::new();
        let limit = u64::try_from(MAX_REQUEST_LINE).unwrap_or(256);
        match reader.by_ref().take(limit).read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if line.last() != Some(&b'\n') {
            let mut out = encode_reply(&Err(AgentError::TooLong));
            out.push('\n');
            let _ = writer.write_all(out.as_bytes());
            return;
        }
        line.pop();
        let mut out = answer(tpm, id, &line);
        out.push('\n');
        if writer.write_all(out.as_bytes()).is_err() {
            return;
        }
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    let args: Vec<String> = std::env::args().collect();
    let (Some(socket), Some(host)) = (arg(&args, "--socket"), arg(&args, "--host")) else {
        eprintln!("usage: bulkhead-host-agent --socket PATH --host HOST [--tcti T]");
        return ExitCode::from(2);
    };
    let tcti = arg(&args, "--tcti").unwrap_or_else(|| "device:/dev/tpmrm0".to_string());
    let mut tpm = match Tpm::open(&tcti) {
        Ok(t) => t,
        Err(e) => {
            tracing::error!(error = %e, tcti, "cannot open the TPM");
            return ExitCode::FAILURE;
        }
    };
    let ak = match tpm.ak_public() {
        Ok(a) => a,
        Err(e) => {
            tracing::error!(error = %e, "cannot derive the attestation key");
            return ExitCode::FAILURE;
        }
    };
    let ek_certificate = match tpm.ek_certificate() {
        Ok(der) => Some(hex::encode(der)),
        Err(e) => {
            tracing::warn!(error = %e, "no EK certificate: a verifier will not enrol this AK");
            None
        }
    };
    let _ = std::fs::remove_file(&socket);
    let listener = match UnixListener::bind(&socket) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, socket, "cannot listen");
            return ExitCode::FAILURE;
        }
    };
    let _ = std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600));
    // One write(2) per line: the console is shared with PID 1 and the kernel, and a line
    // written in pieces can be interleaved with theirs.
    let line = format!(
        "BULKHEAD-HOST-AK {}\nBULKHEAD-HOST-AGENT ready on {socket}\n",
        ak.0
    );
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
    let id = Identity {
        host,
        ak,
        ek_certificate,
    };
    for conn in listener.incoming() {
        match conn {
            Ok(s) => serve(&mut tpm, &id, s),
            Err(e) => tracing::warn!(error = %e, "accept"),
        }
    }
    ExitCode::SUCCESS
}

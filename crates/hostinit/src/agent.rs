//! `bulkhead-host-agent`: the sealed host's attestation agent. It opens the TPM, prints the
//! attestation key on the console (`BULKHEAD-HOST-AK <hex>`: what an operator enrols; see
//! host/README.md for why this is trust on first use until the EK chain is checked), then
//! answers verifier nonces on a unix socket (mode 0600) that only the controller connects to,
//! with [`BootEvidence`]: a quote over SHA-256 PCRs 4, 9, 11, 12 and 23 and their values.
//!
//! Same line protocol as `bulkhead_rot::agent` (`{"nonce":"<64 hex>","instance"?:…}` in, one
//! JSON object out); with an instance the qualifying data is SHA-256(nonce ‖ instance id).
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

fn answer(tpm: &mut Tpm, host: &str, ak: &AkPublic, line: &[u8]) -> String {
    let result = parse_request(line).and_then(|(nonce, instance)| {
        let qd = qualifying_data(&nonce, instance.as_deref());
        let (quote, values) = tpm.quote_sha256_pcrs(&BOOT_PCRS, &qd).map_err(|e| {
            tracing::error!(error = %e, "quote failed");
            AgentError::QuoteFailed
        })?;
        Ok(HostEvidence::Boot(BootEvidence {
            format: EVIDENCE_FORMAT.to_string(),
            host: host.to_string(),
            ak: ak.clone(),
            quote,
            pcrs: BOOT_PCRS
                .iter()
                .copied()
                .zip(values.iter().map(hex::encode))
                .collect(),
        }))
    });
    encode_reply(&result)
}

fn serve(tpm: &mut Tpm, host: &str, ak: &AkPublic, stream: UnixStream) {
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
        let mut out = answer(tpm, host, ak, &line);
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
    for conn in listener.incoming() {
        match conn {
            Ok(s) => serve(&mut tpm, &host, &ak, s),
            Err(e) => tracing::warn!(error = %e, "accept"),
        }
    }
    ExitCode::SUCCESS
}

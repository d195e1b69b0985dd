//! Root-of-trust benchmark (run by scripts/bench-rot.sh): on a real swtpm, measured start,
//! unseal, attestation round trip (challenge → quote → verify), the full host start (measured
//! start + unseal + self-tests), and a wave deploy to N simulated hosts (one swtpm each).
//! Prints a markdown section to stdout.
//!
//! `rot_bench [ITERATIONS] [HOSTS]`

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bulkhead_audit::AuditLog;
use bulkhead_rot::attest::Verifier;
use bulkhead_rot::deploy::{deploy, DeployerAuth, Deployment};
use bulkhead_rot::host::{Host, HostConfig};
use bulkhead_rot::identity::SealedIdentity;
use bulkhead_rot::measure::{measured_start, Environment, EventKind, Measured};
use bulkhead_rot::release::{Manifest, ReleaseKey, SignedRelease, TrustRoot};
use bulkhead_rot::swtpm::{swtpm_available, Swtpm};
use bulkhead_rot::tpm::MeasurePcr;
use bulkhead_rot::RotError;

type R<T> = Result<T, Box<dyn std::error::Error>>;

fn artefacts(dir: &Path, tag: &str) -> R<Vec<(EventKind, PathBuf)>> {
    // A 4 MiB "binary" so measuring has realistic work, plus a config and a policy.
    let big: Vec<u8> = (0..4 * 1024 * 1024u32)
        .map(|i| i.wrapping_mul(2_654_435_761).to_be_bytes()[0])
        .collect();
    let mut body = format!("#!/bin/sh\n# {tag}\nexit 0\n").into_bytes();
    body.extend_from_slice(b"\n#");
    std::fs::write(dir.join("bulkhead-controller"), &body)?;
    std::fs::write(dir.join("bulkhead-hypervisor.img"), &big)?;
    std::fs::write(dir.join("host.toml"), format!("# {tag}\n"))?;
    std::fs::write(dir.join("rights.toml"), "version = 1\n")?;
    Ok(vec![
        (EventKind::Binary, dir.join("bulkhead-controller")),
        (EventKind::Config, dir.join("bulkhead-hypervisor.img")),
        (EventKind::Config, dir.join("host.toml")),
        (EventKind::Policy, dir.join("rights.toml")),
    ])
}

fn release(
    keys: &[ReleaseKey],
    version: u64,
    env: &Environment,
    files: &[(EventKind, PathBuf)],
) -> R<SignedRelease> {
    let refs: Vec<(EventKind, &Path)> = files.iter().map(|(k, p)| (*k, p.as_path())).collect();
    let m = Manifest::from_files(
        version,
        env.clone(),
        bulkhead_rot::unix_now() + 3600,
        MeasurePcr::DEV,
        &refs,
    )?;
    let mut r = SignedRelease::new(&m)?;
    r.sign(&keys[0]);
    r.sign(&keys[1]);
    Ok(r)
}

fn stats(mut v: Vec<Duration>) -> (f64, f64) {
    v.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let med = v.get(v.len() / 2).copied().map(ms).unwrap_or(0.0);
    let p95 = v
        .get((v.len() * 95 / 100).min(v.len().saturating_sub(1)))
        .copied()
        .map(ms)
        .unwrap_or(0.0);
    (med, p95)
}

fn host(name: &str, env: &Environment, root: &TrustRoot, dir: &Path) -> R<(Swtpm, Host)> {
    let sw = Swtpm::start()?;
    let cfg = HostConfig {
        name: name.into(),
        root: dir.to_path_buf(),
        environment: env.clone(),
        pcr: MeasurePcr::DEV,
        dev_reset_pcr: true,
        trust_root: root.clone(),
    };
    let h = Host::open(cfg, &sw.tcti())?;
    Ok((sw, h))
}

fn main() -> R<()> {
    let args: Vec<String> = std::env::args().collect();
    let iters: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(20);
    let n_hosts: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(10);
    println!("## Root of trust");
    println!();
    if !swtpm_available() {
        println!("*** SKIPPED: swtpm not installed ***");
        eprintln!("*** SKIPPED bench-rot: swtpm binary not found ***");
        return Ok(());
    }
    let env = Environment::parse("staging")?;
    let keys: Vec<ReleaseKey> = (0..3)
        .map(|_| ReleaseKey::generate())
        .collect::<Result<_, RotError>>()?;
    let root = TrustRoot::new(2, keys.iter().map(|k| k.public()).collect())?;
    let work = tempfile::tempdir()?;
    let src = work.path().join("v1");
    std::fs::create_dir_all(&src)?;
    let files = artefacts(&src, "v1")?;
    let rel1 = release(&keys, 1, &env, &files)?;

    // One host: measured start, unseal, attestation round trip, full start.
    let hdir = work.path().join("bench-host");
    let (_sw, mut h) = host("bench-host", &env, &root, &hdir)?;
    let enrol = h.provision(&rel1, &src)?;
    let mut verifier = Verifier::new(env.clone(), MeasurePcr::DEV);
    verifier.enroll(enrol);
    verifier.accept_release(&rel1.unverified_manifest()?);
    let first = h.boot();
    if !first.accepts_customer_work {
        return Err(first.summary().into());
    }
    let items: Vec<Measured> = rel1
        .unverified_manifest()?
        .artefacts
        .iter()
        .map(|a| Measured {
            kind: a.kind,
            name: a.name.clone(),
            path: h.release_dir(1).join(&a.name),
        })
        .collect();
    let sealed = SealedIdentity::read(&hdir.join("identity-v1.json"))?;
    let (mut t_measure, mut t_unseal, mut t_attest, mut t_boot) = (vec![], vec![], vec![], vec![]);
    for _ in 0..iters {
        let t = Instant::now();
        measured_start(h.tpm(), MeasurePcr::DEV, &env, &items, true)?;
        t_measure.push(t.elapsed());
        let t = Instant::now();
        let _k = bulkhead_rot::identity::unseal_identity(h.tpm(), &sealed)?;
        t_unseal.push(t.elapsed());
        let t = Instant::now();
        let hh = h.boot();
        t_boot.push(t.elapsed());
        if !hh.accepts_customer_work {
            return Err(hh.summary().into());
        }
        let t = Instant::now();
        let nonce = verifier.challenge("bench-host")?;
        let ev = h.attest(&nonce)?;
        verifier.verify(&ev)?;
        t_attest.push(t.elapsed());
    }

    // Fleet deploy: provision N hosts at v1 (not timed), then deploy v2 in waves (timed).
    let mut fleet_sw = Vec::new();
    let mut fleet = Vec::new();
    let mut fv = Verifier::new(env.clone(), MeasurePcr::DEV);
    for i in 0..n_hosts {
        let (sw, mut fh) = host(
            &format!("host-{i}"),
            &env,
            &root,
            &work.path().join(format!("host-{i}")),
        )?;
        fv.enroll(fh.provision(&rel1, &src)?);
        if !fh.boot().accepts_customer_work {
            return Err("fleet host unhealthy".into());
        }
        fleet_sw.push(sw);
        fleet.push(fh);
    }
    let src2 = work.path().join("v2");
    std::fs::create_dir_all(&src2)?;
    let files2 = artefacts(&src2, "v2")?;
    let rel2 = release(&keys, 2, &env, &files2)?;
    let (audit, _) = AuditLog::open(&work.path().join("audit.log"))?;
    let svc = bulkhead_tokens::TokenService::new(
        biscuit_auth::KeyPair::new(),
        bulkhead_tokens::Policy::parse(bulkhead_tokens::policy::DEFAULT_RIGHTS_TOML)?,
    );
    let id = bulkhead_tokens::Identity {
        name: "operator".into(),
        role: bulkhead_tokens::Role::Operator,
        cert_sha256: "11".repeat(32),
    };
    let (token, _) = svc.mint(&bulkhead_tokens::MintRequest {
        caller: id.clone(),
        hosts: vec!["*".into()],
        operations: vec![bulkhead_tokens::Operation::DrainHost],
        resources: None,
        ttl: Duration::from_secs(600),
    })?;
    let tv = bulkhead_tokens::Verifier::new(svc.public_key());
    let revoked = bulkhead_tokens::RevocationList::default();
    let auth = DeployerAuth {
        token: &token,
        identity: &id,
        tokens: &tv,
        revoked: &revoked,
    };
    let mut d = Deployment {
        audit: &audit,
        root: &root,
        environment: env.clone(),
        verifier: &mut fv,
    };
    let t = Instant::now();
    let report = deploy(&mut d, &auth, &rel2, &src2, &mut fleet)?;
    let t_deploy = t.elapsed();

    let (m_med, m_p95) = stats(t_measure);
    let (u_med, u_p95) = stats(t_unseal);
    let (a_med, a_p95) = stats(t_attest);
    let (b_med, b_p95) = stats(t_boot);
    let bytes: u64 = files
        .iter()
        .filter_map(|(_, p)| std::fs::metadata(p).ok())
        .map(|m| m.len())
        .sum();
    println!(
        "swtpm {} over loopback TCP (a software TPM; a discrete hardware TPM is slower per command, so \
         these are lower bounds); machine shared with other builds; {iters} iterations; the release \
         has {} artefacts ({:.1} MiB measured).",
        swtpm_version(),
        files.len(),
        bytes as f64 / 1048576.0
    );
    println!();
    println!("| Operation | median ms | p95 ms |");
    println!("|---|---:|---:|");
    println!("| Measured start (PCR reset + SHA-384 of 4 files + 5 extends + read-back) | {m_med:.2} | {m_p95:.2} |");
    println!("| Unseal host identity (SRK + load + PolicyPCR session + unseal) | {u_med:.2} | {u_p95:.2} |");
    println!("| Host start: verify release + measured start + unseal + self-test | {b_med:.2} | {b_p95:.2} |");
    println!("| Attestation round trip (nonce → quote → verify sig, nonce, log, PCR) | {a_med:.2} | {a_p95:.2} |");
    println!();
    println!(
        "Deploy release 2 to {n_hosts} simulated hosts (own swtpm each) in waves {:?}, each host \
         installed, re-sealed, restarted and attested, every step audited (fsync): **{:.0} ms** \
         ({:.0} ms per host).",
        report.waves.iter().map(Vec::len).collect::<Vec<_>>(),
        t_deploy.as_secs_f64() * 1000.0,
        t_deploy.as_secs_f64() * 1000.0 / n_hosts.max(1) as f64
    );
    println!();
    drop(fleet);
    drop(fleet_sw);
    Ok(())
}

fn swtpm_version() -> String {
    std::process::Command::new("swtpm")
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| {
            s.split_whitespace()
                .nth(3)
                .map(|v| v.trim_end_matches(',').to_string())
        })
        .unwrap_or_else(|| "?".into())
}

//! AWS Signature Version 4 verification, computed exactly as the AWS SDKs compute it
//! (botocore's `SigV4Auth` is the reference the tests run against).
//!
//! ```text
//! canonical request = METHOD \n CANONICAL_URI \n CANONICAL_QUERY \n
//!                     name:trimall(value[,value...]) \n ... \n \n   (one line per signed header)
//!                     signed;headers \n hex(SHA-256(body))          (or x-amz-content-sha256)
//! string to sign    = "AWS4-HMAC-SHA256" \n X-Amz-Date \n SCOPE \n hex(SHA-256(canonical request))
//! scope             = YYYYMMDD/REGION/ec2/aws4_request
//! signing key       = HMAC(HMAC(HMAC(HMAC("AWS4" || secret, YYYYMMDD), REGION), "ec2"), "aws4_request")
//! Authorization     = AWS4-HMAC-SHA256 Credential=AKID/SCOPE, SignedHeaders=a;b;c, Signature=HEX
//! ```
//!
//! The canonical URI is the request path with dot segments and empty segments removed, then
//! URI-encoded again (non-S3 services double-encode: a `%` on the wire becomes `%25`). The
//! canonical query decodes every `key=value` pair, re-encodes it with the SigV4 unreserved set
//! and sorts by key then value. A `+` in the URL query decodes to a space, as AWS does: botocore
//! sends query parameters form-encoded (`urlencode`, space as `+`) but signs them as `%20`.
//!
//! Everything that arrives is untrusted: the header is parsed strictly, every size is capped, and
//! each refusal is a [`SigV4Error`] with the EC2 code an SDK understands ([`SigV4Error::code`]).
//! SigV4 has no nonce: the caller must keep the one-use record of
//! [`VerifiedRequest::signature`] itself.

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::code::Ec2ErrorCode;

type HmacSha256 = Hmac<Sha256>;

/// The only algorithm accepted.
pub const ALGORITHM: &str = "AWS4-HMAC-SHA256";
/// The service name in the credential scope.
pub const SERVICE: &str = "ec2";
/// The scope terminator.
pub const TERMINATOR: &str = "aws4_request";
/// Longest `Authorization` header accepted, in bytes.
pub const MAX_AUTHORIZATION_LEN: usize = 2048;
/// Most signed headers accepted.
pub const MAX_SIGNED_HEADERS: usize = 32;
/// Longest access key id accepted.
pub const MAX_ACCESS_KEY_ID_LEN: usize = 128;
/// Longest request path accepted, in bytes.
pub const MAX_PATH_LEN: usize = 2048;
/// Longest URL query accepted, in bytes.
pub const MAX_QUERY_LEN: usize = 16 * 1024;
/// Most URL query pairs accepted.
pub const MAX_QUERY_PAIRS: usize = 256;
/// Longest single header value that takes part in the canonical request.
pub const MAX_HEADER_VALUE_LEN: usize = 8 * 1024;
/// The default accepted difference between `X-Amz-Date` and the verifier's clock.
pub const DEFAULT_WINDOW_SECS: u64 = 300;

/// What is wrong inside an `Authorization` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthorizationDefect {
    /// Not printable ASCII.
    NotAscii,
    /// No space between the algorithm and its components.
    NoComponents,
    /// A component that is not `Name=value`, or an unknown name.
    UnknownComponent,
    /// A component given twice.
    DuplicateComponent,
    /// `Credential=` missing.
    MissingCredential,
    /// `SignedHeaders=` missing.
    MissingSignedHeaders,
    /// `Signature=` missing.
    MissingSignature,
    /// `Credential` is not `AKID/YYYYMMDD/REGION/SERVICE/TERMINATOR`.
    BadCredential,
    /// The access key id is empty, too long or has characters outside `A-Za-z0-9_-`.
    BadAccessKeyId,
    /// The scope date is not `YYYYMMDD`.
    BadScopeDate,
    /// A signed header name is empty or not lowercase token characters.
    BadSignedHeaderName,
    /// Signed header names are not sorted ascending without repeats.
    SignedHeadersNotSorted,
    /// More than [`MAX_SIGNED_HEADERS`] signed headers.
    TooManySignedHeaders,
    /// `Signature` is not 64 lowercase hex digits.
    BadSignature,
}

/// Why a request's signature was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SigV4Error {
    #[error("Request is missing Authentication Token")]
    MissingAuthorization,
    #[error("more than one Authorization header")]
    DuplicateAuthorization,
    #[error("Authorization header is {len} bytes, longer than {MAX_AUTHORIZATION_LEN}")]
    AuthorizationTooLong { len: usize },
    #[error("Unsupported authorization type (only AWS4-HMAC-SHA256 is accepted)")]
    UnsupportedAlgorithm,
    #[error("Authorization header is malformed: {0:?}")]
    MalformedAuthorization(AuthorizationDefect),
    #[error("Credential should be scoped to correct service: 'ec2'")]
    WrongService,
    #[error("Credential should be scoped to a valid region")]
    WrongRegion,
    #[error("Credential should be scoped with a valid terminator: 'aws4_request'")]
    WrongTerminator,
    #[error(
        "Date in Credential scope does not match YYYYMMDD from ISO-8601 version of date from HTTP"
    )]
    ScopeDateMismatch,
    #[error("Authorization header requires existence of an 'X-Amz-Date' header")]
    MissingAmzDate,
    #[error("more than one X-Amz-Date header")]
    DuplicateAmzDate,
    #[error("X-Amz-Date is not YYYYMMDDTHHMMSSZ")]
    MalformedAmzDate,
    #[error("Request has expired (X-Amz-Date is {skew_secs} s from the server's clock)")]
    OutsideWindow { skew_secs: i64 },
    #[error("'Host' must be a 'SignedHeader' in the AWS Authorization")]
    HostNotSigned,
    #[error("'X-Amz-Date' must be a 'SignedHeader' in the AWS Authorization")]
    AmzDateNotSigned,
    #[error("'X-Amz-Content-Sha256' is present and must be a 'SignedHeader'")]
    ContentSha256NotSigned,
    #[error("a signed header is not in the request")]
    SignedHeaderAbsent,
    #[error("a signed header value is not UTF-8 or is too long")]
    BadHeaderValue,
    #[error("X-Amz-Content-Sha256 does not match the body")]
    PayloadHashMismatch,
    #[error("the request path is malformed")]
    MalformedPath,
    #[error("the URL query string is malformed")]
    MalformedQuery,
    #[error("temporary credentials (X-Amz-Security-Token) are not supported")]
    SecurityTokenUnsupported,
    #[error("query-string (presigned) authentication is not supported")]
    QueryAuthUnsupported,
    #[error("AWS was not able to validate the provided access credentials")]
    UnknownAccessKey,
    #[error("The request signature we calculated does not match the signature you provided")]
    SignatureMismatch,
}

impl SigV4Error {
    /// The EC2 error code for this refusal.
    pub fn code(&self) -> Ec2ErrorCode {
        use SigV4Error as E;
        match self {
            E::MissingAuthorization => Ec2ErrorCode::MissingAuthenticationToken,
            E::DuplicateAuthorization
            | E::AuthorizationTooLong { .. }
            | E::UnsupportedAlgorithm
            | E::MalformedAuthorization(_)
            | E::MissingAmzDate
            | E::DuplicateAmzDate
            | E::MalformedAmzDate
            | E::HostNotSigned
            | E::AmzDateNotSigned
            | E::ContentSha256NotSigned => Ec2ErrorCode::IncompleteSignature,
            E::WrongService
            | E::WrongRegion
            | E::WrongTerminator
            | E::ScopeDateMismatch
            | E::SignedHeaderAbsent
            | E::BadHeaderValue
            | E::PayloadHashMismatch
            | E::MalformedPath
            | E::SignatureMismatch => Ec2ErrorCode::SignatureDoesNotMatch,
            E::MalformedQuery => Ec2ErrorCode::MalformedQueryString,
            E::OutsideWindow { .. } => Ec2ErrorCode::RequestExpired,
            E::SecurityTokenUnsupported | E::QueryAuthUnsupported | E::UnknownAccessKey => {
                Ec2ErrorCode::AuthFailure
            }
        }
    }
}

/// A customer's secret access key, wiped from memory when dropped.
pub struct SecretKey(Zeroizing<Vec<u8>>);

impl SecretKey {
    pub fn new(secret: impl Into<Vec<u8>>) -> Self {
        Self(Zeroizing::new(secret.into()))
    }

    /// A Bulkhead customer's SigV4 secret access key: the base64 text of its raw (32-byte)
    /// secret, what the credentials file and `AWS_SECRET_ACCESS_KEY` carry.
    pub fn from_raw_secret(raw: &[u8]) -> Self {
        use base64::Engine as _;
        Self::new(
            base64::engine::general_purpose::STANDARD
                .encode(raw)
                .into_bytes(),
        )
    }
}

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretKey(..)")
    }
}

/// Where the verifier finds a customer's secret by access key id (the control plane's customer
/// table, the KMS's own copy). Any `Fn(&str) -> Option<SecretKey>` is one.
pub trait SecretLookup {
    fn secret_for(&self, access_key_id: &str) -> Option<SecretKey>;
}

impl<F: Fn(&str) -> Option<SecretKey>> SecretLookup for F {
    fn secret_for(&self, access_key_id: &str) -> Option<SecretKey> {
        self(access_key_id)
    }
}

/// The parts of an HTTP request that SigV4 covers, as they arrived.
#[derive(Debug, Clone, Copy)]
pub struct HttpRequestParts<'a> {
    /// The method, e.g. `POST`.
    pub method: &'a str,
    /// The path exactly as on the request line, without the query (e.g. `/`).
    pub path: &'a str,
    /// The raw query after `?`, or `""`.
    pub query: &'a str,
    /// Every header in arrival order; names in any case.
    pub headers: &'a [(&'a str, &'a [u8])],
    /// The body exactly as received.
    pub body: &'a [u8],
}

impl HttpRequestParts<'_> {
    fn header_values<'s>(&'s self, name: &'s str) -> impl Iterator<Item = &'s [u8]> + 's {
        self.headers
            .iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| *v)
    }
}

/// A UTC timestamp in `X-Amz-Date` form, checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AmzDate {
    text: [u8; 16],
    /// Seconds since the Unix epoch.
    pub unix: i64,
}

impl AmzDate {
    /// Parses `YYYYMMDDTHHMMSSZ`.
    pub fn parse(raw: &[u8]) -> Result<Self, SigV4Error> {
        let text: [u8; 16] = raw.try_into().map_err(|_| SigV4Error::MalformedAmzDate)?;
        if text[8] != b'T' || text[15] != b'Z' {
            return Err(SigV4Error::MalformedAmzDate);
        }
        let num = |r: std::ops::Range<usize>| -> Result<i64, SigV4Error> {
            let mut v: i64 = 0;
            for &b in text.get(r).ok_or(SigV4Error::MalformedAmzDate)? {
                if !b.is_ascii_digit() {
                    return Err(SigV4Error::MalformedAmzDate);
                }
                v = v * 10 + i64::from(b - b'0');
            }
            Ok(v)
        };
        let (y, mo, d) = (num(0..4)?, num(4..6)?, num(6..8)?);
        let (h, mi, s) = (num(9..11)?, num(11..13)?, num(13..15)?);
        if !(1..=12).contains(&mo)
            || d < 1
            || d > days_in_month(y, mo)
            || h > 23
            || mi > 59
            || s > 59
        {
            return Err(SigV4Error::MalformedAmzDate);
        }
        let unix = days_from_civil(y, mo, d) * 86_400 + h * 3600 + mi * 60 + s;
        Ok(Self { text, unix })
    }

    /// The timestamp as sent, `YYYYMMDDTHHMMSSZ`.
    pub fn as_str(&self) -> &str {
        // Every byte was checked to be an ASCII digit, 'T' or 'Z' in `parse`.
        std::str::from_utf8(&self.text).unwrap_or_default()
    }

    /// The `YYYYMMDD` part.
    pub fn day(&self) -> &str {
        self.as_str().get(..8).unwrap_or_default()
    }
}

fn is_leap(y: i64) -> bool {
    (y % 4 == 0 && y % 100 != 0) || y % 400 == 0
}

fn days_in_month(y: i64, m: i64) -> i64 {
    match m {
        2 if is_leap(y) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
pub(crate) fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// (year, month, day) of a day count since 1970-01-01 (H. Hinnant's algorithm).
pub(crate) fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// The parsed `Authorization` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authorization {
    pub access_key_id: String,
    /// `YYYYMMDD` from the credential scope.
    pub scope_date: String,
    pub region: String,
    pub service: String,
    /// Lowercase, sorted, unique.
    pub signed_headers: Vec<String>,
    pub signature: [u8; 32],
}

impl Authorization {
    /// Parses `AWS4-HMAC-SHA256 Credential=AKID/DATE/REGION/SERVICE/aws4_request,
    /// SignedHeaders=a;b, Signature=HEX` strictly: each component once, in any order, separated
    /// by `,` with optional spaces.
    pub fn parse(raw: &[u8]) -> Result<Self, SigV4Error> {
        use AuthorizationDefect as D;
        let bad = SigV4Error::MalformedAuthorization;
        if raw.len() > MAX_AUTHORIZATION_LEN {
            return Err(SigV4Error::AuthorizationTooLong { len: raw.len() });
        }
        if !raw.iter().all(|b| (0x20..0x7f).contains(b)) {
            return Err(bad(D::NotAscii));
        }
        let text = std::str::from_utf8(raw).map_err(|_| bad(D::NotAscii))?;
        let text = text.trim_matches(' ');
        let (alg, rest) = match text.split_once(' ') {
            Some(p) => p,
            None if text == ALGORITHM => return Err(bad(D::NoComponents)),
            None => return Err(SigV4Error::UnsupportedAlgorithm),
        };
        if alg != ALGORITHM {
            return Err(SigV4Error::UnsupportedAlgorithm);
        }
        let (mut credential, mut signed, mut signature) = (None, None, None);
        for component in rest.split(',') {
            let component = component.trim_matches(' ');
            let (name, value) = component.split_once('=').ok_or(bad(D::UnknownComponent))?;
            let slot = match name {
                "Credential" => &mut credential,
                "SignedHeaders" => &mut signed,
                "Signature" => &mut signature,
                _ => return Err(bad(D::UnknownComponent)),
            };
            if slot.replace(value).is_some() {
                return Err(bad(D::DuplicateComponent));
            }
        }
        let credential = credential.ok_or(bad(D::MissingCredential))?;
        let signed = signed.ok_or(bad(D::MissingSignedHeaders))?;
        let signature = signature.ok_or(bad(D::MissingSignature))?;

        let parts: Vec<&str> = credential.split('/').collect();
        let [akid, date, region, service, terminator] = parts.as_slice() else {
            return Err(bad(D::BadCredential));
        };
        if akid.is_empty()
            || akid.len() > MAX_ACCESS_KEY_ID_LEN
            || !akid
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err(bad(D::BadAccessKeyId));
        }
        if date.len() != 8 || !date.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad(D::BadScopeDate));
        }
        if region.is_empty() || service.is_empty() {
            return Err(bad(D::BadCredential));
        }
        if *terminator != TERMINATOR {
            return Err(SigV4Error::WrongTerminator);
        }

        let mut signed_headers: Vec<String> = Vec::new();
        for name in signed.split(';') {
            if name.is_empty()
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b))
            {
                return Err(bad(D::BadSignedHeaderName));
            }
            if signed_headers.len() == MAX_SIGNED_HEADERS {
                return Err(bad(D::TooManySignedHeaders));
            }
            if signed_headers
                .last()
                .is_some_and(|prev| prev.as_str() >= name)
            {
                return Err(bad(D::SignedHeadersNotSorted));
            }
            signed_headers.push(name.to_owned());
        }

        if signature.len() != 64
            || !signature
                .bytes()
                .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        {
            return Err(bad(D::BadSignature));
        }
        let mut sig = [0u8; 32];
        hex::decode_to_slice(signature, &mut sig).map_err(|_| bad(D::BadSignature))?;

        Ok(Self {
            access_key_id: (*akid).to_owned(),
            scope_date: (*date).to_owned(),
            region: (*region).to_owned(),
            service: (*service).to_owned(),
            signed_headers,
            signature: sig,
        })
    }

    /// `DATE/REGION/SERVICE/aws4_request`.
    pub fn scope(&self) -> String {
        format!(
            "{}/{}/{}/{TERMINATOR}",
            self.scope_date, self.region, self.service
        )
    }
}

/// A request whose signature verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedRequest {
    pub access_key_id: String,
    pub region: String,
    pub amz_date: AmzDate,
    /// The signature: what the caller records to accept it only once.
    pub signature: [u8; 32],
}

/// Verifies SigV4 requests for one region.
#[derive(Debug, Clone)]
pub struct Verifier {
    region: String,
    window_secs: u64,
}

impl Verifier {
    /// A verifier for `region` with the default date window ([`DEFAULT_WINDOW_SECS`]).
    pub fn new(region: impl Into<String>) -> Self {
        Self {
            region: region.into(),
            window_secs: DEFAULT_WINDOW_SECS,
        }
    }

    /// Accept `X-Amz-Date` up to `secs` before or after the verifier's clock.
    pub fn with_window_secs(mut self, secs: u64) -> Self {
        self.window_secs = secs;
        self
    }

    pub fn region(&self) -> &str {
        &self.region
    }

    /// Checks `req` at time `now_unix` (seconds since the epoch) against the secret `secrets`
    /// holds for its access key. Does not record the signature: that is the caller's job.
    pub fn verify(
        &self,
        req: &HttpRequestParts<'_>,
        now_unix: i64,
        secrets: &dyn SecretLookup,
    ) -> Result<VerifiedRequest, SigV4Error> {
        if req.header_values("x-amz-security-token").next().is_some() {
            return Err(SigV4Error::SecurityTokenUnsupported);
        }
        for (key, _) in query_pairs(req.query)? {
            if key.eq_ignore_ascii_case("X-Amz-Security-Token") {
                return Err(SigV4Error::SecurityTokenUnsupported);
            }
            if key.eq_ignore_ascii_case("X-Amz-Signature")
                || key.eq_ignore_ascii_case("X-Amz-Credential")
                || key.eq_ignore_ascii_case("X-Amz-Algorithm")
            {
                return Err(SigV4Error::QueryAuthUnsupported);
            }
        }
        let mut auths = req.header_values("authorization");
        let raw_auth = auths.next().ok_or(SigV4Error::MissingAuthorization)?;
        if auths.next().is_some() {
            return Err(SigV4Error::DuplicateAuthorization);
        }
        let auth = Authorization::parse(raw_auth)?;
        if auth.service != SERVICE {
            return Err(SigV4Error::WrongService);
        }
        if auth.region != self.region {
            return Err(SigV4Error::WrongRegion);
        }
        let is_signed = |h: &str| auth.signed_headers.iter().any(|s| s == h);
        if !is_signed("host") {
            return Err(SigV4Error::HostNotSigned);
        }
        if !is_signed("x-amz-date") {
            return Err(SigV4Error::AmzDateNotSigned);
        }
        let mut dates = req.header_values("x-amz-date");
        let raw_date = dates.next().ok_or(SigV4Error::MissingAmzDate)?;
        if dates.next().is_some() {
            return Err(SigV4Error::DuplicateAmzDate);
        }
        let amz_date = AmzDate::parse(raw_date)?;
        if amz_date.day() != auth.scope_date {
            return Err(SigV4Error::ScopeDateMismatch);
        }
        let skew = amz_date.unix.saturating_sub(now_unix);
        if skew.unsigned_abs() > self.window_secs {
            return Err(SigV4Error::OutsideWindow { skew_secs: skew });
        }
        let canonical = canonical_request(req, &auth)?;
        let secret = secrets
            .secret_for(&auth.access_key_id)
            .ok_or(SigV4Error::UnknownAccessKey)?;
        let sts = string_to_sign(&amz_date, &auth, &canonical);
        let key = signing_key(&secret, &auth.scope_date, &auth.region, &auth.service);
        let mut mac = HmacSha256::new_from_slice(key.as_slice())
            .map_err(|_| SigV4Error::SignatureMismatch)?;
        mac.update(sts.as_bytes());
        // `verify_slice` compares in constant time.
        mac.verify_slice(&auth.signature)
            .map_err(|_| SigV4Error::SignatureMismatch)?;
        Ok(VerifiedRequest {
            access_key_id: auth.access_key_id,
            region: auth.region,
            amz_date,
            signature: auth.signature,
        })
    }
}

/// The SigV4 canonical request for `req` under the signed headers of `auth`.
pub fn canonical_request(
    req: &HttpRequestParts<'_>,
    auth: &Authorization,
) -> Result<String, SigV4Error> {
    if req.method.is_empty()
        || req.method.len() > 16
        || !req.method.bytes().all(|b| b.is_ascii_uppercase())
    {
        return Err(SigV4Error::MalformedPath);
    }
    let mut out = String::with_capacity(256 + req.query.len());
    out.push_str(req.method);
    out.push('\n');
    out.push_str(&canonical_uri(req.path)?);
    out.push('\n');
    out.push_str(&canonical_query(req.query)?);
    out.push('\n');
    for name in &auth.signed_headers {
        let mut values = req.header_values(name).peekable();
        if values.peek().is_none() {
            return Err(SigV4Error::SignedHeaderAbsent);
        }
        out.push_str(name);
        out.push(':');
        for (i, v) in values.enumerate() {
            if v.len() > MAX_HEADER_VALUE_LEN {
                return Err(SigV4Error::BadHeaderValue);
            }
            let v = std::str::from_utf8(v).map_err(|_| SigV4Error::BadHeaderValue)?;
            if i > 0 {
                out.push(',');
            }
            trim_all_into(v, &mut out);
        }
        out.push('\n');
    }
    out.push('\n');
    out.push_str(&auth.signed_headers.join(";"));
    out.push('\n');
    let actual = hex::encode(Sha256::digest(req.body));
    let mut claimed = req.header_values("x-amz-content-sha256");
    if let Some(c) = claimed.next() {
        if claimed.next().is_some() || c != actual.as_bytes() {
            return Err(SigV4Error::PayloadHashMismatch);
        }
        if !auth
            .signed_headers
            .iter()
            .any(|s| s == "x-amz-content-sha256")
        {
            return Err(SigV4Error::ContentSha256NotSigned);
        }
    }
    out.push_str(&actual);
    Ok(out)
}

/// `AWS4-HMAC-SHA256 \n DATE \n SCOPE \n hex(SHA-256(canonical))`.
pub fn string_to_sign(date: &AmzDate, auth: &Authorization, canonical: &str) -> String {
    format!(
        "{ALGORITHM}\n{}\n{}\n{}",
        date.as_str(),
        auth.scope(),
        hex::encode(Sha256::digest(canonical.as_bytes()))
    )
}

pub(crate) fn hmac(key: &[u8], data: &[u8]) -> Zeroizing<[u8; 32]> {
    // HMAC accepts keys of any length; the fallback is unreachable but keeps this panic-free.
    let mut out = Zeroizing::new([0u8; 32]);
    if let Ok(mut mac) = HmacSha256::new_from_slice(key) {
        mac.update(data);
        out.copy_from_slice(&mac.finalize().into_bytes());
    }
    out
}

/// The derived signing key for one day, region and service.
fn signing_key(secret: &SecretKey, day: &str, region: &str, service: &str) -> Zeroizing<[u8; 32]> {
    let mut k = Zeroizing::new(Vec::with_capacity(4 + secret.0.len()));
    k.extend_from_slice(b"AWS4");
    k.extend_from_slice(&secret.0);
    let k_date = hmac(&k, day.as_bytes());
    let k_region = hmac(k_date.as_slice(), region.as_bytes());
    let k_service = hmac(k_region.as_slice(), service.as_bytes());
    hmac(k_service.as_slice(), TERMINATOR.as_bytes())
}

/// The signature over `string_to_sign` (what a client sends; used by tests and by callers that
/// sign on a customer's behalf with the customer's own secret).
pub fn sign(secret: &SecretKey, auth_scope: (&str, &str, &str), string_to_sign: &str) -> [u8; 32] {
    let (day, region, service) = auth_scope;
    let key = signing_key(secret, day, region, service);
    *hmac(key.as_slice(), string_to_sign.as_bytes())
}

/// Python's `str.split()` whitespace, which is what botocore's trimall splits on.
fn is_py_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

fn trim_all_into(v: &str, out: &mut String) {
    for (i, word) in v.split(is_py_space).filter(|w| !w.is_empty()).enumerate() {
        if i > 0 {
            out.push(' ');
        }
        out.push_str(word);
    }
}

/// Percent-encodes everything but `A-Za-z0-9-_.~` (and `/` when `keep_slash`).
pub(crate) fn uri_encode(raw: &[u8], keep_slash: bool, out: &mut String) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for &b in raw {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) || (keep_slash && b == b'/') {
            out.push(char::from(b));
        } else {
            out.push('%');
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0xf)]));
        }
    }
}

/// botocore's `quote(remove_dot_segments(path), safe='/~')`.
pub fn canonical_uri(path: &str) -> Result<String, SigV4Error> {
    if path.len() > MAX_PATH_LEN || !path.starts_with('/') {
        return Err(SigV4Error::MalformedPath);
    }
    let mut kept: Vec<&str> = Vec::new();
    for seg in path.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                kept.pop();
            }
            s => kept.push(s),
        }
    }
    let mut normal = String::from("/");
    normal.push_str(&kept.join("/"));
    if path.ends_with('/') && !kept.is_empty() {
        normal.push('/');
    }
    let mut out = String::with_capacity(normal.len());
    uri_encode(normal.as_bytes(), true, &mut out);
    Ok(out)
}

/// Decodes `%XX` escapes and `+` as a space.
pub(crate) fn percent_decode(raw: &str) -> Option<Vec<u8>> {
    let b = raw.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while let Some(&c) = b.get(i) {
        if c == b'%' {
            let hi = b.get(i + 1).and_then(|h| char::from(*h).to_digit(16))?;
            let lo = b.get(i + 2).and_then(|h| char::from(*h).to_digit(16))?;
            out.push(u8::try_from(hi * 16 + lo).ok()?);
            i += 3;
        } else {
            out.push(if c == b'+' { b' ' } else { c });
            i += 1;
        }
    }
    Some(out)
}

/// The raw query split into decoded `(key, value)` pairs.
fn query_pairs(query: &str) -> Result<Vec<(String, Vec<u8>)>, SigV4Error> {
    if query.is_empty() {
        return Ok(Vec::new());
    }
    if query.len() > MAX_QUERY_LEN {
        return Err(SigV4Error::MalformedQuery);
    }
    let mut pairs = Vec::new();
    for piece in query.split('&') {
        if pairs.len() == MAX_QUERY_PAIRS || piece.is_empty() {
            return Err(SigV4Error::MalformedQuery);
        }
        let (k, v) = piece.split_once('=').unwrap_or((piece, ""));
        let k = percent_decode(k).ok_or(SigV4Error::MalformedQuery)?;
        let v = percent_decode(v).ok_or(SigV4Error::MalformedQuery)?;
        pairs.push((String::from_utf8_lossy(&k).into_owned(), v));
    }
    Ok(pairs)
}

/// Decoded, re-encoded with the unreserved set, sorted by key then value.
pub fn canonical_query(query: &str) -> Result<String, SigV4Error> {
    let mut encoded: Vec<(String, String)> = query_pairs(query)?
        .into_iter()
        .map(|(k, v)| {
            let (mut ek, mut ev) = (String::new(), String::new());
            uri_encode(k.as_bytes(), false, &mut ek);
            uri_encode(&v, false, &mut ev);
            (ek, ev)
        })
        .collect();
    encoded.sort();
    let mut out = String::new();
    for (i, (k, v)) in encoded.iter().enumerate() {
        if i > 0 {
            out.push('&');
        }
        out.push_str(k);
        out.push('=');
        out.push_str(v);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const AUTH: &str = "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/ec2/aws4_request, SignedHeaders=content-type;host;x-amz-date, Signature=5d672d79c15b13162d9279b0855cfba6789a8edb4c82c400e06b5924a6f2b5d7";

    #[test]
    fn authorization_parses_and_refuses() {
        let a = Authorization::parse(AUTH.as_bytes()).expect("parses");
        assert_eq!(a.access_key_id, "AKIDEXAMPLE");
        assert_eq!(a.scope(), "20150830/us-east-1/ec2/aws4_request");
        assert_eq!(a.signed_headers, ["content-type", "host", "x-amz-date"]);
        let bad = |s: &str| Authorization::parse(s.as_bytes()).unwrap_err();
        assert_eq!(
            bad("AWS4-HMAC-SHA512 Credential=x"),
            SigV4Error::UnsupportedAlgorithm
        );
        assert_eq!(
            bad(&AUTH.replace("content-type;host", "host;content-type")),
            SigV4Error::MalformedAuthorization(AuthorizationDefect::SignedHeadersNotSorted)
        );
        assert_eq!(
            bad(&format!("{AUTH}, Signature=00")),
            SigV4Error::MalformedAuthorization(AuthorizationDefect::DuplicateComponent)
        );
        assert_eq!(
            bad(&AUTH.replace("/aws4_request", "/aws5_request")),
            SigV4Error::WrongTerminator
        );
        assert_eq!(
            bad(&AUTH.replace("b5d7", "b5D7")),
            SigV4Error::MalformedAuthorization(AuthorizationDefect::BadSignature)
        );
        assert_eq!(
            bad(&AUTH.replace("AKIDEXAMPLE/", "")),
            SigV4Error::MalformedAuthorization(AuthorizationDefect::BadCredential)
        );
        assert!(matches!(
            bad(&"A".repeat(MAX_AUTHORIZATION_LEN + 1)),
            SigV4Error::AuthorizationTooLong { .. }
        ));
        assert_eq!(
            bad("AWS4-HMAC-SHA256 Credential=a\u{7f}"),
            SigV4Error::MalformedAuthorization(AuthorizationDefect::NotAscii)
        );
    }

    #[test]
    fn dates() {
        let d = AmzDate::parse(b"20150830T123600Z").expect("valid");
        assert_eq!(d.unix, 1_440_938_160);
        assert_eq!(d.day(), "20150830");
        for bad in [
            &b"20150230T123600Z"[..],
            b"20150830T246000Z",
            b"2015083T123600Z",
            b"20150830 123600Z",
        ] {
            assert_eq!(AmzDate::parse(bad), Err(SigV4Error::MalformedAmzDate));
        }
        assert!(AmzDate::parse(b"20240229T000000Z").is_ok());
    }

    #[test]
    fn canonical_parts_match_the_aws_test_suite() {
        assert_eq!(canonical_uri("/").unwrap(), "/");
        assert_eq!(canonical_uri("/example/..").unwrap(), "/");
        assert_eq!(canonical_uri("/./a//b/").unwrap(), "/a/b/");
        assert_eq!(canonical_uri("/%20/foo").unwrap(), "/%2520/foo");
        assert_eq!(
            canonical_query("Param2=value2&Param1=value1").unwrap(),
            "Param1=value1&Param2=value2"
        );
        assert_eq!(
            canonical_query("Param1=value2&Param1=Value1").unwrap(),
            "Param1=Value1&Param1=value2"
        );
        assert_eq!(canonical_query("a=%7e%20b&c").unwrap(), "a=~%20b&c=");
        assert_eq!(canonical_query("a=x+y%2B").unwrap(), "a=x%20y%2B");
        assert_eq!(canonical_query("a=%zz"), Err(SigV4Error::MalformedQuery));
        assert_eq!(canonical_query("a=1&&b=2"), Err(SigV4Error::MalformedQuery));
    }

    /// The AWS SigV4 test suite's `get-vanilla` vector (service `service`, region `us-east-1`).
    #[test]
    fn aws_suite_get_vanilla() {
        let headers: [(&str, &[u8]); 2] = [
            ("Host", b"example.amazonaws.com"),
            ("X-Amz-Date", b"20150830T123600Z"),
        ];
        let req = HttpRequestParts {
            method: "GET",
            path: "/",
            query: "",
            headers: &headers,
            body: b"",
        };
        let auth = Authorization::parse(
            b"AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, SignedHeaders=host;x-amz-date, Signature=5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31",
        )
        .unwrap();
        let canonical = canonical_request(&req, &auth).unwrap();
        assert_eq!(
            canonical,
            "GET\n/\n\nhost:example.amazonaws.com\nx-amz-date:20150830T123600Z\n\nhost;x-amz-date\ne3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        let date = AmzDate::parse(b"20150830T123600Z").unwrap();
        let sts = string_to_sign(&date, &auth, &canonical);
        let sig = sign(
            &SecretKey::new("wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"),
            ("20150830", "us-east-1", "service"),
            &sts,
        );
        assert_eq!(
            hex::encode(sig),
            "5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31"
        );
    }

    fn signed_request(date: &str, body: &[u8], secret: &str) -> (Vec<(String, Vec<u8>)>, Vec<u8>) {
        let mut headers: Vec<(String, Vec<u8>)> = vec![
            ("Host".into(), b"ec2.bulkhead.test".to_vec()),
            (
                "Content-Type".into(),
                b"application/x-www-form-urlencoded; charset=utf-8".to_vec(),
            ),
            ("X-Amz-Date".into(), date.as_bytes().to_vec()),
        ];
        let auth_wo_sig = Authorization {
            access_key_id: "AKID1".into(),
            scope_date: date[..8].into(),
            region: "bulkhead-1".into(),
            service: "ec2".into(),
            signed_headers: vec!["content-type".into(), "host".into(), "x-amz-date".into()],
            signature: [0; 32],
        };
        let hv: Vec<(&str, &[u8])> = headers
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_slice()))
            .collect();
        let req = HttpRequestParts {
            method: "POST",
            path: "/",
            query: "",
            headers: &hv,
            body,
        };
        let canonical = canonical_request(&req, &auth_wo_sig).unwrap();
        let sts = string_to_sign(
            &AmzDate::parse(date.as_bytes()).unwrap(),
            &auth_wo_sig,
            &canonical,
        );
        let sig = sign(
            &SecretKey::new(secret),
            (&date[..8], "bulkhead-1", "ec2"),
            &sts,
        );
        headers.push((
            "Authorization".into(),
            format!(
                "{ALGORITHM} Credential=AKID1/{}/bulkhead-1/ec2/aws4_request, SignedHeaders=content-type;host;x-amz-date, Signature={}",
                &date[..8],
                hex::encode(sig)
            )
            .into_bytes(),
        ));
        (headers, body.to_vec())
    }

    fn check(
        headers: &[(String, Vec<u8>)],
        body: &[u8],
        now: i64,
        v: &Verifier,
    ) -> Result<VerifiedRequest, SigV4Error> {
        let hv: Vec<(&str, &[u8])> = headers
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_slice()))
            .collect();
        let req = HttpRequestParts {
            method: "POST",
            path: "/",
            query: "",
            headers: &hv,
            body,
        };
        let lookup = |id: &str| (id == "AKID1").then(|| SecretKey::new("s3cret"));
        v.verify(&req, now, &lookup)
    }

    #[test]
    fn verifier_accepts_and_refuses() {
        let v = Verifier::new("bulkhead-1").with_window_secs(300);
        let now = AmzDate::parse(b"20240501T120000Z").unwrap().unix;
        let (h, body) = signed_request(
            "20240501T120000Z",
            b"Action=DescribeInstances&Version=2016-11-15",
            "s3cret",
        );
        assert!(check(&h, &body, now, &v).is_ok());
        assert_eq!(
            check(&h, b"Action=DescribeInstances&Version=2016-11-16", now, &v),
            Err(SigV4Error::SignatureMismatch)
        );
        assert!(matches!(
            check(&h, &body, now + 301, &v),
            Err(SigV4Error::OutsideWindow { skew_secs: -301 })
        ));
        assert_eq!(
            check(&h, &body, now, &Verifier::new("other-1")),
            Err(SigV4Error::WrongRegion)
        );
        let (h2, _) = signed_request("20240501T120000Z", &body, "wrong");
        assert_eq!(
            check(&h2, &body, now, &v),
            Err(SigV4Error::SignatureMismatch)
        );
        let mut h3 = h.clone();
        h3.push(("X-Amz-Security-Token".into(), b"tok".to_vec()));
        assert_eq!(
            check(&h3, &body, now, &v).unwrap_err().code(),
            Ec2ErrorCode::AuthFailure
        );
        let h4: Vec<_> = h
            .iter()
            .filter(|(n, _)| n != "Authorization")
            .cloned()
            .collect();
        assert_eq!(
            check(&h4, &body, now, &v).unwrap_err().code(),
            Ec2ErrorCode::MissingAuthenticationToken
        );
        let mut h5 = h.clone();
        h5.push((
            "x-amz-content-sha256".into(),
            hex::encode(Sha256::digest(b"other")).into_bytes(),
        ));
        assert_eq!(
            check(&h5, &body, now, &v),
            Err(SigV4Error::PayloadHashMismatch)
        );
        let h6: Vec<_> = h
            .iter()
            .map(|(n, val)| {
                if n == "Authorization" {
                    (
                        n.clone(),
                        String::from_utf8_lossy(val)
                            .replace("AKID1", "AKID2")
                            .into_bytes(),
                    )
                } else {
                    (n.clone(), val.clone())
                }
            })
            .collect();
        assert_eq!(
            check(&h6, &body, now, &v),
            Err(SigV4Error::UnknownAccessKey)
        );
    }
}

//! botocore's own `SigV4Auth` signs requests (different bodies, query strings, paths and
//! headers); the Rust verifier accepts every one, and refuses each after a one-byte change to the
//! body, a signed header, the date or the secret.

mod common;

use bulkhead_ec2_query::{
    AmzDate, Ec2ErrorCode, HttpRequestParts, SecretKey, SigV4Error, Verifier,
};

const AKID: &str = "AKIDBULKHEADTEST1";
const SECRET: &str = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY";
const REGION: &str = "bulkhead-test-1";

struct Signed {
    name: String,
    method: String,
    path: String,
    query: String,
    headers: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
}

impl Signed {
    fn verify(&self, secret: &str, now: Option<i64>) -> Result<(), SigV4Error> {
        let hv: Vec<(&str, &[u8])> = self
            .headers
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_slice()))
            .collect();
        let parts = HttpRequestParts {
            method: &self.method,
            path: &self.path,
            query: &self.query,
            headers: &hv,
            body: &self.body,
        };
        let now = now.unwrap_or_else(|| self.date().unix);
        let lookup = |id: &str| (id == AKID).then(|| SecretKey::new(secret));
        Verifier::new(REGION)
            .verify(&parts, now, &lookup)
            .map(|_| ())
    }

    fn date(&self) -> AmzDate {
        let raw = &self
            .header("x-amz-date")
            .expect("botocore sets X-Amz-Date")
            .1;
        AmzDate::parse(raw).expect("botocore's date parses")
    }

    fn header(&self, name: &str) -> Option<&(String, Vec<u8>)> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
    }

    fn with_header_byte_flipped(&self, name: &str, at: usize) -> Self {
        let mut s = self.clone_shallow();
        let h = s
            .headers
            .iter_mut()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .expect("header present");
        let i = at.min(h.1.len() - 1);
        h.1[i] = if h.1[i] == b'1' { b'2' } else { b'1' };
        s
    }

    fn clone_shallow(&self) -> Self {
        Self {
            name: self.name.clone(),
            method: self.method.clone(),
            path: self.path.clone(),
            query: self.query.clone(),
            headers: self.headers.clone(),
            body: self.body.clone(),
        }
    }
}

fn signed_by_botocore() -> Option<Vec<Signed>> {
    let python = common::python_with_botocore()?;
    let json = common::run_json(python, "sigv4_sign.py", &[AKID, SECRET, REGION], b"");
    let cases = json.as_array().expect("a list").iter().map(|c| Signed {
        name: c["name"].as_str().unwrap_or_default().into(),
        method: c["method"].as_str().unwrap_or_default().into(),
        path: c["path"].as_str().unwrap_or_default().into(),
        query: c["query"].as_str().unwrap_or_default().into(),
        headers: c["headers"]
            .as_array()
            .expect("headers")
            .iter()
            .map(|h| {
                let v: Vec<u8> = h[1]
                    .as_str()
                    .unwrap_or_default()
                    .chars()
                    .map(|c| u8::try_from(u32::from(c)).unwrap_or(b'?'))
                    .collect();
                (h[0].as_str().unwrap_or_default().to_owned(), v)
            })
            .collect(),
        body: hex::decode(c["body_hex"].as_str().unwrap_or_default()).expect("hex body"),
    });
    Some(cases.collect())
}

#[test]
fn botocore_signatures_verify_and_any_change_is_refused() {
    let Some(cases) = signed_by_botocore() else {
        return;
    };
    assert!(cases.len() >= 6, "the script signs at least six requests");
    for c in &cases {
        c.verify(SECRET, None)
            .unwrap_or_else(|e| panic!("{}: botocore's signature refused: {e}", c.name));

        // One byte of the body.
        if !c.body.is_empty() {
            let mut m = c.clone_shallow();
            let last = m.body.len() - 1;
            m.body[last] ^= 0x01;
            let want = if c.header("x-amz-content-sha256").is_some() {
                SigV4Error::PayloadHashMismatch
            } else {
                SigV4Error::SignatureMismatch
            };
            assert_eq!(m.verify(SECRET, None), Err(want), "{}: body", c.name);
        } else {
            let mut m = c.clone_shallow();
            m.body.push(b'x');
            assert_eq!(
                m.verify(SECRET, None),
                Err(SigV4Error::SignatureMismatch),
                "{}: body",
                c.name
            );
        }
        // One byte of a signed header.
        let m = c.with_header_byte_flipped("host", 0);
        assert_eq!(
            m.verify(SECRET, None),
            Err(SigV4Error::SignatureMismatch),
            "{}: host",
            c.name
        );
        if c.header("content-type").is_some() {
            let m = c.with_header_byte_flipped("content-type", 3);
            assert_eq!(
                m.verify(SECRET, None),
                Err(SigV4Error::SignatureMismatch),
                "{}: content-type",
                c.name
            );
        }
        // One byte of the date (the last seconds digit: same day, so the scope still matches).
        let m = c.with_header_byte_flipped("x-amz-date", 14);
        assert_eq!(
            m.verify(SECRET, Some(c.date().unix)),
            Err(SigV4Error::SignatureMismatch),
            "{}: date",
            c.name
        );
        // A day later in the date: the scope no longer matches.
        let m = c.with_header_byte_flipped("x-amz-date", 7);
        assert_eq!(
            m.verify(SECRET, Some(c.date().unix)).map_err(|e| e.code()),
            Err(Ec2ErrorCode::SignatureDoesNotMatch),
            "{}: day",
            c.name
        );
        // One byte of the secret.
        let mut other = SECRET.as_bytes().to_vec();
        other[0] ^= 0x01;
        let other = String::from_utf8(other).expect("ascii");
        assert_eq!(
            c.verify(&other, None),
            Err(SigV4Error::SignatureMismatch),
            "{}: secret",
            c.name
        );
        // The path and the query are signed too.
        let mut m = c.clone_shallow();
        m.path.push('x');
        assert_eq!(
            m.verify(SECRET, None),
            Err(SigV4Error::SignatureMismatch),
            "{}: path",
            c.name
        );
        let mut m = c.clone_shallow();
        m.query = if m.query.is_empty() {
            "a=b".into()
        } else {
            format!("{}x", m.query)
        };
        assert_eq!(
            m.verify(SECRET, None),
            Err(SigV4Error::SignatureMismatch),
            "{}: query",
            c.name
        );
        // Outside the window, on either side.
        for skew in [-301, 301] {
            assert_eq!(
                c.verify(SECRET, Some(c.date().unix + skew))
                    .map_err(|e| e.code()),
                Err(Ec2ErrorCode::RequestExpired),
                "{}: window {skew}",
                c.name
            );
        }
    }
}

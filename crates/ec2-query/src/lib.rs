//! The EC2 Query API boundary, as the unmodified AWS SDKs and the aws CLI speak it: bytes in,
//! checked types out, no I/O.
//!
//! - [`sigv4`]: AWS Signature Version 4 verification ([`Verifier::verify`]).
//! - [`bh1`]: `BH1-HMAC-SHA256`, the same scheme's form for Bulkhead's JSON API (sign and
//!   verify), sharing [`sigv4`]'s HMAC, date parser and calendar.
//! - [`xml`]: the XML answers and error documents ([`Ec2Response::to_xml`], [`xml::error_xml`]).
//! - [`form`]: the form-encoded Query body into a typed [`Ec2Request`] ([`Ec2Request::parse`]).
//! - [`vpc`], [`snapshot`]: the VPC and snapshot actions' requests and answers.
//! - [`doc`]: what the parser accepts and the writer emits, as data ([`doc::ACTIONS`]), from which
//!   `scripts/ec2-model.py` writes the published model (`docs/ec2-query-model.json`).
//!
//! Every refusal is a typed error with the [`Ec2ErrorCode`] a real SDK understands.

pub mod bh1;
pub mod code;
pub mod doc;
pub mod form;
pub mod sigv4;
pub mod snapshot;
pub mod vpc;
pub mod xml;

pub use code::Ec2ErrorCode;
pub use form::{Ec2Call, Ec2Request, QueryError};
pub use sigv4::{
    AmzDate, Authorization, HttpRequestParts, SecretKey, SecretLookup, SigV4Error, VerifiedRequest,
    Verifier,
};
pub use xml::{error_xml, Ec2Response};

//! The EC2 Query API front end (`POST /`, form body, AWS Signature Version 4, XML answers), as
//! the unmodified AWS SDKs and the aws CLI speak it.
//!
//! One implementation per operation: a Query request is verified (SigV4, the date window, the
//! signature recorded once: SigV4 has no nonce), parsed ([`bulkhead_ec2_query::Ec2Request`]),
//! translated into the JSON API's body and checked by the one parser
//! ([`crate::api::ControlRequest::parse`]), then run by [`ControlPlane::perform`] exactly as a
//! JSON call is (audit, idempotency, the same service code); the JSON answer is rendered as EC2
//! XML, with filters and pages applied to it ([`crate::query_map`]). The customer's signed
//! request is forwarded to the KMS as its raw signed parts
//! ([`bulkhead_kms_proto::SigV4Forwarded`]), which the KMS verifies again itself.

use bulkhead_audit::EntryKind;
use bulkhead_ec2_query::sigv4::Authorization;
use bulkhead_ec2_query::{error_xml, Ec2ErrorCode, Ec2Request, HttpRequestParts, Verifier};

use bulkhead_ec2_query::bh1::SigError;
use bulkhead_kms_proto::SigV4Forwarded;

use crate::net_store::NetRefusal;
use crate::repo::RepoError;
use crate::service::{
    new_id, now, secret_aad, Caller, ControlPlane, RawRequest, REQUEST_WINDOW_SECS,
};
use crate::ControlError;

/// The content type of every Query answer.
pub const XML_CONTENT_TYPE: &str = "text/xml;charset=UTF-8";

impl ControlPlane {
    /// The availability zone of this region (one per region).
    pub fn availability_zone(&self) -> String {
        format!("{}a", self.region)
    }

    /// Verifies a SigV4-signed Query request and records its signature (accepted once).
    fn authenticate_sigv4(&self, r: &RawRequest) -> Result<Caller, ControlError> {
        let headers: Vec<(&str, &[u8])> = r
            .headers
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_bytes()))
            .collect();
        let parts = HttpRequestParts {
            method: &r.method,
            path: &r.path,
            query: &r.query,
            headers: &headers,
            body: r.body.as_bytes(),
        };
        // The one access key the header names is looked up before verifying, so a store
        // failure is a store failure, not an unknown key.
        let auth = r
            .headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case("authorization"))
            .and_then(|(_, v)| Authorization::parse(v.as_bytes()).ok());
        let customer = match &auth {
            Some(a) => self.repo.customer(&a.access_key_id)?,
            None => None,
        };
        let secret = match &customer {
            Some(c) => Some(
                bulkhead_sealing::wrap::unwrap::<32>(
                    &self.root,
                    &secret_aad(&c.access_key_id),
                    &c.wrapped_secret,
                )
                .map_err(|_| ControlError::Internal)?,
            ),
            None => None,
        };
        let lookup = |akid: &str| match (&customer, &secret) {
            (Some(c), Some(s)) if c.access_key_id == akid => {
                Some(bulkhead_ec2_query::SecretKey::from_raw_secret(s.as_ref()))
            }
            _ => None,
        };
        let t = now();
        let v = Verifier::new(self.region.clone())
            .with_window_secs(REQUEST_WINDOW_SECS)
            .verify(&parts, i64::try_from(t).unwrap_or(i64::MAX), &lookup)
            .map_err(ControlError::SigV4)?;
        let (Some(auth), Some(cust)) = (auth, customer) else {
            return Err(ControlError::Internal);
        };
        // A signature acts once; a read may be answered again (SigV4 has no nonce, and real
        // clients repeat identical reads within a second: polling loops, SDK retries). A read
        // that parses as no action is not a read: it is recorded like any other.
        let read_only = Ec2Request::parse(r.body.as_bytes())
            .map(|c| !c.dry_run && c.request.is_read_only())
            .unwrap_or(false);
        if !read_only
            && !self.repo.first_use_of_signature(
                &hex::encode(v.signature),
                t,
                t.saturating_sub(2 * REQUEST_WINDOW_SECS),
            )?
        {
            return Err(ControlError::Replayed);
        }
        let signed = |n: &str| {
            n.eq_ignore_ascii_case("authorization")
                || auth
                    .signed_headers
                    .iter()
                    .any(|s| n.eq_ignore_ascii_case(s))
        };
        Ok(Caller {
            tenant: cust.tenant_id,
            access_key_id: cust.access_key_id,
            forwarded: SigV4Forwarded {
                method: r.method.clone(),
                path: r.path.clone(),
                query: r.query.clone(),
                headers: r
                    .headers
                    .iter()
                    .filter(|(n, _)| signed(n))
                    .cloned()
                    .collect(),
                body: r.body.clone(),
            }
            .into(),
        })
    }

    /// Handles one EC2 Query request end to end. Returns (status, XML body).
    pub async fn handle_query(&self, r: RawRequest) -> (u16, String) {
        let request_id = new_id("req");
        let parsed = Ec2Request::parse(r.body.as_bytes());
        let op_name = parsed
            .as_ref()
            .map(|c| c.request.action())
            .unwrap_or("ec2:-");
        let az = self.availability_zone();
        let decided = self.authenticate_sigv4(&r).and_then(|c| {
            let call = parsed.clone().map_err(ControlError::Query)?;
            let (req, view) = crate::query_map::translate(call.request, &az)?;
            if call.dry_run {
                return Err(ControlError::DryRun);
            }
            Ok((c, req, view))
        });
        let (caller, req, view) = match decided {
            Ok(x) => x,
            Err(e) => {
                let _ = self
                    .audit(
                        EntryKind::Request,
                        &request_id,
                        ("-", ""),
                        op_name,
                        vec![],
                        Some(&r.body),
                        e.code(),
                    )
                    .await;
                tracing::info!(
                    action = op_name,
                    request_id,
                    code = e.code(),
                    "query refused"
                );
                return query_error(&e, op_name, &request_id);
            }
        };
        let action = req.action();
        let rendered = match self.perform(&request_id, &caller, req, &r.body).await {
            Ok(v) => crate::query_render::render(view, &v, &caller.tenant, &az),
            Err(e) => Err(e),
        };
        match rendered {
            Ok(resp) => (200, resp.to_xml(&request_id)),
            Err(e) => query_error(&e, action, &request_id),
        }
    }
}

/// The EC2 error document for `e` (refused while doing `action`).
pub fn query_error(e: &ControlError, action: &str, request_id: &str) -> (u16, String) {
    let code = ec2_code(e, action);
    let message = match e {
        // Messages EC2 would give; the typed error stays in the audit record and the log.
        ControlError::SigV4(s) => s.to_string(),
        ControlError::Query(q) => q.to_string(),
        other => other.to_string(),
    };
    (code.http_status(), error_xml(code, &message, request_id))
}

/// The EC2 error code a real SDK expects for each of our refusals.
pub fn ec2_code(e: &ControlError, action: &str) -> Ec2ErrorCode {
    use Ec2ErrorCode as C;
    let instance_action = action.contains("Instance") || action == "GetConsoleOutput";
    match e {
        ControlError::SigV4(s) => s.code(),
        ControlError::Query(q) => q.code(),
        ControlError::DryRun => C::DryRunOperation,
        ControlError::Replayed => C::AuthFailure,
        ControlError::Auth(SigError::UnknownAccessKey) => C::AuthFailure,
        ControlError::Auth(_) => C::IncompleteSignature,
        ControlError::NoSuchAction => C::InvalidAction,
        ControlError::MethodNotAllowed | ControlError::BodyTooLarge => C::InvalidRequest,
        ControlError::BadBody
        | ControlError::UnknownField
        | ControlError::BadId
        | ControlError::BadShape
        | ControlError::BadInstanceStorage
        | ControlError::EncryptionRequired
        | ControlError::Unsupported(_) => C::InvalidParameterValue,
        ControlError::BadNetwork(crate::net::NetError::PrefixOutOfRange) => {
            if action == "CreateVpc" {
                C::InvalidVpcRange
            } else {
                C::InvalidSubnetRange
            }
        }
        ControlError::BadNetwork(_) => C::InvalidParameterValue,
        ControlError::NoSuchInstance => C::InvalidInstanceIdNotFound,
        ControlError::NoSuchVolume => C::InvalidVolumeNotFound,
        ControlError::NoSuchSnapshot => C::InvalidSnapshotNotFound,
        ControlError::WrongState if instance_action => C::IncorrectInstanceState,
        ControlError::WrongState => C::IncorrectState,
        ControlError::VolumeInUse => C::VolumeInUse,
        // A host without whole cores free for the instance (it refused the placement).
        ControlError::NoCapacity
        | ControlError::NoAttestedHost
        | ControlError::Host("no_free_cores") => C::InsufficientInstanceCapacity,
        ControlError::IdempotencyMismatch => C::IdempotentParameterMismatch,
        ControlError::Kms("no_such_key") => C::InvalidKmsKeyNotFound,
        ControlError::Kms("no_such_image") | ControlError::Host("no_such_image") => {
            C::InvalidAmiIdNotFound
        }
        ControlError::Kms(_) => C::UnauthorizedOperation,
        ControlError::Host(_) | ControlError::Internal => C::InternalError,
        ControlError::Upstream | ControlError::AuditUnavailable => C::Unavailable,
        ControlError::Repo(RepoError::Refused(n)) => match n {
            NetRefusal::NoSuchVpc => C::InvalidVpcIdNotFound,
            NetRefusal::NoSuchSubnet => C::InvalidSubnetIdNotFound,
            NetRefusal::NoSuchGroup => C::InvalidGroupNotFound,
            NetRefusal::VpcHasSubnets | NetRefusal::SubnetInUse => C::DependencyViolation,
            NetRefusal::OutsideVpc => C::InvalidSubnetRange,
            NetRefusal::Overlap => C::InvalidSubnetConflict,
            NetRefusal::NoFreeAddress => C::InsufficientFreeAddressesInSubnet,
            NetRefusal::GroupInOtherVpc => C::InvalidParameterValue,
            NetRefusal::DuplicateGroupName => C::InvalidGroupDuplicate,
            NetRefusal::DuplicateRule => C::InvalidPermissionDuplicate,
            NetRefusal::NoSuchRule => C::InvalidPermissionNotFound,
            NetRefusal::TooManyRules => C::RulesPerSecurityGroupLimitExceeded,
            NetRefusal::DefaultExists => C::InvalidParameterValue,
        },
        ControlError::Repo(RepoError::Unavailable | RepoError::LeaseLost) => C::Unavailable,
        ControlError::Repo(_) => C::InternalError,
    }
}

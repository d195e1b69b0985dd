//! Who is calling: a customer's signed request checked (date window, signature used once,
//! secret unwrapped with the control plane's root key) and turned into a [`Caller`].

use bulkhead_ec2_query::bh1::{self as sigv, Authorization, SignedParts};
use bulkhead_kms_proto::ForwardedRequest;

use crate::service::{now, secret_aad, Caller, ControlPlane, RawRequest, REQUEST_WINDOW_SECS};
use crate::ControlError;

impl ControlPlane {
    pub(crate) fn authenticate(&self, r: &RawRequest) -> Result<Caller, ControlError> {
        let header = r
            .authorization
            .as_deref()
            .ok_or(ControlError::Auth(sigv::SigError::Missing))?;
        let auth = Authorization::parse(header).map_err(ControlError::Auth)?;
        let cust = self
            .repo
            .customer(&auth.access_key_id)?
            .ok_or(ControlError::Auth(sigv::SigError::UnknownAccessKey))?;
        let secret = bulkhead_sealing::wrap::unwrap::<32>(
            &self.root,
            &secret_aad(&cust.access_key_id),
            &cust.wrapped_secret,
        )
        .map_err(|_| ControlError::Internal)?;
        let parts = SignedParts {
            method: r.method.clone(),
            path: r.path.clone(),
            query: r.query.clone(),
            host: r.host.clone(),
            date: r
                .date
                .clone()
                .ok_or(ControlError::Auth(sigv::SigError::BadDate))?,
            body: r.body.clone(),
            nonce: r.nonce.clone().unwrap_or_default(),
        };
        let t = now();
        sigv::verify(&auth, secret.as_ref(), &parts, t, REQUEST_WINDOW_SECS)
            .map_err(ControlError::Auth)?;
        if !self.repo.first_use_of_signature(
            &hex::encode(auth.signature),
            t,
            t.saturating_sub(2 * REQUEST_WINDOW_SECS),
        )? {
            return Err(ControlError::Replayed);
        }
        Ok(Caller {
            tenant: cust.tenant_id,
            access_key_id: cust.access_key_id,
            forwarded: ForwardedRequest {
                authorization: header.to_string(),
                parts,
            }
            .into(),
        })
    }
}

//! The KMS API on the wire: `POST /v1/<Operation>` with a strict JSON body, over mutual TLS
//! 1.3. The types are `bulkhead-kms-proto`'s (shared with the control plane, the only caller),
//! re-exported here for the KMS's own modules.

pub use bulkhead_kms_proto::*;

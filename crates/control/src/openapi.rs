//! The customer API's OpenAPI document, generated from [`ACTIONS`] and the request types (their
//! serde names are the wire names). The checked-in copy is `openapi/control.json`; a test fails
//! when the two differ.

use utoipa::openapi::content::Content;
use utoipa::openapi::info::InfoBuilder;
use utoipa::openapi::path::{HttpMethod, OperationBuilder, PathItemBuilder};
use utoipa::openapi::request_body::RequestBodyBuilder;
use utoipa::openapi::response::ResponseBuilder;
use utoipa::openapi::schema::{Object, ObjectBuilder, Type};
use utoipa::openapi::security::{ApiKey, ApiKeyValue, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{ComponentsBuilder, OpenApiBuilder, PathsBuilder, Ref, Required};
use utoipa::{PartialSchema, ToSchema};

use crate::api::{self, ACTIONS};

/// The request body type of `action` (the one [`api::ControlRequest::parse`] decodes).
pub fn request_schema(action: &str) -> Option<&'static str> {
    Some(match action {
        "RunInstances" => "RunInstances",
        "DescribeInstances" | "StopInstances" | "StartInstances" | "TerminateInstances" => {
            "InstanceIds"
        }
        "CreateVolume" => "CreateVolume",
        "DescribeVolumes" => "VolumeIds",
        "AttachVolume" => "AttachVolume",
        "DetachVolume" | "DeleteVolume" => "VolumeRef",
        "CreateSnapshot" => "CreateSnapshot",
        "DescribeSnapshots" => "SnapshotIds",
        "DeleteSnapshot" => "SnapshotRef",
        "GetConsoleOutput" => "InstanceRef",
        "CreateKey" => "CreateKey",
        "RevokeGrant" => "RevokeGrant",
        "CreateVpc" => "CreateVpc",
        "DescribeVpcs" => "VpcIds",
        "DeleteVpc" => "VpcRef",
        "CreateSubnet" => "CreateSubnet",
        "DescribeSubnets" => "SubnetIds",
        "DeleteSubnet" => "SubnetRef",
        "CreateSecurityGroup" => "CreateSecurityGroup",
        "AuthorizeSecurityGroupIngress" | "RevokeSecurityGroupIngress" => "SecurityGroupIngress",
        "DescribeSecurityGroups" => "GroupIds",
        _ => return None,
    })
}

fn error_body() -> Object {
    let detail = ObjectBuilder::new()
        .property("code", Object::with_type(Type::String))
        .required("code")
        .property("message", Object::with_type(Type::String))
        .property("request_id", Object::with_type(Type::String))
        .build();
    ObjectBuilder::new()
        .property("error", detail)
        .required("error")
        .build()
}

/// Builds the document.
pub fn document() -> utoipa::openapi::OpenApi {
    let mut paths = PathsBuilder::new();
    for (action, mutating) in ACTIONS {
        let schema = request_schema(action).unwrap_or("InstanceRef");
        let mut summary = format!("{action} (signed customer request)");
        if *mutating {
            summary.push_str("; mutating: takes ClientToken for idempotency");
        }
        let op = OperationBuilder::new()
            .operation_id(Some(*action))
            .summary(Some(summary))
            .tag("customer-api-v1")
            .security(SecurityRequirement::new(
                "bulkhead-sig",
                Vec::<String>::new(),
            ))
            .request_body(Some(
                RequestBodyBuilder::new()
                    .required(Some(Required::True))
                    .content(
                        "application/json",
                        Content::new(Some(Ref::from_schema_name(schema))),
                    )
                    .build(),
            ))
            .response(
                "200",
                ResponseBuilder::new()
                    .description("Success")
                    .content(
                        "application/json",
                        Content::new(Some(Object::with_type(Type::Object))),
                    )
                    .build(),
            )
            .response(
                "default",
                ResponseBuilder::new()
                    .description("Refusal with a stable error code (nothing changed)")
                    .content(
                        "application/json",
                        Content::new(Some(Ref::from_schema_name("ErrorBody"))),
                    )
                    .build(),
            );
        paths = paths.path(
            format!("/v1/{action}"),
            PathItemBuilder::new()
                .operation(HttpMethod::Post, op.build())
                .build(),
        );
    }
    let components = ComponentsBuilder::new()
        .schema(api::RunInstances::name(), api::RunInstances::schema())
        .schema(api::InstanceIds::name(), api::InstanceIds::schema())
        .schema(api::CreateVolume::name(), api::CreateVolume::schema())
        .schema(api::VolumeIds::name(), api::VolumeIds::schema())
        .schema(api::AttachVolume::name(), api::AttachVolume::schema())
        .schema(api::VolumeRef::name(), api::VolumeRef::schema())
        .schema(api::CreateSnapshot::name(), api::CreateSnapshot::schema())
        .schema(api::SnapshotIds::name(), api::SnapshotIds::schema())
        .schema(api::SnapshotRef::name(), api::SnapshotRef::schema())
        .schema(api::InstanceRef::name(), api::InstanceRef::schema())
        .schema(api::CreateKey::name(), api::CreateKey::schema())
        .schema(api::RevokeGrant::name(), api::RevokeGrant::schema())
        .schema(api::CreateVpc::name(), api::CreateVpc::schema())
        .schema(api::VpcIds::name(), api::VpcIds::schema())
        .schema(api::VpcRef::name(), api::VpcRef::schema())
        .schema(api::CreateSubnet::name(), api::CreateSubnet::schema())
        .schema(api::SubnetIds::name(), api::SubnetIds::schema())
        .schema(api::SubnetRef::name(), api::SubnetRef::schema())
        .schema(
            api::CreateSecurityGroup::name(),
            api::CreateSecurityGroup::schema(),
        )
        .schema(api::IpRange::name(), api::IpRange::schema())
        .schema(api::IpPermission::name(), api::IpPermission::schema())
        .schema(
            api::SecurityGroupIngress::name(),
            api::SecurityGroupIngress::schema(),
        )
        .schema(api::GroupIds::name(), api::GroupIds::schema())
        .schema("ErrorBody", error_body())
        .security_scheme(
            "bulkhead-sig",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::with_description(
                "Authorization",
                "SigV4-style: `BH1-HMAC-SHA256 Credential=<access key id>/<YYYYMMDD>/ec2/bh1_request, \
                 SignedHeaders=host;x-bh-date;x-bh-nonce, Signature=<hex HMAC-SHA256>` over the \
                 canonical request (method, path, query, host, x-bh-date, x-bh-nonce, SHA-256 of \
                 the body) with a per-day derived key; x-bh-date must be within 5 minutes and \
                 each signature is accepted once (see bulkhead_ec2_query::bh1)",
            ))),
        )
        .build();
    OpenApiBuilder::new()
        .info(
            InfoBuilder::new()
                .title("Bulkhead customer API")
                .version("1")
                .description(Some(
                    "EC2/EBS-like control plane: POST /v1/<Action> with a strict JSON body \
                     (unknown fields refused, 16 KiB cap), signed by the customer.",
                ))
                .build(),
        )
        .paths(paths.build())
        .components(Some(components))
        .build()
}

/// The document as pretty JSON with a trailing newline.
pub fn document_json() -> String {
    let mut s = document().to_pretty_json().unwrap_or_default();
    s.push('\n');
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_action_has_a_request_schema() {
        for (a, _) in ACTIONS {
            assert!(request_schema(a).is_some(), "{a}");
        }
    }

    #[test]
    fn document_matches_the_checked_in_copy() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../openapi/control.json");
        let generated = document_json();
        if std::env::var_os("BULKHEAD_BLESS").is_some() {
            let _ = std::fs::write(path, &generated);
        }
        let checked_in = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            checked_in == generated,
            "openapi/control.json is stale; regenerate with `BULKHEAD_BLESS=1 cargo test \
             --release -p bulkhead-control --lib openapi` (or `bulkhead-control print-openapi`) \
             and review the diff"
        );
        let doc: serde_json::Value = serde_json::from_str(&generated).unwrap_or_default();
        let paths = doc["paths"].as_object().map(|p| p.len()).unwrap_or(0);
        assert_eq!(paths, ACTIONS.len());
        // Wire names, not Rust names.
        let run = &doc["components"]["schemas"]["RunInstances"]["properties"];
        assert!(
            run.get("ImageId").is_some() && run.get("UserData").is_some(),
            "{run}"
        );
    }
}

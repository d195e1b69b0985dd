//! The OpenAPI document, generated from [`ROUTES`] and the request/response types. The checked-in
//! copy is `openapi/controller.json`; a test fails when the two differ.

use std::collections::BTreeMap;

use utoipa::openapi::content::Content;
use utoipa::openapi::info::InfoBuilder;
use utoipa::openapi::path::{
    HttpMethod, OperationBuilder, ParameterBuilder, ParameterIn, PathItemBuilder,
};
use utoipa::openapi::request_body::RequestBodyBuilder;
use utoipa::openapi::response::ResponseBuilder;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{ComponentsBuilder, OpenApiBuilder, PathsBuilder, Ref, Required};

use crate::api::{self, BodyKind, Method, ROUTES};
use bulkhead_tokens::Operation;

fn json_ref(name: &str) -> Content {
    Content::new(Some(Ref::from_schema_name(name)))
}

fn ok_schema(op: Operation) -> Option<&'static str> {
    Some(match op {
        Operation::DescribeHost => "HostDescription",
        Operation::GetHealth => "Health",
        Operation::GetMetrics => return None,
        Operation::ReadAudit => "AuditPage",
        Operation::ListAlerts => "AlertList",
        Operation::CreateInstance | Operation::DescribeInstance => "InstanceDescription",
        Operation::GetConsole => "ConsoleOutput",
        Operation::AttachNetwork => "NetworkAttached",
        Operation::UploadArtefact => "ArtefactStored",
        Operation::DeployRelease => "ReleaseDeployed",
        _ => "Ack",
    })
}

/// Builds the document.
pub fn document() -> utoipa::openapi::OpenApi {
    let mut by_path: BTreeMap<&str, PathItemBuilder> = BTreeMap::new();
    for r in ROUTES {
        let mut op = OperationBuilder::new()
            .operation_id(Some(r.op.name()))
            .summary(Some(r.summary))
            .tag(match r.op.plane() {
                bulkhead_tokens::Plane::Operator => "operator-plane",
                bulkhead_tokens::Plane::Customer => "customer-plane",
            })
            .security(SecurityRequirement::new("bearer", Vec::<String>::new()));
        for seg in r.path.split('/') {
            if let Some(name) = seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                op = op.parameter(
                    ParameterBuilder::new()
                        .name(name)
                        .parameter_in(ParameterIn::Path)
                        .required(Required::True)
                        .schema(Some(utoipa::openapi::schema::Object::with_type(
                            utoipa::openapi::schema::Type::String,
                        ))),
                );
            }
        }
        if r.op == Operation::ReadAudit {
            for q in ["after", "limit"] {
                op = op.parameter(
                    ParameterBuilder::new()
                        .name(q)
                        .parameter_in(ParameterIn::Query)
                        .required(Required::False)
                        .schema(Some(utoipa::openapi::schema::Object::with_type(
                            utoipa::openapi::schema::Type::Integer,
                        ))),
                );
            }
        }
        let body = match r.body {
            BodyKind::None => None,
            BodyKind::Drain => Some("DrainRequest"),
            BodyKind::Attest => Some("AttestRequest"),
            BodyKind::CreateInstance => Some("CreateInstanceRequest"),
            BodyKind::AttachVolume => Some("AttachVolumeRequest"),
            BodyKind::AttachNetwork => Some("AttachNetworkRequest"),
            BodyKind::NetworkRoutes => Some("NetworkRoutesRequest"),
            BodyKind::NetworkRules => Some("NetworkRulesRequest"),
            BodyKind::DeployRelease => Some("DeployReleaseRequest"),
            BodyKind::Artefact => None,
        };
        if r.body == BodyKind::Artefact {
            op = op.request_body(Some(
                RequestBodyBuilder::new()
                    .required(Some(Required::True))
                    .content(
                        "application/octet-stream",
                        Content::new(Some(utoipa::openapi::schema::Object::with_type(
                            utoipa::openapi::schema::Type::String,
                        ))),
                    )
                    .build(),
            ));
        }
        if let Some(b) = body {
            op = op.request_body(Some(
                RequestBodyBuilder::new()
                    .required(Some(Required::True))
                    .content("application/json", json_ref(b))
                    .build(),
            ));
        }
        let ok = match ok_schema(r.op) {
            Some(s) => ResponseBuilder::new()
                .description("Success")
                .content("application/json", json_ref(s)),
            None => ResponseBuilder::new()
                .description("Prometheus text format")
                .content(
                    "text/plain",
                    Content::new(Some(utoipa::openapi::schema::Object::with_type(
                        utoipa::openapi::schema::Type::String,
                    ))),
                ),
        };
        let status = if r.op == Operation::CreateInstance {
            "201"
        } else {
            "200"
        };
        op = op.response(status, ok.build()).response(
            "default",
            ResponseBuilder::new()
                .description("Refusal with a stable error code")
                .content("application/json", json_ref("ErrorBody"))
                .build(),
        );
        let method = match r.method {
            Method::Get => HttpMethod::Get,
            Method::Post => HttpMethod::Post,
            Method::Put => HttpMethod::Put,
            Method::Delete => HttpMethod::Delete,
        };
        let item = by_path.remove(r.path).unwrap_or_default();
        by_path.insert(r.path, item.operation(method, op.build()));
    }
    let mut paths = PathsBuilder::new();
    for (p, item) in by_path {
        paths = paths.path(p, item.build());
    }
    let components = ComponentsBuilder::new()
        .schema_from::<api::HostDescription>()
        .schema_from::<api::Health>()
        .schema_from::<api::InstanceState>()
        .schema_from::<api::InstanceDescription>()
        .schema_from::<api::ConsoleOutput>()
        .schema_from::<api::AuditPage>()
        .schema_from::<api::Alert>()
        .schema_from::<api::AlertList>()
        .schema_from::<api::Ack>()
        .schema_from::<api::ErrorBody>()
        .schema_from::<api::ErrorDetail>()
        .schema_from::<api::DrainRequest>()
        .schema_from::<api::AttestRequest>()
        .schema_from::<api::CreateInstanceRequest>()
        .schema_from::<api::AttachVolumeRequest>()
        .schema_from::<api::NetworkRequest>()
        .schema_from::<api::AttachNetworkRequest>()
        .schema_from::<api::NetworkAttached>()
        .schema_from::<api::NetworkRoutesRequest>()
        .schema_from::<api::NetworkRulesRequest>()
        .schema_from::<api::DeployReleaseRequest>()
        .schema_from::<api::ArtefactStored>()
        .schema_from::<api::HypervisorMoved>()
        .schema_from::<api::CardMoved>()
        .schema_from::<api::NetCardMoved>()
        .schema_from::<api::NetCardRelease>()
        .schema_from::<api::ReleaseDeployed>()
        .security_scheme(
            "bearer",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        )
        .build();
    OpenApiBuilder::new()
        .info(
            InfoBuilder::new()
                .title("bulkhead-controller")
                .version("1")
                .description(Some(
                    "The host's only management API. Mutual TLS 1.3 with a Bulkhead CA client \
                     certificate plus a bearer token bound to that certificate on every call. \
                     Every request is audited before it acts.",
                ))
                .build(),
        )
        .paths(paths.build())
        .components(Some(components))
        .build()
}

/// The document as pretty JSON with a trailing newline (the checked-in form).
pub fn document_json() -> String {
    let mut s = document()
        .to_pretty_json()
        .unwrap_or_else(|_| String::from("{}"));
    s.push('\n');
    s
}

//! One struct per controller operation: what a caller sends, tied by [`ControllerCall`] to its
//! route (method and path from [`crate::ROUTES`]) and to the type of its `2xx` answer.

use bulkhead_tokens::Operation;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::{
    Ack, AlertList, ArtefactStored, AttachNetworkRequest, AttachVolumeRequest, AttestRequest,
    AuditPage, ConsoleOutput, CreateInstanceRequest, DeployReleaseRequest, DrainRequest, ErrorBody,
    Health, HostDescription, InstanceDescription, Method, MetricsText, NetworkAttached,
    NetworkRoutesRequest, NetworkRulesRequest, RelayedEvidence, ReleaseDeployed,
};

/// The body of a route that takes none (no value of it exists).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum NoBody {}

/// Why a `2xx` answer did not parse as its operation's answer type.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResponseError {
    #[error("the answer is not valid UTF-8")]
    NotUtf8,
    #[error("the answer does not parse as its operation's answer type")]
    Malformed,
}

/// An answer type: how its bytes are read.
pub trait WireResponse: Sized {
    fn decode(body: &[u8]) -> Result<Self, ResponseError>;
}

macro_rules! json_answers {
    ($($t:ty),+ $(,)?) => {
        $(impl WireResponse for $t {
            fn decode(body: &[u8]) -> Result<Self, ResponseError> {
                json_answer(body)
            }
        })+
    };
}

fn json_answer<T: DeserializeOwned>(body: &[u8]) -> Result<T, ResponseError> {
    serde_json::from_slice(body).map_err(|_| ResponseError::Malformed)
}

json_answers!(
    Ack,
    ArtefactStored,
    ReleaseDeployed,
    AlertList,
    AuditPage,
    ConsoleOutput,
    ErrorBody,
    Health,
    HostDescription,
    InstanceDescription,
    NetworkAttached,
    RelayedEvidence,
);

impl WireResponse for MetricsText {
    fn decode(body: &[u8]) -> Result<Self, ResponseError> {
        std::str::from_utf8(body)
            .map(|s| MetricsText(s.to_string()))
            .map_err(|_| ResponseError::NotUtf8)
    }
}

/// What one call carries besides its route: the instance and volume it names (in its path or
/// its body), its body, its query.
pub trait CallArgs {
    type Body: Serialize;
    /// The instance the call names, if any (the path's `{id}`, or in the body).
    fn instance(&self) -> Option<&str> {
        None
    }
    /// The volume the call names, if any (the path's `{volume_id}`).
    fn volume(&self) -> Option<&str> {
        None
    }
    fn body(&self) -> Option<&Self::Body> {
        None
    }
    fn query(&self) -> Option<String> {
        None
    }
    /// What fills the path's `{id}` segment: the instance, unless the route names something
    /// else there (an artefact's digest).
    fn id_segment(&self) -> Option<&str> {
        self.instance()
    }
    /// A raw (non-JSON) request body: only an artefact upload has one.
    fn raw_body(&self) -> Option<&[u8]> {
        None
    }
}

/// One controller operation's request, typed with its route and its answer.
pub trait ControllerCall: CallArgs {
    const OP: Operation;
    const METHOD: Method;
    /// The path template of [`crate::ROUTES`].
    const PATH: &'static str;
    /// What the controller answers with `2xx`.
    type Response: WireResponse;

    /// The path: the template with the instance and volume in their segments, then the query.
    fn path(&self) -> String {
        let mut out = String::new();
        for (i, seg) in Self::PATH.split('/').enumerate() {
            if i > 0 {
                out.push('/');
            }
            out.push_str(match seg {
                "{id}" => self.id_segment().unwrap_or_default(),
                "{volume_id}" => self.volume().unwrap_or_default(),
                s => s,
            });
        }
        if let Some(q) = self.query() {
            out.push('?');
            out.push_str(&q);
        }
        out
    }

    /// The resources a token for this call must grant ([`crate::resources`]).
    fn resources(&self) -> Vec<String> {
        crate::resources(Self::OP, self.instance(), self.volume())
    }

    /// The encoded body (empty for a route that takes none).
    fn encode_body(&self) -> Result<Option<Vec<u8>>, serde_json::Error> {
        self.body().map(serde_json::to_vec).transpose()
    }
}

/// `GET /v1/host`.
#[derive(Debug, Clone, Copy, Default)]
pub struct DescribeHost;
/// `GET /v1/health`.
#[derive(Debug, Clone, Copy, Default)]
pub struct GetHealth;
/// `GET /v1/metrics`.
#[derive(Debug, Clone, Copy, Default)]
pub struct GetMetrics;
/// `GET /v1/alerts`.
#[derive(Debug, Clone, Copy, Default)]
pub struct ListAlerts;

macro_rules! host_calls {
    ($($t:ident),+) => {
        $(impl CallArgs for $t {
            type Body = NoBody;
        })+
    };
}
host_calls!(DescribeHost, GetHealth, GetMetrics, ListAlerts);

/// `GET /v1/audit?after=…&limit=…`.
#[derive(Debug, Clone, Copy)]
pub struct ReadAudit {
    pub after: u64,
    pub limit: u32,
}

impl CallArgs for ReadAudit {
    type Body = NoBody;
    fn query(&self) -> Option<String> {
        Some(format!("after={}&limit={}", self.after, self.limit))
    }
}

/// `POST /v1/host/drain`.
#[derive(Debug, Clone, Default)]
pub struct DrainHost(pub DrainRequest);

impl CallArgs for DrainHost {
    type Body = DrainRequest;
    fn body(&self) -> Option<&DrainRequest> {
        Some(&self.0)
    }
}

/// `PUT /v1/host/artefacts/{sha256}`: the artefact's bytes are the raw request body (not
/// JSON), so the call carries no JSON body; a caller sends [`CallArgs::raw_body`] as is.
#[derive(Debug, Clone)]
pub struct UploadArtefact {
    /// SHA-256 of `bytes`, hex (the path's `{id}`).
    pub sha256: String,
    pub bytes: Vec<u8>,
}

impl CallArgs for UploadArtefact {
    type Body = NoBody;
    fn id_segment(&self) -> Option<&str> {
        Some(&self.sha256)
    }
    fn raw_body(&self) -> Option<&[u8]> {
        Some(&self.bytes)
    }
}

/// `POST /v1/host/releases`.
#[derive(Debug, Clone)]
pub struct DeployRelease(pub DeployReleaseRequest);

impl CallArgs for DeployRelease {
    type Body = DeployReleaseRequest;
    fn body(&self) -> Option<&DeployReleaseRequest> {
        Some(&self.0)
    }
}

/// `POST /v1/host/attest`.
#[derive(Debug, Clone)]
pub struct AttestHost(pub AttestRequest);

impl CallArgs for AttestHost {
    type Body = AttestRequest;
    fn instance(&self) -> Option<&str> {
        self.0.instance_id.as_deref()
    }
    fn body(&self) -> Option<&AttestRequest> {
        Some(&self.0)
    }
}

/// `POST /v1/instances`.
#[derive(Debug, Clone)]
pub struct CreateInstance(pub CreateInstanceRequest);

impl CallArgs for CreateInstance {
    type Body = CreateInstanceRequest;
    fn instance(&self) -> Option<&str> {
        Some(&self.0.instance_id)
    }
    fn body(&self) -> Option<&CreateInstanceRequest> {
        Some(&self.0)
    }
}

macro_rules! instance_calls {
    ($($(#[$doc:meta])* $t:ident),+) => {
        $($(#[$doc])*
        #[derive(Debug, Clone)]
        pub struct $t {
            pub instance_id: String,
        }

        impl CallArgs for $t {
            type Body = NoBody;
            fn instance(&self) -> Option<&str> {
                Some(&self.instance_id)
            }
        })+
    };
}

instance_calls!(
    /// `GET /v1/instances/{id}`.
    DescribeInstance,
    /// `POST /v1/instances/{id}/start`.
    StartInstance,
    /// `POST /v1/instances/{id}/stop`.
    StopInstance,
    /// `POST /v1/instances/{id}/reboot`.
    RebootInstance,
    /// `POST /v1/instances/{id}/terminate`.
    TerminateInstance,
    /// `GET /v1/instances/{id}/console`.
    GetConsole
);

macro_rules! instance_body_calls {
    ($($(#[$doc:meta])* $t:ident($b:ty)),+) => {
        $($(#[$doc])*
        #[derive(Debug, Clone)]
        pub struct $t {
            pub instance_id: String,
            pub body: $b,
        }

        impl CallArgs for $t {
            type Body = $b;
            fn instance(&self) -> Option<&str> {
                Some(&self.instance_id)
            }
            fn body(&self) -> Option<&$b> {
                Some(&self.body)
            }
        })+
    };
}

instance_body_calls!(
    /// `POST /v1/instances/{id}/network`.
    AttachNetwork(AttachNetworkRequest),
    /// `PUT /v1/instances/{id}/network/routes`.
    SetNetworkRoutes(NetworkRoutesRequest),
    /// `PUT /v1/instances/{id}/network/rules`.
    SetNetworkRules(NetworkRulesRequest)
);

/// `POST /v1/instances/{id}/volumes`.
#[derive(Debug, Clone)]
pub struct AttachVolume {
    pub instance_id: String,
    pub body: AttachVolumeRequest,
}

impl CallArgs for AttachVolume {
    type Body = AttachVolumeRequest;
    fn instance(&self) -> Option<&str> {
        Some(&self.instance_id)
    }
    fn volume(&self) -> Option<&str> {
        Some(&self.body.volume_id)
    }
    fn body(&self) -> Option<&AttachVolumeRequest> {
        Some(&self.body)
    }
}

/// `DELETE /v1/instances/{id}/volumes/{volume_id}`.
#[derive(Debug, Clone)]
pub struct DetachVolume {
    pub instance_id: String,
    pub volume_id: String,
}

impl CallArgs for DetachVolume {
    type Body = NoBody;
    fn instance(&self) -> Option<&str> {
        Some(&self.instance_id)
    }
    fn volume(&self) -> Option<&str> {
        Some(&self.volume_id)
    }
}

//! EC2 Query responses and errors as EC2 writes them, which botocore's `EC2QueryParser` reads:
//!
//! ```text
//! <ActionResponse xmlns="http://ec2.amazonaws.com/doc/2016-11-15/"><requestId>…</requestId>…</ActionResponse>
//! <Response><Errors><Error><Code>…</Code><Message>…</Message></Error></Errors><RequestID>…</RequestID></Response>
//! ```
//!
//! A small writer: every text is escaped, and characters XML 1.0 cannot carry (most C0
//! controls) become U+FFFD, so an echoed value can never break the document.

use base64::Engine as _;

use crate::code::Ec2ErrorCode;

/// The namespace of every EC2 response.
pub const NAMESPACE: &str = "http://ec2.amazonaws.com/doc/2016-11-15/";

/// Escapes `text` into `out`.
fn escape_into(text: &str, out: &mut String) {
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\r' => out.push_str("&#xD;"),
            '\t' | '\n' => out.push(c),
            c if u32::from(c) < 0x20 || c == '\u{fffe}' || c == '\u{ffff}' => out.push('\u{fffd}'),
            c => out.push(c),
        }
    }
}

/// Appends elements to one document.
pub(crate) struct XmlWriter {
    pub(crate) out: String,
}

impl XmlWriter {
    pub(crate) fn new() -> Self {
        Self {
            out: String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n"),
        }
    }

    pub(crate) fn open(&mut self, tag: &str) {
        self.out.push('<');
        self.out.push_str(tag);
        self.out.push('>');
    }

    pub(crate) fn close(&mut self, tag: &str) {
        self.out.push_str("</");
        self.out.push_str(tag);
        self.out.push('>');
    }

    pub(crate) fn leaf(&mut self, tag: &str, text: &str) {
        self.open(tag);
        escape_into(text, &mut self.out);
        self.close(tag);
    }

    pub(crate) fn leaf_opt(&mut self, tag: &str, text: Option<&str>) {
        if let Some(t) = text {
            self.leaf(tag, t);
        }
    }

    pub(crate) fn set<T>(&mut self, tag: &str, items: &[T], mut each: impl FnMut(&mut Self, &T)) {
        self.open(tag);
        for item in items {
            self.open("item");
            each(self, item);
            self.close("item");
        }
        self.close(tag);
    }
}

/// `2024-05-01T12:00:00.000Z` from seconds since the epoch.
pub fn iso8601(unix: i64) -> String {
    let days = unix.div_euclid(86_400);
    let secs = unix.rem_euclid(86_400);
    let (y, m, d) = crate::sigv4::civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.000Z",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

/// An instance's state, with the codes EC2 uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InstanceStateName {
    Pending,
    Running,
    ShuttingDown,
    Terminated,
    Stopping,
    Stopped,
}

impl InstanceStateName {
    pub fn code(self) -> u16 {
        match self {
            Self::Pending => 0,
            Self::Running => 16,
            Self::ShuttingDown => 32,
            Self::Terminated => 48,
            Self::Stopping => 64,
            Self::Stopped => 80,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Running => "running",
            Self::ShuttingDown => "shutting-down",
            Self::Terminated => "terminated",
            Self::Stopping => "stopping",
            Self::Stopped => "stopped",
        }
    }
}

/// A volume's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VolumeStateName {
    Creating,
    Available,
    InUse,
    Deleting,
    Deleted,
    Error,
}

impl VolumeStateName {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Creating => "creating",
            Self::Available => "available",
            Self::InUse => "in-use",
            Self::Deleting => "deleting",
            Self::Deleted => "deleted",
            Self::Error => "error",
        }
    }
}

/// A volume attachment's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachmentStateName {
    Attaching,
    Attached,
    Detaching,
    Detached,
}

impl AttachmentStateName {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Attaching => "attaching",
            Self::Attached => "attached",
            Self::Detaching => "detaching",
            Self::Detached => "detached",
        }
    }
}

/// One `instancesSet` item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceItem {
    pub instance_id: String,
    pub image_id: String,
    pub state: InstanceStateName,
    pub instance_type: String,
    pub launch_time_unix: i64,
    pub availability_zone: String,
    pub subnet_id: Option<String>,
    pub private_ip: Option<String>,
    pub security_group_ids: Vec<String>,
}

/// One `reservationSet` item (RunInstances answers with one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    pub reservation_id: String,
    pub owner_id: String,
    pub instances: Vec<InstanceItem>,
}

/// One Start/Stop/TerminateInstances item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateChange {
    pub instance_id: String,
    pub current: InstanceStateName,
    pub previous: InstanceStateName,
}

/// One `attachmentSet` item, and the AttachVolume/DetachVolume answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeAttachment {
    pub volume_id: String,
    pub instance_id: String,
    pub device: String,
    pub state: AttachmentStateName,
    pub attach_time_unix: i64,
    pub delete_on_termination: bool,
}

/// One `volumeSet` item, and the CreateVolume answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeItem {
    pub volume_id: String,
    pub size_gib: u32,
    pub availability_zone: String,
    pub state: VolumeStateName,
    pub create_time_unix: i64,
    pub volume_type: String,
    pub encrypted: bool,
    pub kms_key_id: Option<String>,
    /// The snapshot it was made from (written empty when none, as EC2 does).
    pub snapshot_id: Option<String>,
    pub attachments: Vec<VolumeAttachment>,
}

/// A successful answer to one action.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ec2Response {
    RunInstances(Reservation),
    DescribeInstances {
        reservations: Vec<Reservation>,
        next_token: Option<String>,
    },
    StartInstances(Vec<StateChange>),
    StopInstances(Vec<StateChange>),
    TerminateInstances(Vec<StateChange>),
    GetConsoleOutput {
        instance_id: String,
        timestamp_unix: i64,
        /// The raw console bytes; EC2 sends them base64.
        output: Vec<u8>,
    },
    CreateVolume(VolumeItem),
    DescribeVolumes {
        volumes: Vec<VolumeItem>,
        next_token: Option<String>,
    },
    AttachVolume(VolumeAttachment),
    DetachVolume(VolumeAttachment),
    DeleteVolume,
    /// The VPC, subnet and security-group actions.
    Vpc(crate::vpc::VpcResponse),
    /// The snapshot actions.
    Snapshot(crate::snapshot::SnapshotResponse),
}

impl Ec2Response {
    /// The `Action` this answers.
    pub fn action(&self) -> &'static str {
        match self {
            Self::RunInstances(_) => "RunInstances",
            Self::DescribeInstances { .. } => "DescribeInstances",
            Self::StartInstances(_) => "StartInstances",
            Self::StopInstances(_) => "StopInstances",
            Self::TerminateInstances(_) => "TerminateInstances",
            Self::GetConsoleOutput { .. } => "GetConsoleOutput",
            Self::CreateVolume(_) => "CreateVolume",
            Self::DescribeVolumes { .. } => "DescribeVolumes",
            Self::AttachVolume(_) => "AttachVolume",
            Self::DetachVolume(_) => "DetachVolume",
            Self::DeleteVolume => "DeleteVolume",
            Self::Vpc(v) => v.action(),
            Self::Snapshot(s) => s.action(),
        }
    }

    /// The XML body, `<ActionResponse xmlns=…><requestId>…</requestId>…`.
    pub fn to_xml(&self, request_id: &str) -> String {
        let root = format!("{}Response", self.action());
        let mut w = XmlWriter::new();
        w.out.push_str(&format!("<{root} xmlns=\"{NAMESPACE}\">"));
        w.leaf("requestId", request_id);
        match self {
            Self::RunInstances(r) => reservation_body(&mut w, r),
            Self::DescribeInstances {
                reservations,
                next_token,
            } => {
                w.set("reservationSet", reservations, reservation_body);
                w.leaf_opt("nextToken", next_token.as_deref());
            }
            Self::StartInstances(c) | Self::StopInstances(c) | Self::TerminateInstances(c) => {
                w.set("instancesSet", c, |w, c| {
                    w.leaf("instanceId", &c.instance_id);
                    state(w, "currentState", c.current);
                    state(w, "previousState", c.previous);
                });
            }
            Self::GetConsoleOutput {
                instance_id,
                timestamp_unix,
                output,
            } => {
                w.leaf("instanceId", instance_id);
                w.leaf("timestamp", &iso8601(*timestamp_unix));
                w.leaf(
                    "output",
                    &base64::engine::general_purpose::STANDARD.encode(output),
                );
            }
            Self::CreateVolume(v) => volume_body(&mut w, v),
            Self::DescribeVolumes {
                volumes,
                next_token,
            } => {
                w.set("volumeSet", volumes, volume_body);
                w.leaf_opt("nextToken", next_token.as_deref());
            }
            Self::AttachVolume(a) | Self::DetachVolume(a) => attachment_body(&mut w, a),
            Self::DeleteVolume => w.leaf("return", "true"),
            Self::Vpc(v) => v.body(&mut w),
            Self::Snapshot(s) => s.body(&mut w),
        }
        w.close(&root);
        w.out
    }
}

fn state(w: &mut XmlWriter, tag: &str, s: InstanceStateName) {
    w.open(tag);
    w.leaf("code", &s.code().to_string());
    w.leaf("name", s.as_str());
    w.close(tag);
}

fn reservation_body(w: &mut XmlWriter, r: &Reservation) {
    w.leaf("reservationId", &r.reservation_id);
    w.leaf("ownerId", &r.owner_id);
    w.set::<String>("groupSet", &[], |_, _| {});
    w.set("instancesSet", &r.instances, |w, i| {
        w.leaf("instanceId", &i.instance_id);
        w.leaf("imageId", &i.image_id);
        state(w, "instanceState", i.state);
        w.leaf("instanceType", &i.instance_type);
        w.leaf("launchTime", &iso8601(i.launch_time_unix));
        w.open("placement");
        w.leaf("availabilityZone", &i.availability_zone);
        w.close("placement");
        w.leaf_opt("subnetId", i.subnet_id.as_deref());
        w.leaf_opt("privateIpAddress", i.private_ip.as_deref());
        w.set("groupSet", &i.security_group_ids, |w, g| {
            w.leaf("groupId", g)
        });
    });
}

fn attachment_body(w: &mut XmlWriter, a: &VolumeAttachment) {
    w.leaf("volumeId", &a.volume_id);
    w.leaf("instanceId", &a.instance_id);
    w.leaf("device", &a.device);
    w.leaf("status", a.state.as_str());
    w.leaf("attachTime", &iso8601(a.attach_time_unix));
    w.leaf(
        "deleteOnTermination",
        if a.delete_on_termination {
            "true"
        } else {
            "false"
        },
    );
}

fn volume_body(w: &mut XmlWriter, v: &VolumeItem) {
    w.leaf("volumeId", &v.volume_id);
    w.leaf("size", &v.size_gib.to_string());
    w.leaf("snapshotId", v.snapshot_id.as_deref().unwrap_or(""));
    w.leaf("availabilityZone", &v.availability_zone);
    w.leaf("status", v.state.as_str());
    w.leaf("createTime", &iso8601(v.create_time_unix));
    w.leaf("volumeType", &v.volume_type);
    w.leaf("encrypted", if v.encrypted { "true" } else { "false" });
    w.leaf_opt("kmsKeyId", v.kms_key_id.as_deref());
    w.set("attachmentSet", &v.attachments, attachment_body);
}

/// The EC2 error document for `code`, with `message` (escaped) and `request_id`.
pub fn error_xml(code: Ec2ErrorCode, message: &str, request_id: &str) -> String {
    let mut w = XmlWriter::new();
    w.open("Response");
    w.open("Errors");
    w.open("Error");
    w.leaf("Code", code.as_str());
    w.leaf("Message", message);
    w.close("Error");
    w.close("Errors");
    w.leaf("RequestID", request_id);
    w.close("Response");
    w.out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn dates_round_trip() {
        assert_eq!(iso8601(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(iso8601(1_440_938_160), "2015-08-30T12:36:00.000Z");
        assert_eq!(iso8601(1_709_164_800), "2024-02-29T00:00:00.000Z");
        for t in [0, 951_782_400, 1_440_938_160, 4_102_444_799] {
            let s = iso8601(t);
            let compact = format!(
                "{}{}{}T{}{}{}Z",
                &s[0..4],
                &s[5..7],
                &s[8..10],
                &s[11..13],
                &s[14..16],
                &s[17..19]
            );
            assert_eq!(
                crate::sigv4::AmzDate::parse(compact.as_bytes())
                    .unwrap()
                    .unix,
                t
            );
        }
    }

    #[test]
    fn escaping() {
        let x = error_xml(
            Ec2ErrorCode::InvalidAction,
            "bad <a href='x'>&\"\u{1}\r",
            "r-1",
        );
        assert!(
            x.contains(
                "<Message>bad &lt;a href=&apos;x&apos;&gt;&amp;&quot;\u{fffd}&#xD;</Message>"
            ),
            "{x}"
        );
        assert!(x.contains("<Code>InvalidAction</Code>"));
        assert!(x.contains("<RequestID>r-1</RequestID>"));
    }
}

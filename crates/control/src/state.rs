//! Instance and volume states as types, with one table of allowed transitions each.
//!
//! Both repositories (SQLite and PostgreSQL) store the state as its stable name
//! ([`InstanceState::as_str`], [`VolumeState::as_str`]) and every change goes through a
//! compare-and-set on the old state that [`InstanceState::can_become`] /
//! [`VolumeState::can_become`] allowed first, so a transition the table does not list is refused
//! before it reaches the database, and two writers racing on one row cannot both win.

use std::fmt;

/// An instance's lifecycle, as the customer sees it (EC2's names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum InstanceState {
    /// Placed, being created and started on its host.
    Pending,
    Running,
    Stopped,
    /// Gone for good; its host has released it. Final.
    Terminated,
}

/// A volume's attachment state (EBS's names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VolumeState {
    /// Recorded before a volume made from a snapshot joins its key family, so that the row
    /// exists whenever the KMS may hold the membership: a create whose KMS answer was lost stays
    /// here, and DeleteVolume (crypto-erase) still reaches the member. Nothing attaches it.
    Creating,
    Available,
    /// A key is being released and the card started; owned by an attach workflow.
    Attaching,
    InUse,
    /// The card is being stopped and its key zeroized; owned by a detach workflow.
    Detaching,
    /// DeleteVolume took it: its key is being destroyed and its storage released; nothing else
    /// may attach it. Final (the row goes once the delete finishes; a repeat finishes it).
    Deleting,
}

/// A snapshot's lifecycle (EBS's names, plus `deleting`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SnapshotState {
    /// Recorded; its storage copy and key-family membership are being made.
    Pending,
    /// Copied and keyed: volumes can be made from it.
    Completed,
    /// DeleteSnapshot (or the undo of a failed CreateSnapshot) took it: its family membership
    /// is being destroyed and its storage released. Final.
    Deleting,
}

/// A state name that is not one of ours (a corrupt row, or a newer schema).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {kind} state {name:?}")]
pub struct UnknownState {
    pub kind: &'static str,
    pub name: String,
}

/// A transition the table does not allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{kind} cannot go from {from} to {to}")]
pub struct BadTransition {
    pub kind: &'static str,
    pub from: &'static str,
    pub to: &'static str,
}

impl InstanceState {
    pub const ALL: [InstanceState; 4] = [
        InstanceState::Pending,
        InstanceState::Running,
        InstanceState::Stopped,
        InstanceState::Terminated,
    ];

    /// The stable name (stored, and shown to customers).
    pub fn as_str(self) -> &'static str {
        match self {
            InstanceState::Pending => "pending",
            InstanceState::Running => "running",
            InstanceState::Stopped => "stopped",
            InstanceState::Terminated => "terminated",
        }
    }

    pub fn parse(s: &str) -> Result<Self, UnknownState> {
        Self::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| UnknownState {
                kind: "instance",
                name: s.chars().take(32).collect(),
            })
    }

    /// The transition table.
    pub fn can_become(self, to: InstanceState) -> bool {
        use InstanceState::*;
        matches!(
            (self, to),
            (Pending, Running)
                | (Pending, Terminated)
                | (Running, Stopped)
                | (Running, Terminated)
                | (Stopped, Running)
                | (Stopped, Terminated)
        )
    }

    /// `Ok(to)` when allowed, else a typed refusal.
    pub fn check(self, to: InstanceState) -> Result<InstanceState, BadTransition> {
        if self.can_become(to) {
            Ok(to)
        } else {
            Err(BadTransition {
                kind: "instance",
                from: self.as_str(),
                to: to.as_str(),
            })
        }
    }

    /// Still holds cores on its host.
    pub fn is_live(self) -> bool {
        self != InstanceState::Terminated
    }
}

impl VolumeState {
    pub const ALL: [VolumeState; 6] = [
        VolumeState::Creating,
        VolumeState::Available,
        VolumeState::Attaching,
        VolumeState::InUse,
        VolumeState::Detaching,
        VolumeState::Deleting,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            VolumeState::Creating => "creating",
            VolumeState::Available => "available",
            VolumeState::Attaching => "attaching",
            VolumeState::InUse => "in-use",
            VolumeState::Detaching => "detaching",
            VolumeState::Deleting => "deleting",
        }
    }

    pub fn parse(s: &str) -> Result<Self, UnknownState> {
        Self::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| UnknownState {
                kind: "volume",
                name: s.chars().take(32).collect(),
            })
    }

    /// The transition table. `Attaching → Available` and `Detaching → InUse` are the undo of
    /// an attach or detach that failed part-way; `InUse → Available` is the release of a volume
    /// whose instance was lost with its host. `Creating` ends `Available` (keyed) or `Deleting`
    /// (its create failed, or DeleteVolume took it).
    pub fn can_become(self, to: VolumeState) -> bool {
        use VolumeState::*;
        matches!(
            (self, to),
            (Creating, Available)
                | (Creating, Deleting)
                | (Available, Attaching)
                | (Attaching, InUse)
                | (Attaching, Available)
                | (InUse, Detaching)
                | (InUse, Available)
                | (Detaching, Available)
                | (Detaching, InUse)
                | (Available, Deleting)
        )
    }

    pub fn check(self, to: VolumeState) -> Result<VolumeState, BadTransition> {
        if self.can_become(to) {
            Ok(to)
        } else {
            Err(BadTransition {
                kind: "volume",
                from: self.as_str(),
                to: to.as_str(),
            })
        }
    }

    /// Owned by a workflow in flight (the reconciler finishes or unwinds it).
    pub fn in_flight(self) -> bool {
        matches!(self, VolumeState::Attaching | VolumeState::Detaching)
    }
}

impl SnapshotState {
    pub const ALL: [SnapshotState; 3] = [
        SnapshotState::Pending,
        SnapshotState::Completed,
        SnapshotState::Deleting,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            SnapshotState::Pending => "pending",
            SnapshotState::Completed => "completed",
            SnapshotState::Deleting => "deleting",
        }
    }

    pub fn parse(s: &str) -> Result<Self, UnknownState> {
        Self::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| UnknownState {
                kind: "snapshot",
                name: s.chars().take(32).collect(),
            })
    }

    /// The transition table: `Pending → Deleting` is the undo of a create that failed part-way.
    pub fn can_become(self, to: SnapshotState) -> bool {
        use SnapshotState::*;
        matches!(
            (self, to),
            (Pending, Completed) | (Pending, Deleting) | (Completed, Deleting)
        )
    }

    pub fn check(self, to: SnapshotState) -> Result<SnapshotState, BadTransition> {
        if self.can_become(to) {
            Ok(to)
        } else {
            Err(BadTransition {
                kind: "snapshot",
                from: self.as_str(),
                to: to.as_str(),
            })
        }
    }
}

impl fmt::Display for SnapshotState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for InstanceState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for VolumeState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn names_round_trip_and_garbage_is_typed() {
        for s in InstanceState::ALL {
            assert_eq!(InstanceState::parse(s.as_str()), Ok(s));
        }
        for s in VolumeState::ALL {
            assert_eq!(VolumeState::parse(s.as_str()), Ok(s));
        }
        assert_eq!(
            InstanceState::parse("Running").unwrap_err().kind,
            "instance"
        );
        assert!(VolumeState::parse("in_use").is_err());
        assert!(VolumeState::parse("").is_err());
        // serde uses the same names.
        assert_eq!(
            serde_json::to_string(&VolumeState::InUse).unwrap(),
            "\"in-use\""
        );
    }

    #[test]
    fn snapshots_complete_or_are_deleted_and_deleting_is_final() {
        for s in SnapshotState::ALL {
            assert_eq!(SnapshotState::parse(s.as_str()), Ok(s));
            assert!(!SnapshotState::Deleting.can_become(s));
            assert!(!s.can_become(SnapshotState::Pending));
        }
        assert!(SnapshotState::Pending.can_become(SnapshotState::Completed));
        assert!(!SnapshotState::Completed.can_become(SnapshotState::Pending));
        assert_eq!(
            SnapshotState::Deleting
                .check(SnapshotState::Completed)
                .unwrap_err()
                .kind,
            "snapshot"
        );
        assert_eq!(SnapshotState::parse("done").unwrap_err().kind, "snapshot");
    }

    #[test]
    fn terminated_is_final_and_nothing_skips_a_step() {
        for to in InstanceState::ALL {
            assert!(!InstanceState::Terminated.can_become(to));
        }
        for s in InstanceState::ALL {
            assert!(!s.can_become(InstanceState::Pending), "{s} → pending");
            assert!(!s.can_become(s), "{s} → itself");
        }
        assert!(!VolumeState::Available.can_become(VolumeState::InUse));
        assert!(!VolumeState::Available.can_become(VolumeState::Detaching));
        assert!(!VolumeState::Attaching.can_become(VolumeState::Detaching));
        // A volume still being created is never attached, and nothing goes back to creating.
        assert!(!VolumeState::Creating.can_become(VolumeState::Attaching));
        assert!(!VolumeState::Creating.in_flight());
        for s in VolumeState::ALL {
            assert!(!s.can_become(VolumeState::Creating), "{s} → creating");
        }
        assert_eq!(
            VolumeState::Available
                .check(VolumeState::InUse)
                .unwrap_err(),
            BadTransition {
                kind: "volume",
                from: "available",
                to: "in-use"
            }
        );
        // Every in-flight state can be finished or unwound.
        for s in VolumeState::ALL.into_iter().filter(|s| s.in_flight()) {
            assert!(s.can_become(VolumeState::Available));
            assert!(s.can_become(VolumeState::InUse));
        }
    }
}

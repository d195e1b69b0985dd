//! DeployRelease's net-card step: a release carrying `bulkhead-netcard` is applied to every
//! running guest's net card by the in-place path that restarts a dead card (see
//! `host/net_update.rs`), each step audited `DeployRelease:netcard_update` about the release
//! and the instance; on a later failure the moved cards go back to the binaries they ran.

use super::{api, BackendError, Controller, Refusal};
use crate::deploy::DeployError;
use crate::record::ReleaseRecord;

/// A net card moved by this deploy, and the release it ran before (its roll-back target).
pub(super) struct NetMoved {
    pub moved: api::NetCardMoved,
    pub before: Option<u64>,
}

impl Controller {
    /// Moves every running net card to release `v`'s card if `record` carries one. The first
    /// failure stops the step (the card that failed serves on its previous binary) and is
    /// answered as the deploy's error.
    pub(super) async fn deploy_net_cards(
        &self,
        record: &ReleaseRecord,
        v: u64,
        moved: &mut Vec<NetMoved>,
    ) -> Result<Option<DeployError>, Refusal> {
        if !record.carries(crate::launcher::RELEASE_NETCARD) {
            return Ok(None);
        }
        let cards = self.blocking(|b| Ok(b.running_net_cards())).await?;
        for (id, before) in cards {
            let iid = id.clone();
            match self
                .blocking(move |b| b.update_net_card(&iid, Some(v)))
                .await
            {
                Ok(mv) => {
                    self.audit_step("netcard_update", v, Some(id.as_str()), "ok")
                        .await;
                    moved.push(NetMoved { moved: mv, before });
                }
                // Stopped, terminated or detached meanwhile: nothing to move.
                Err(Refusal::Backend(
                    BackendError::WrongState
                    | BackendError::NoSuchInstance
                    | BackendError::NoNetwork,
                )) => {}
                Err(r) => {
                    let code = r.code();
                    self.audit_step("netcard_update", v, Some(id.as_str()), code)
                        .await;
                    return Ok(Some(DeployError::NetCardUpdateFailed {
                        instance: id.to_string(),
                        code,
                    }));
                }
            }
        }
        Ok(None)
    }

    /// The moved net cards back to the binaries they ran before, the last moved first
    /// (audited `DeployRelease:netcard_roll-back`).
    pub(super) async fn roll_back_net_cards(&self, moved: &[NetMoved], v: u64) {
        for m in moved.iter().rev() {
            let Ok(id) = api::ResourceId::parse(&m.moved.instance_id) else {
                continue;
            };
            let before = m.before;
            let back = self.blocking(move |b| b.update_net_card(&id, before)).await;
            let code = match &back {
                Ok(_) => "ok",
                Err(r) => r.code(),
            };
            self.audit_step("netcard_roll-back", v, Some(&m.moved.instance_id), code)
                .await;
        }
    }
}

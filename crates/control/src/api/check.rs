//! Field checks shared by every action's parser: the JSON body, resource ids, idempotency
//! tokens.

use super::MAX_IDS;
use crate::ControlError;

pub(super) fn json<T: serde::de::DeserializeOwned>(body: &str) -> Result<T, ControlError> {
    let body = if body.trim().is_empty() { "{}" } else { body };
    serde_json::from_str(body).map_err(|e| {
        if e.to_string().contains("unknown field") {
            ControlError::UnknownField
        } else {
            ControlError::BadBody
        }
    })
}

pub(super) fn check_id(s: &str) -> Result<(), ControlError> {
    if bulkhead_tokens::ops::valid_resource_id(s) {
        Ok(())
    } else {
        Err(ControlError::BadId)
    }
}

pub(super) fn check_ids(v: &[String]) -> Result<(), ControlError> {
    if v.len() > MAX_IDS {
        return Err(ControlError::BadId);
    }
    v.iter().try_for_each(|s| check_id(s))
}

pub(super) fn check_token(t: &Option<String>) -> Result<(), ControlError> {
    match t {
        Some(t) if t.is_empty() || t.len() > 64 || !t.bytes().all(|b| b.is_ascii_graphic()) => {
            Err(ControlError::BadId)
        }
        _ => Ok(()),
    }
}

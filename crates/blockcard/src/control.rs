//! The control protocol between the controller and a block card lives in `bulkhead-card-proto`,
//! shared with the controller so that the format exists once; re-exported here for the card.

pub use bulkhead_card_proto::*;

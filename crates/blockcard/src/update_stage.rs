//! Where an attached card stands in a card update, shared by the control thread (which hands
//! over and may cancel) and the frontend loop (which exits after a hand-over once its
//! frontend left). Every transition is one compare-and-swap, so a `CancelHandOver` and the
//! frontend's departure cannot both win: either the cancel lands first and the card serves on
//! with its key, or the departure lands first and the cancel is answered `FrontendGone`.
//!
//! ```text
//!   Serving --HandOver ok--> HandedOver --frontend left--> Exiting (keys erased, exit 0)
//!      ^                          |
//!      +------CancelHandOver------+
//! ```

use std::sync::atomic::{AtomicU8, Ordering};

/// A card update's stage on the old card.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpdateStage {
    /// No hand-over pending: a frontend that leaves is waited for again.
    Serving,
    /// The volume state went to the next card: the card exits once its frontend leaves.
    HandedOver,
    /// The frontend left after a hand-over: the keys are being erased and the card exits.
    Exiting,
}

impl UpdateStage {
    fn to_u8(self) -> u8 {
        match self {
            Self::Serving => 0,
            Self::HandedOver => 1,
            Self::Exiting => 2,
        }
    }

    fn from_u8(v: u8) -> Self {
        match v {
            0 => Self::Serving,
            1 => Self::HandedOver,
            _ => Self::Exiting,
        }
    }
}

/// Why a `CancelHandOver` changed nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CancelRefused {
    #[error("no hand-over is pending")]
    NoHandOver,
    #[error("the frontend already left after the hand-over: the card is exiting")]
    FrontendGone,
}

/// The stage, shared between threads.
#[derive(Debug)]
pub struct StageCell(AtomicU8);

impl Default for StageCell {
    fn default() -> Self {
        Self(AtomicU8::new(UpdateStage::Serving.to_u8()))
    }
}

impl StageCell {
    /// The current stage.
    pub fn get(&self) -> UpdateStage {
        UpdateStage::from_u8(self.0.load(Ordering::SeqCst))
    }

    fn swap(&self, from: UpdateStage, to: UpdateStage) -> Result<(), UpdateStage> {
        self.0
            .compare_exchange(from.to_u8(), to.to_u8(), Ordering::SeqCst, Ordering::SeqCst)
            .map(|_| ())
            .map_err(UpdateStage::from_u8)
    }

    /// A hand-over succeeded. `false` if the card is already exiting (nothing changes).
    pub fn handed_over(&self) -> bool {
        match self.swap(UpdateStage::Serving, UpdateStage::HandedOver) {
            Ok(()) | Err(UpdateStage::HandedOver) => true,
            Err(_) => false,
        }
    }

    /// `CancelHandOver`: back to serving, unless none is pending or the frontend already left.
    pub fn cancel(&self) -> Result<(), CancelRefused> {
        match self.swap(UpdateStage::HandedOver, UpdateStage::Serving) {
            Ok(()) => Ok(()),
            Err(UpdateStage::Exiting) => Err(CancelRefused::FrontendGone),
            Err(_) => Err(CancelRefused::NoHandOver),
        }
    }

    /// The frontend left: `true` if a hand-over was pending (the card must now erase its keys
    /// and exit; a later cancel is refused), `false` if the card serves on.
    pub fn frontend_left(&self) -> bool {
        self.swap(UpdateStage::HandedOver, UpdateStage::Exiting)
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn transitions() {
        let s = StageCell::default();
        assert_eq!(s.get(), UpdateStage::Serving);
        assert_eq!(s.cancel(), Err(CancelRefused::NoHandOver));
        assert!(!s.frontend_left(), "no hand-over: the card serves on");
        assert!(s.handed_over());
        assert!(s.handed_over(), "a second hand-over keeps the mark");
        assert_eq!(s.get(), UpdateStage::HandedOver);
        assert_eq!(s.cancel(), Ok(()));
        assert_eq!(s.get(), UpdateStage::Serving);
        assert_eq!(s.cancel(), Err(CancelRefused::NoHandOver));
        assert!(!s.frontend_left(), "cancelled: the card serves on");
        assert!(s.handed_over());
        assert!(s.frontend_left());
        assert_eq!(s.get(), UpdateStage::Exiting);
        assert_eq!(s.cancel(), Err(CancelRefused::FrontendGone));
        assert!(!s.handed_over(), "an exiting card takes no new mark");
        assert!(!s.frontend_left());
        assert_eq!(s.get(), UpdateStage::Exiting);
    }

    /// A cancel racing the frontend's departure: exactly one of them wins, every time.
    #[test]
    fn cancel_and_departure_never_both_win() {
        for _ in 0..500 {
            let s = Arc::new(StageCell::default());
            assert!(s.handed_over());
            let c = {
                let s = s.clone();
                std::thread::spawn(move || s.cancel())
            };
            let left = s.frontend_left();
            let cancelled = c.join().expect("thread");
            match (left, cancelled) {
                (true, Err(CancelRefused::FrontendGone)) => {
                    assert_eq!(s.get(), UpdateStage::Exiting)
                }
                (false, Ok(())) => assert_eq!(s.get(), UpdateStage::Serving),
                other => panic!("both or neither won: {other:?}"),
            }
        }
    }
}

//! The slot state machine: every change of a slot's state goes through [`transition`], so an impossible
//! step (finishing an idle slot, prefilling a generating one) is a typed error instead of silent corruption.

/// The state of a slot (one KV sequence of the context).
///
/// ```text
///                 Admit                         PromptDone
///   ┌──────┐ ─────────────▶ ┌─────────┐ ───────────────────▶ ┌────────────┐
///   │ Idle │                │ Prefill │                      │ Generating │
///   └──────┘ ◀───────────── └─────────┘                      └────────────┘
///      ▲     Finish/Cancel/    │   ▲  Chunk                     │   ▲  Token
///      │     Fail              └───┘                            └───┘
///      │                                                          │
///      └──────────────────────── Finish / Cancel / Fail ──────────┘
/// ```
/// `Idle` keeps the KV cache of the slot's last request for prefix reuse.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SlotState {
    /// Free; holds the previous request's KV cache.
    Idle,
    /// Its prompt is being evaluated in chunks of `-b` tokens.
    Prefill,
    /// Produces one token per scheduler step.
    Generating,
}

/// What happens to a slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SlotEvent {
    /// A queued request is given the slot.
    Admit,
    /// A prompt chunk that is not the last was evaluated.
    Chunk,
    /// The last prompt chunk was evaluated and the first token sampled.
    PromptDone,
    /// One more token was generated.
    Token,
    /// The request ended normally (stop, length).
    Finish,
    /// The client went away.
    Cancel,
    /// The engine failed on this slot's batch.
    Fail,
}

/// An event that is not allowed in a state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("slot transition {event:?} is not allowed from state {from:?}")]
pub struct TransitionError {
    /// State before.
    pub from: SlotState,
    /// The refused event.
    pub event: SlotEvent,
}

/// The one checked transition function of the diagram on [`SlotState`].
///
/// Errors: [`TransitionError`] for an arrow that is not in the diagram.
pub fn transition(from: SlotState, event: SlotEvent) -> Result<SlotState, TransitionError> {
    use SlotEvent::*;
    use SlotState::*;
    match (from, event) {
        (Idle, Admit) => Ok(Prefill),
        (Prefill, Chunk) => Ok(Prefill),
        (Prefill, PromptDone) => Ok(Generating),
        (Generating, Token) => Ok(Generating),
        (Prefill | Generating, Finish | Cancel | Fail) => Ok(Idle),
        _ => Err(TransitionError { from, event }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transition_table() {
        use SlotEvent::*;
        use SlotState::*;
        let states = [Idle, Prefill, Generating];
        let events = [Admit, Chunk, PromptDone, Token, Finish, Cancel, Fail];
        // Expected next state for every (state, event); None = refused.
        let table: [[Option<SlotState>; 7]; 3] = [
            // Admit        Chunk          PromptDone        Token             Finish      Cancel      Fail
            [Some(Prefill), None, None, None, None, None, None], // Idle
            [
                None,
                Some(Prefill),
                Some(Generating),
                None,
                Some(Idle),
                Some(Idle),
                Some(Idle),
            ], // Prefill
            [
                None,
                None,
                None,
                Some(Generating),
                Some(Idle),
                Some(Idle),
                Some(Idle),
            ], // Generating
        ];
        for (si, s) in states.iter().enumerate() {
            for (ei, e) in events.iter().enumerate() {
                let got = transition(*s, *e).ok();
                assert_eq!(got, table[si][ei], "{s:?} --{e:?}-->");
            }
        }
        let err = transition(Idle, Finish).unwrap_err();
        assert!(err.to_string().contains("Finish"));
    }
}

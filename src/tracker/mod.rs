//! The prompt tracker: the one owner of per-prompt state.

//! Who may make the bridge act: the one check every path that acts goes through (requests and Home Assistant
//! entity commands alike), and the bounded names used as metric labels.
//!
//! Pure: a function of the configuration and the command name.

use super::response::{Code, Failure};
use super::COMMANDS;
use crate::config::CommandSettings;

/// The label unknown command names are counted under, so that names from the outside world cannot grow
/// `/metrics` without bound.
pub const OTHER: &str = "other";

/// The metric label for a command name: the name itself when it is one of [`COMMANDS`], else [`OTHER`].
pub fn metric_label(command: &str) -> &'static str {
    COMMANDS.iter().copied().find(|&known| known == command).unwrap_or(OTHER)
}

/// `commands.enabled` and `commands.allow`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// The bridge takes commands; `false` is a read-only bridge.
    pub enabled: bool,
    /// The commands allowed; empty allows all.
    pub allow: Vec<String>,
}

impl Policy {
    /// The policy `[commands]` configures.
    pub fn new(settings: &CommandSettings) -> Self {
        Self { enabled: settings.enabled, allow: settings.allow.clone() }
    }

    /// Whether `command` may be carried out; the failure says why not (`not_allowed`).
    pub fn permits(&self, command: &str) -> Result<(), Failure> {
        if !self.enabled {
            return Err(Failure::new(Code::NotAllowed, "this bridge is read-only (`commands.enabled = false`)"));
        }
        if !self.allow.is_empty() && !self.allow.iter().any(|a| a == command) {
            return Err(Failure::new(Code::NotAllowed, format!("command `{command}` is not allowed here")));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(enabled: bool, allow: &[&str]) -> Policy {
        Policy { enabled, allow: allow.iter().map(|s| s.to_string()).collect() }
    }

    #[test]
    fn a_read_only_bridge_permits_nothing() {
        for command in COMMANDS {
            let failure = policy(false, &[]).permits(command).expect_err(command);
            assert_eq!(failure.code, Code::NotAllowed);
            assert!(failure.message.contains("read-only"), "{}", failure.message);
        }
    }

    #[test]
    fn the_allow_list_is_exact_and_empty_allows_all() {
        assert!(policy(true, &[]).permits("queue").is_ok());
        assert!(policy(true, &["status"]).permits("status").is_ok());
        let failure = policy(true, &["status"]).permits("queue").expect_err("queue is not listed");
        assert_eq!((failure.code, failure.message.as_str()), (Code::NotAllowed, "command `queue` is not allowed here"));
        assert!(policy(true, &["queue"]).permits("queu").is_err());
    }

    #[test]
    fn unknown_command_names_share_one_label() {
        assert_eq!(metric_label("status"), "status");
        assert_eq!(metric_label("upload"), "upload");
        assert_eq!(metric_label("nope-1"), OTHER);
        assert_eq!(metric_label(""), OTHER);
        assert_eq!(metric_label("Status"), OTHER);
    }
}

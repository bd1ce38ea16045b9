//! Which ComfyUI the simulator plays: 0.3.64, the version of the recordings, or a newer one (docs/PROTOCOL.md
//! §11), which adds the jobs API, refuses prompt ids that are not lowercase UUIDs, and sends
//! `execution_success` before its history entry has the outputs.

use std::fmt;
use std::str::FromStr;

/// A ComfyUI version, `major.minor.patch`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ComfyVersion {
    /// Major.
    pub major: u32,
    /// Minor.
    pub minor: u32,
    /// Patch.
    pub patch: u32,
}

impl ComfyVersion {
    /// 0.3.64, the version every transcript was recorded with.
    pub const RECORDED: Self = Self { major: 0, minor: 3, patch: 64 };

    /// Whether this version is newer than the recordings (and so has the newer behaviours).
    pub fn is_newer(self) -> bool {
        self > Self::RECORDED
    }
}

impl Default for ComfyVersion {
    fn default() -> Self {
        Self::RECORDED
    }
}

impl fmt::Display for ComfyVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// A version that is not `major.minor[.patch]` (an optional leading `v`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a ComfyUI version (expected e.g. 0.4.0): {0:?}")]
pub struct VersionError(pub String);

impl FromStr for ComfyVersion {
    type Err = VersionError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || VersionError(s.to_string());
        let parts: Vec<&str> = s.trim().trim_start_matches('v').split('.').collect();
        if !(2..=3).contains(&parts.len()) {
            return Err(bad());
        }
        let number = |i: usize| parts.get(i).map_or(Ok(0), |p| p.parse::<u32>().map_err(|_| bad()));
        Ok(Self { major: number(0)?, minor: number(1)?, patch: number(2)? })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_parse_order_and_print() {
        let v = |s: &str| s.parse::<ComfyVersion>();
        assert_eq!(v("0.3.64"), Ok(ComfyVersion::RECORDED));
        assert_eq!(v("v0.4").map(|v| v.to_string()), Ok("0.4.0".to_string()));
        assert!(!ComfyVersion::default().is_newer());
        assert!(v("0.3.65").expect("version").is_newer());
        assert!(v("0.8.2").expect("version").is_newer());
        assert!(!v("0.3.10").expect("version").is_newer());
        for bad in ["", "0", "0.4.x", "1.2.3.4", "latest"] {
            assert!(v(bad).is_err(), "{bad}");
        }
    }
}

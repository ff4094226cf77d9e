//! Headroom on the data directory's disk: writes that grow the data are refused while free
//! space is below a floor (`--min-free-disk`), so that SQLite and the image files never meet a
//! full disk in normal operation, and reads go on working when it is low.
//!
//! The wall itself is still handled (a full disk is a 503, never an answer for what was not
//! stored: see `store::sqlite::WriteTx`); the floor is what keeps it from being reached by the
//! server's own writes.

use crate::error::{Error, Result, StoreFault};
use std::path::{Path, PathBuf};

/// The default floor: 100 MiB, or 5 % of a filesystem smaller than 2 GiB.
pub const DEFAULT_FLOOR_BYTES: u64 = 100 * 1024 * 1024;
const DEFAULT_FLOOR_SHARE_PERCENT: u64 = 5;

/// `--min-free-disk`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MinFreeDisk {
    /// 100 MiB, or 5 % of the filesystem when that is less (a small disk keeps room to work).
    #[default]
    Auto,
    /// Exactly this many bytes (`0`: no floor; only the wall refuses).
    Bytes(u64),
}

impl std::str::FromStr for MinFreeDisk {
    type Err = String;
    /// `auto`, `0`, or a size: `500MiB`, `2GiB`, `64MB`, `4096` (bytes).
    fn from_str(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if text == "auto" {
            return Ok(MinFreeDisk::Auto);
        }
        let split = text
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len());
        let (number, unit) = text.split_at(split);
        let number: u64 = number.parse().map_err(|_| {
            format!("{text:?} is not a size: write a whole number and a unit, like 100MiB or 2GiB (or auto)")
        })?;
        let unit_bytes: u64 = match unit.trim() {
            "" | "B" => 1,
            "KB" | "kB" => 1000,
            "KiB" => 1024,
            "MB" => 1000 * 1000,
            "MiB" => 1024 * 1024,
            "GB" => 1000 * 1000 * 1000,
            "GiB" => 1024 * 1024 * 1024,
            other => {
                return Err(format!(
                    "{text:?} has an unknown unit {other:?}: use B, KiB, MiB, GiB (or KB, MB, GB)"
                ))
            }
        };
        number
            .checked_mul(unit_bytes)
            .map(MinFreeDisk::Bytes)
            .ok_or_else(|| format!("{text:?} is too large"))
    }
}

/// The free space of one directory's filesystem, checked against the floor.
#[derive(Debug, Clone)]
pub struct DiskSpace {
    dir: PathBuf,
    floor: MinFreeDisk,
}

/// What `statvfs` says, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    /// Free to an unprivileged writer (`f_bavail`).
    pub available: u64,
    pub total: u64,
    /// The floor in force for this filesystem.
    pub floor: u64,
}

impl DiskSpace {
    pub fn new(dir: impl Into<PathBuf>, floor: MinFreeDisk) -> DiskSpace {
        DiskSpace {
            dir: dir.into(),
            floor,
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The filesystem's free and total space now (one `statvfs`, about a microsecond).
    pub fn usage(&self) -> Result<Usage> {
        let stat = rustix::fs::statvfs(&self.dir).map_err(std::io::Error::from)?;
        let block = stat.f_frsize.max(1);
        let total = stat.f_blocks.saturating_mul(block);
        let floor = match self.floor {
            MinFreeDisk::Bytes(bytes) => bytes,
            MinFreeDisk::Auto => DEFAULT_FLOOR_BYTES.min(total / 100 * DEFAULT_FLOOR_SHARE_PERCENT),
        };
        Ok(Usage {
            available: stat.f_bavail.saturating_mul(block),
            total,
            floor,
        })
    }

    /// `Ok` while free space is at or above the floor; else the 503 of a low disk. Called
    /// before every write that grows the data (creates, top-ups, new accounts and keys,
    /// vouchers) and before a worker claims a task (its images would grow it too).
    pub fn ensure_headroom(&self) -> Result<()> {
        if self.floor == MinFreeDisk::Bytes(0) {
            return Ok(());
        }
        let usage = self.usage()?;
        if usage.available < usage.floor {
            return Err(Error::store_unavailable(
                StoreFault::LowDisk,
                format!(
                    "{} has {} bytes free, below the floor of {} bytes (--min-free-disk)",
                    self.dir.display(),
                    usage.available,
                    usage.floor
                ),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!("auto".parse(), Ok(MinFreeDisk::Auto));
        assert_eq!("0".parse(), Ok(MinFreeDisk::Bytes(0)));
        assert_eq!("100MiB".parse(), Ok(MinFreeDisk::Bytes(100 << 20)));
        assert_eq!("2GiB".parse(), Ok(MinFreeDisk::Bytes(2 << 30)));
        assert_eq!("64MB".parse(), Ok(MinFreeDisk::Bytes(64_000_000)));
        assert_eq!("4096".parse(), Ok(MinFreeDisk::Bytes(4096)));
        assert!("ten".parse::<MinFreeDisk>().is_err());
        assert!("5TB".parse::<MinFreeDisk>().is_err());
        assert!("99999999999999GiB".parse::<MinFreeDisk>().is_err());
    }

    #[test]
    fn the_floor_of_a_real_directory() {
        let dir = tempfile::tempdir().unwrap();
        let usage = DiskSpace::new(dir.path(), MinFreeDisk::Auto)
            .usage()
            .unwrap();
        assert!(usage.total > 0 && usage.available <= usage.total);
        assert!(usage.floor <= DEFAULT_FLOOR_BYTES);
        let everything = DiskSpace::new(dir.path(), MinFreeDisk::Bytes(u64::MAX));
        match everything.ensure_headroom() {
            Err(Error::StoreUnavailable { fault, .. }) => assert_eq!(fault, StoreFault::LowDisk),
            other => panic!("{other:?}"),
        }
        assert!(DiskSpace::new(dir.path(), MinFreeDisk::Bytes(0))
            .ensure_headroom()
            .is_ok());
    }
}

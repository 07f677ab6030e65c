//! The watchdog device, through the Linux watchdog API: the device resets the machine unless
//! it is written to within its timeout. Writing any byte pets it; writing `V` just before
//! closing ("magic close") disarms it, where the driver allows. The [`super::HealthMonitor`]
//! pets it after each healthy round only, so a node that stays sick, or whose monitor no longer
//! runs, is reset by the device, and disarms it on a clean stop.
//!
//! The device file is opened for writing without creating it, in append mode (a character
//! device ignores the mode; a regular file or a FIFO given instead, as in tests, records each
//! pet as one byte).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use super::HealthError;

/// The byte written to pet the device.
const PET_BYTE: u8 = b'.';
/// The byte written before closing to disarm it ("magic close").
const MAGIC_CLOSE_BYTE: u8 = b'V';

/// An open watchdog device (Linux watchdog API): any byte written pets it, `V` written before
/// closing disarms it ("magic close"). Opened for writing without creating it, in append mode
/// (a regular file or FIFO given instead, as in tests, records each pet as one byte).
/// Dropping it without [`Watchdog::disarm`] leaves the device armed: it resets the machine
/// when its timeout runs out, which is what a crash should do.
#[derive(Debug)]
pub struct Watchdog {
    path: PathBuf,
    file: File,
}

impl Watchdog {
    /// Opens the device at `path` (`/dev/watchdog`); opening a hardware or `softdog` device
    /// arms it.
    pub fn open(path: &Path) -> Result<Watchdog, HealthError> {
        let file = OpenOptions::new()
            .append(true)
            .open(path)
            .map_err(|source| HealthError::WatchdogOpen {
                path: path.to_path_buf(),
                source,
            })?;
        Ok(Watchdog {
            path: path.to_path_buf(),
            file,
        })
    }

    /// Pets the device: its timeout starts again.
    pub fn pet(&mut self) -> Result<(), HealthError> {
        self.write(PET_BYTE)
    }

    /// Disarms the device ("magic close": `V`, then close).
    pub fn disarm(mut self) -> Result<(), HealthError> {
        self.write(MAGIC_CLOSE_BYTE)
    }

    /// The device path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn write(&mut self, byte: u8) -> Result<(), HealthError> {
        self.file
            .write_all(&[byte])
            .map_err(|source| HealthError::WatchdogWrite {
                path: self.path.clone(),
                source,
            })
    }
}

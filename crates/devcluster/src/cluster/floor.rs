//! The supervisor's controller floor per host: the highest release whose controller `bulkhead
//! up` started for the host. It lives in the cluster's own directory (`supervisor/<host>.floor`,
//! outside the host's data directory), is written only by the supervisor (temporary file,
//! fsync, rename, fsync of the directory) and is never lowered, so a restart of `bulkhead up`
//! keeps refusing releases below it.

use std::path::{Path, PathBuf};

use bulkhead_controller::durable::write_durable;

/// The floor file's first line (a file that does not start with it is not a floor file).
const MAGIC: &str = "bulkhead-controller-floor v1";
/// A floor file is two short lines; anything longer is not one.
const MAX_BYTES: u64 = 128;

/// Why a host's floor cannot be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FloorError {
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
    #[error("{0}: not a controller floor file")]
    Corrupt(PathBuf),
}

/// Host `host`'s floor file in cluster directory `dir`.
pub fn floor_path(dir: &Path, host: &str) -> PathBuf {
    dir.join("supervisor").join(format!("{host}.floor"))
}

/// The floor recorded at `path`; 0 when there is no file yet.
pub fn read_floor(path: &Path) -> Result<u64, FloorError> {
    let raw = match std::fs::File::open(path) {
        Ok(f) => {
            let mut s = String::new();
            std::io::Read::read_to_string(&mut std::io::Read::take(f, MAX_BYTES + 1), &mut s)
                .map_err(|_| FloorError::Corrupt(path.to_path_buf()))?;
            s
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(FloorError::Io(path.to_path_buf(), e)),
    };
    parse(&raw).ok_or_else(|| FloorError::Corrupt(path.to_path_buf()))
}

fn parse(raw: &str) -> Option<u64> {
    if raw.len() as u64 > MAX_BYTES {
        return None;
    }
    let rest = raw.strip_prefix(MAGIC)?.strip_prefix('\n')?;
    let digits = rest.strip_suffix('\n')?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Raises the floor at `path` to `version` (durably); a lower or equal `version` leaves it.
/// Returns the floor now recorded. A corrupt file is an error and is left for the operator.
pub fn raise_floor(path: &Path, version: u64) -> Result<u64, FloorError> {
    let now = read_floor(path)?;
    if version <= now {
        return Ok(now);
    }
    let dir = path
        .parent()
        .ok_or_else(|| FloorError::Corrupt(path.to_path_buf()))?;
    std::fs::create_dir_all(dir).map_err(|e| FloorError::Io(dir.to_path_buf(), e))?;
    // Mode 0666 under the umask, as a file the supervisor creates.
    write_durable(path, format!("{MAGIC}\n{version}\n").as_bytes(), 0o666)
        .map_err(|e| FloorError::Io(path.to_path_buf(), e))?;
    Ok(version)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn round_trip_and_never_lowered() {
        let d = tempfile::tempdir().unwrap();
        let p = floor_path(d.path(), "host-1");
        assert_eq!(read_floor(&p).unwrap(), 0, "no file: floor 0");
        assert_eq!(raise_floor(&p, 3).unwrap(), 3);
        assert_eq!(read_floor(&p).unwrap(), 3);
        assert_eq!(raise_floor(&p, 2).unwrap(), 3, "lowered");
        assert_eq!(read_floor(&p).unwrap(), 3);
        assert_eq!(raise_floor(&p, 7).unwrap(), 7);
        assert_eq!(read_floor(&p).unwrap(), 7);
        assert_eq!(
            std::fs::read_to_string(&p).unwrap(),
            format!("{MAGIC}\n7\n")
        );
        let tmp = format!(".tmp-{}", p.file_name().unwrap().to_string_lossy());
        assert!(!p.with_file_name(tmp).exists());
    }

    #[test]
    fn corrupt_is_a_typed_error_and_is_not_overwritten() {
        let d = tempfile::tempdir().unwrap();
        let p = floor_path(d.path(), "host-1");
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        for bad in [
            "".to_string(),
            "7\n".to_string(),
            format!("{MAGIC}\n"),
            format!("{MAGIC}\n\n"),
            format!("{MAGIC}\n-1\n"),
            format!("{MAGIC}\n7"),
            format!("{MAGIC}\n7\n8\n"),
            format!("{MAGIC}\n+7\n"),
            format!("{MAGIC}\n99999999999999999999999\n"),
            format!("{MAGIC}\n{}\n", "0".repeat(200)),
        ] {
            std::fs::write(&p, &bad).unwrap();
            assert!(
                matches!(read_floor(&p), Err(FloorError::Corrupt(_))),
                "{bad:?}"
            );
            assert!(matches!(raise_floor(&p, 9), Err(FloorError::Corrupt(_))));
            assert_eq!(std::fs::read_to_string(&p).unwrap(), bad);
        }
        std::fs::write(&p, [0xff, 0xfe]).unwrap();
        assert!(matches!(read_floor(&p), Err(FloorError::Corrupt(_))));
    }
}

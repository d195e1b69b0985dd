//! Durable small-file writes: a temporary file beside the target, fsync'd, renamed onto it,
//! and the directory fsync'd, so a crash leaves either the old file or the new one, whole.
//! Used by the release store ([`crate::deploy`]) and by the development cluster's supervisor
//! for its controller floor.

use std::io::Write as _;
use std::path::Path;

/// Fsyncs directory `dir` (makes a rename or create in it durable).
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Writes `data` to `path` through a temporary file (`.tmp-<name>`, created with `mode` under
/// the umask), fsync'd and renamed, the directory too.
pub fn write_durable(path: &Path, data: &[u8], mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let dir = path
        .parent()
        .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    let tmp = dir.join(format!(
        ".tmp-{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("x")
    ));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)?;
    sync_dir(dir)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn a_durable_write_replaces_the_file_whole_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        write_durable(&p, b"one", 0o600).unwrap();
        write_durable(&p, b"two, longer", 0o600).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two, longer");
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("f")]);
        assert!(write_durable(Path::new("/"), b"x", 0o600).is_err());
    }
}

//! The state dir: node identity and small files written atomically.

use anyhow::Context;
use std::io::Write;
use std::path::Path;

/// Write `data` to `path` atomically: temp file, fsync, rename, fsync the dir.
pub fn write_atomic(path: &Path, data: &[u8]) -> anyhow::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp.{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("state"),
        std::process::id()
    ));
    {
        let mut f =
            std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(data)
            .with_context(|| format!("writing {}", tmp.display()))?;
        f.sync_all()
            .with_context(|| format!("syncing {}", tmp.display()))?;
    }
    std::fs::rename(&tmp, path)
        .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Create the state dir (mode 0700: it holds the room key).
pub fn ensure_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    if !dir.is_dir() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("cannot create state dir {}", dir.display()))?;
    }
    // 0700 whoever created it (the keys, certificate and PIN live here)
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(dir)
        .with_context(|| format!("cannot read state dir {}", dir.display()))?;
    if meta.permissions().mode() & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("cannot make state dir {} private", dir.display()))?;
    }
    Ok(())
}

/// 16 lowercase hex characters from the OS RNG.
pub fn random_id() -> anyhow::Result<String> {
    let mut b = [0u8; 8];
    getrandom::fill(&mut b).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// Write a secret (room key, control PIN): atomically, readable by the owner only.
pub fn write_secret(path: &Path, data: &[u8]) -> anyhow::Result<()> {
    write_atomic(path, data)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("cannot make {} private", path.display()))
}

/// A valid control PIN: 1–32 characters, no spaces or control characters.
pub fn valid_pin(p: &str) -> bool {
    !p.is_empty() && p.len() <= 32 && !p.chars().any(|c| c.is_control() || c.is_whitespace())
}

/// The control PIN kept in the state dir (`control-pin`), if there is a valid one.
pub fn read_control_pin(dir: &Path) -> Option<String> {
    let s = std::fs::read_to_string(dir.join("control-pin")).ok()?;
    let p = s.trim();
    valid_pin(p).then(|| p.to_string())
}

/// The box's control PIN: the state dir's, or 6 random digits made (and kept, 0600)
/// on first start.
pub fn control_pin(dir: &Path) -> anyhow::Result<String> {
    if let Some(p) = read_control_pin(dir) {
        return Ok(p);
    }
    let mut b = [0u8; 8];
    getrandom::fill(&mut b).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
    let pin = format!("{:06}", u64::from_le_bytes(b) % 1_000_000);
    write_secret(&dir.join("control-pin"), format!("{pin}\n").as_bytes())?;
    Ok(pin)
}

/// The node's stable id: read from `node-id`, or generated once and kept.
pub fn node_id(dir: &Path) -> anyhow::Result<String> {
    let p = dir.join("node-id");
    match std::fs::read_to_string(&p) {
        Ok(s) if crate::core::id::is_node_id(s.trim()) => return Ok(s.trim().to_string()),
        Ok(s) => {
            tracing::warn!(path = %p.display(), content = %s.trim(), "node-id file is not 16 hex characters; generating a new id");
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", p.display())),
    }
    let id = random_id()?;
    write_atomic(&p, format!("{id}\n").as_bytes())?;
    Ok(id)
}

#[cfg(test)]
mod tests {
    #[test]
    fn node_id_is_stable() {
        let d = tempfile::tempdir().unwrap();
        let a = super::node_id(d.path()).unwrap();
        let b = super::node_id(d.path()).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.len(), 16);
        std::fs::write(d.path().join("node-id"), "garbage").unwrap();
        let c = super::node_id(d.path()).unwrap();
        assert_ne!(c, "garbage");
        assert_eq!(c.len(), 16);
    }
}

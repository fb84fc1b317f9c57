//! The embedded default source: a directory of Kubernetes manifests, watched for changes.
use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use tokio::sync::mpsc;

use super::objects::Objects;
use crate::dir_changes::DirChanges;

/// Edits often arrive as several events (write, chmod, rename); wait this long after the
/// last one before reloading so one edit is one reload.
const DEBOUNCE: Duration = Duration::from_millis(50);
/// Reload anyway this often, in case an event was lost (e.g. on a network filesystem).
const RESYNC: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ManifestDirError {
    #[error("reading manifest directory {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("watching manifest directory {path}: {source}")]
    Watch {
        path: PathBuf,
        source: notify::Error,
    },
}

/// Reads every `*.yaml`, `*.yml` and `*.json` file below `dir`, in name order. Files whose
/// name starts with a dot are skipped, so writers can create a hidden file and rename it.
pub fn load(dir: &Path) -> Result<Objects, ManifestDirError> {
    let mut files = Vec::new();
    collect(dir, &mut files)?;
    files.sort();
    let mut objects = Objects::default();
    for file in files {
        let origin = file
            .strip_prefix(dir)
            .unwrap_or(&file)
            .display()
            .to_string();
        match std::fs::read_to_string(&file) {
            Ok(text) => objects.add_text(&origin, &text),
            // Removed between listing and reading: the next event reloads.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => objects.errors.push(super::objects::ObjectError {
                origin,
                message: format!("cannot read: {e}"),
                ..Default::default()
            }),
        }
    }
    Ok(objects)
}

fn collect(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), ManifestDirError> {
    let entries = std::fs::read_dir(dir).map_err(|source| ManifestDirError::Read {
        path: dir.into(),
        source,
    })?;
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') {
            continue;
        }
        if path.is_dir() {
            collect(&path, out)?;
        } else if [".yaml", ".yml", ".json"].iter().any(|s| name.ends_with(s)) {
            out.push(path);
        }
    }
    Ok(())
}

fn is_change(kind: &notify::EventKind) -> bool {
    use notify::event::{AccessKind, AccessMode, EventKind};
    matches!(
        kind,
        EventKind::Create(_)
            | EventKind::Modify(_)
            | EventKind::Remove(_)
            | EventKind::Access(AccessKind::Close(AccessMode::Write))
            | EventKind::Any
            | EventKind::Other
    )
}

/// What the manifest files are now, from their metadata alone (reading them would be
/// events again): path, size, modification time and inode of each. `None` when the
/// directory cannot be listed.
fn fingerprint(dir: &Path) -> Option<u64> {
    use std::{
        hash::{Hash as _, Hasher as _},
        os::unix::fs::MetadataExt as _,
    };
    let mut files = Vec::new();
    collect(dir, &mut files).ok()?;
    files.sort();
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for f in files {
        f.hash(&mut h);
        if let Ok(m) = std::fs::metadata(&f) {
            (m.len(), m.mtime(), m.mtime_nsec(), m.ino()).hash(&mut h);
        }
    }
    Some(h.finish())
}

/// Watches `dir` and sends a fresh [`Objects`] after every change (and once at start).
pub fn watch(dir: PathBuf, tx: mpsc::Sender<Objects>) -> Result<WatchGuard, ManifestDirError> {
    // Opening and reading are events too (inotify's IN_OPEN): without the filter every load,
    // this daemon's own or another's on a shared directory, set off the next one.
    let mut changes = DirChanges::watch(&dir, |e| is_change(&e.kind)).map_err(|source| {
        ManifestDirError::Watch {
            path: dir.clone(),
            source,
        }
    })?;
    let task = tokio::spawn(async move {
        let mut last = None;
        loop {
            // The resync and events that changed nothing (a touch) leave the snapshot and
            // everything cached with it alone.
            let seen = fingerprint(&dir);
            if seen.is_none() || seen != last {
                match load(&dir) {
                    Ok(objects) => {
                        last = seen;
                        if tx.send(objects).await.is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "manifest directory unreadable; keeping the last good configuration")
                    }
                }
            }
            changes.next(RESYNC, DEBOUNCE).await;
        }
    });
    Ok(WatchGuard { task })
}

/// Stops watching when dropped.
pub struct WatchGuard {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for WatchGuard {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SERVICE: &str = "apiVersion: v1\nkind: Service\nmetadata:\n  name: a\n  namespace: default\nspec:\n  ports:\n  - port: 80\n";

    #[tokio::test]
    async fn reloads_on_a_change_and_not_on_a_read() {
        let dir = std::env::temp_dir().join(format!(
            "sidelane-manifest-watch-{}-{:?}",
            std::process::id(),
            std::time::SystemTime::now()
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let file = dir.join("svc.yaml");
        std::fs::write(&file, SERVICE).expect("write");
        let (tx, mut rx) = mpsc::channel(8);
        let guard = watch(dir.clone(), tx).expect("watch");
        let first = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await;
        assert!(matches!(first, Ok(Some(ref o)) if o.services.len() == 1));

        // Somebody reads the files (as every daemon on a shared directory does).
        for _ in 0..5 {
            std::fs::read_to_string(&file).expect("read");
            let _ = load(&dir);
        }
        let quiet = tokio::time::timeout(Duration::from_millis(500), rx.recv()).await;
        assert!(quiet.is_err(), "reading the manifests reloaded them");

        std::fs::write(&file, SERVICE.replace("name: a", "name: b")).expect("rewrite");
        let changed = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await;
        assert!(matches!(changed, Ok(Some(ref o)) if o.services.contains_key("default/b")));
        drop(guard);
        let _ = std::fs::remove_dir_all(&dir);
    }
}

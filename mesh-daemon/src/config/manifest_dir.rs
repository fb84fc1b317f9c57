//! The embedded default source: a directory of Kubernetes manifests, watched for changes.
use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use notify::{RecursiveMode, Watcher as _};
use tokio::sync::mpsc;

use super::objects::Objects;

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

/// Watches `dir` and sends a fresh [`Objects`] after every change (and once at start).
pub fn watch(dir: PathBuf, tx: mpsc::Sender<Objects>) -> Result<WatchGuard, ManifestDirError> {
    let (ev_tx, mut ev_rx) = mpsc::unbounded_channel();
    let mut watcher = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
        let _ = ev_tx.send(ev.is_ok());
    })
    .map_err(|source| ManifestDirError::Watch {
        path: dir.clone(),
        source,
    })?;
    watcher
        .watch(&dir, RecursiveMode::Recursive)
        .map_err(|source| ManifestDirError::Watch {
            path: dir.clone(),
            source,
        })?;
    let task = tokio::spawn(async move {
        loop {
            match load(&dir) {
                Ok(objects) => {
                    if tx.send(objects).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "manifest directory unreadable; keeping the last good configuration")
                }
            }
            // Wait for a change (or the resync), then for the burst of events to settle.
            let _ = tokio::time::timeout(RESYNC, ev_rx.recv()).await;
            while let Ok(Some(_)) = tokio::time::timeout(DEBOUNCE, ev_rx.recv()).await {}
        }
    });
    Ok(WatchGuard {
        _watcher: watcher,
        task,
    })
}

/// Stops watching when dropped.
pub struct WatchGuard {
    _watcher: notify::RecommendedWatcher,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for WatchGuard {
    fn drop(&mut self) {
        self.task.abort();
    }
}

//! A directory tree watched through inotify (the `notify` crate), reduced to "something that
//! matters changed": bursts of events become one wake-up, and a slow resync covers events
//! the kernel dropped. The manifest source and pod discovery both wait on one of these.
use std::{path::Path, time::Duration};

use notify::{RecursiveMode, Watcher as _};
use tokio::sync::mpsc;

/// Watches a tree; see [`DirChanges::next`].
pub struct DirChanges {
    _watcher: notify::RecommendedWatcher,
    rx: mpsc::UnboundedReceiver<()>,
}

impl DirChanges {
    /// Starts watching `dir` and everything below it (directories created later included).
    /// `relevant` picks the events worth a wake-up; errors from the watcher always count,
    /// since they may mean lost events.
    pub fn watch(dir: &Path, relevant: fn(&notify::Event) -> bool) -> Result<Self, notify::Error> {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut watcher = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
            if ev.as_ref().map_or(true, |e| e.need_rescan() || relevant(e)) {
                let _ = tx.send(());
            }
        })?;
        watcher.watch(dir, RecursiveMode::Recursive)?;
        Ok(Self {
            _watcher: watcher,
            rx,
        })
    }

    /// Returns after the next relevant change, once no further event came for `settle` (one
    /// edit is often several events), or after `resync` without any.
    pub async fn next(&mut self, resync: Duration, settle: Duration) {
        if let Ok(None) = tokio::time::timeout(resync, self.rx.recv()).await {
            // The watcher's thread is gone: nothing will come, fall back to the timer.
            tokio::time::sleep(resync).await;
            return;
        }
        while let Ok(Some(())) = tokio::time::timeout(settle, self.rx.recv()).await {}
    }
}

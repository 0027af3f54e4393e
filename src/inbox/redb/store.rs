//! The inbox database: one redb file holding every user channel's unacknowledged messages,
//! its last offset and the store's epoch. Used by one thread only (the store thread,
//! [`crate::inbox::reply`]), so there is exactly one writer of every `user:` channel's
//! offsets.
//!
//! Tables:
//!
//! - `messages`: `(channel, offset)` -> `(unix second stored, payload)`: what is not acked.
//! - `by_time`: `(unix second stored, channel, offset)` -> `()`: the retention sweep's
//!   index, so it reads only what is old enough instead of the whole store.
//! - `last`: `channel` -> last offset given out; kept after every message is acked or
//!   expired, so a channel's offsets never restart within an epoch.
//! - `meta`: `"epoch"` -> the store's epoch, created once with the file.
//! - `probe`: empty between two commits of [`InboxStore::probe`], which checks that
//!   the store can write again after a failure.
//!
//! [`InboxStore::commit`] applies a batch of appends and acks in one write transaction:
//! one fsync (redb's default `Durability::Immediate`) for all of them. When it returns
//! `Ok`, every append in it survives a crash.

use crate::inbox::StoreError;
use redb::{Database, ReadableTable, TableDefinition};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

const MESSAGES: TableDefinition<(&str, u64), (u64, &[u8])> = TableDefinition::new("messages");
const BY_TIME: TableDefinition<(u64, &str, u64), ()> = TableDefinition::new("by_time");
const LAST: TableDefinition<&str, u64> = TableDefinition::new("last");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const PROBE: TableDefinition<&str, &[u8]> = TableDefinition::new("probe");

/// One write in a group commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op<'a> {
    /// Store `payload` as `channel`'s next message.
    Append {
        /// A `user:<id>` channel.
        channel: &'a str,
        /// The message payload, as it will be delivered.
        payload: &'a [u8],
    },
    /// Remove `channel`'s messages up to and including `upto` (a cumulative ack).
    Ack {
        /// A `user:<id>` channel.
        channel: &'a str,
        /// The last offset the client received.
        upto: u64,
    },
}

/// What one [`Op`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Done {
    /// Appended at this offset.
    Appended(u64),
    /// Acked: this many messages removed.
    Acked(u64),
    /// The ack named an offset the channel has not reached (its last offset is given);
    /// nothing was removed.
    AckAhead(u64),
}

/// A channel's unacknowledged messages, read consistently with its last offset.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Unacked {
    /// The channel's last offset (0: never published).
    pub last: u64,
    /// (offset, payload), oldest first, at most the limit asked for.
    pub messages: Vec<(u64, Vec<u8>)>,
    /// Unacked messages left out because of the limit.
    pub more: u64,
}

/// The open inbox database.
pub struct InboxStore {
    db: Database,
    epoch: u64,
    path: PathBuf,
    repaired: bool,
}

impl std::fmt::Debug for InboxStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InboxStore")
            .field("path", &self.path)
            .field("epoch", &self.epoch)
            .finish()
    }
}

impl InboxStore {
    /// Opens (or creates) the database at `path`, creating its directory, and reads or
    /// creates its epoch. A file left by a crash is repaired by redb on open.
    ///
    /// # Errors
    /// The directory or file cannot be created or opened (permission, disk full), the
    /// file is not a redb database or is corrupt, or another process has it open.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| {
                StoreError::from_io(&e).context(format!("creating directory {}", dir.display()))
            })?;
        }
        let created = !path.exists();
        let repairing = Arc::new(AtomicBool::new(false));
        let flag = repairing.clone();
        let db = Database::builder()
            // Called only when the file was not closed cleanly (a crash, kill -9).
            .set_repair_callback(move |_| flag.store(true, Relaxed))
            .create(path)
            .map_err(|e| {
                StoreError::from_redb(&redb::Error::from(e))
                    .context(format!("opening {}", path.display()))
            })?;
        if created {
            // The new file's directory entry must survive a crash too.
            sync_parent_dir(path)?;
        }
        let tx = db.begin_write().map_err(redb_err)?;
        let epoch = {
            let mut meta = tx.open_table(META).map_err(redb_err)?;
            let stored = meta.get("epoch").map_err(redb_err)?.map(|v| v.value());
            match stored {
                Some(e) => e,
                None => {
                    let e = new_epoch();
                    meta.insert("epoch", e).map_err(redb_err)?;
                    e
                }
            }
        };
        // Creating every table here lets readers assume they exist.
        tx.open_table(MESSAGES).map_err(redb_err)?;
        tx.open_table(BY_TIME).map_err(redb_err)?;
        tx.open_table(LAST).map_err(redb_err)?;
        tx.commit().map_err(redb_err)?;
        Ok(InboxStore {
            db,
            epoch,
            path: path.to_path_buf(),
            repaired: repairing.load(Relaxed),
        })
    }

    /// True when opening had to repair the file: the last process that had it open did
    /// not close it (it crashed or was killed).
    pub fn was_repaired(&self) -> bool {
        self.repaired
    }

    /// The store's epoch: fixed for the life of the file, so `(offset, epoch)` positions
    /// in user channels stay valid across restarts.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Applies `ops` in order in one transaction, committed durably (one fsync), stamping
    /// appends with unix second `now`. Results are in the order of `ops`.
    ///
    /// # Errors
    /// The transaction could not be written or committed: none of `ops` took effect.
    pub fn commit(&self, ops: &[Op<'_>], now: u64) -> Result<Vec<Done>, StoreError> {
        let tx = self.db.begin_write().map_err(redb_err)?;
        let mut results = Vec::with_capacity(ops.len());
        {
            let mut messages = tx.open_table(MESSAGES).map_err(redb_err)?;
            let mut by_time = tx.open_table(BY_TIME).map_err(redb_err)?;
            let mut last = tx.open_table(LAST).map_err(redb_err)?;
            // Channels touched in this batch: last offsets read once, written once.
            let mut lasts: HashMap<&str, u64> = HashMap::new();
            for op in ops {
                let channel = match op {
                    Op::Append { channel, .. } | Op::Ack { channel, .. } => *channel,
                };
                let current = match lasts.get(channel) {
                    Some(&l) => l,
                    None => {
                        let l = last
                            .get(channel)
                            .map_err(redb_err)?
                            .map_or(0, |v| v.value());
                        lasts.insert(channel, l);
                        l
                    }
                };
                match *op {
                    Op::Append { channel, payload } => {
                        let offset = current + 1;
                        messages
                            .insert((channel, offset), (now, payload))
                            .map_err(redb_err)?;
                        by_time
                            .insert((now, channel, offset), ())
                            .map_err(redb_err)?;
                        lasts.insert(channel, offset);
                        results.push(Done::Appended(offset));
                    }
                    Op::Ack { upto, .. } if upto > current => {
                        results.push(Done::AckAhead(current));
                    }
                    Op::Ack { channel, upto } => {
                        let mut gone: Vec<(u64, u64)> = Vec::new();
                        for item in messages
                            .range((channel, 0)..=(channel, upto))
                            .map_err(redb_err)?
                        {
                            let (k, v) = item.map_err(redb_err)?;
                            gone.push((k.value().1, v.value().0));
                        }
                        for &(offset, at) in &gone {
                            messages.remove((channel, offset)).map_err(redb_err)?;
                            by_time.remove((at, channel, offset)).map_err(redb_err)?;
                        }
                        results.push(Done::Acked(gone.len() as u64));
                    }
                }
            }
            for (channel, l) in lasts {
                last.insert(channel, l).map_err(redb_err)?;
            }
        }
        tx.commit().map_err(redb_err)?;
        Ok(results)
    }

    /// Checks that a write of `bytes` can be committed: writes them in one transaction
    /// and deletes them in a second, each committed durably. Leaves the store as it was.
    ///
    /// # Errors
    /// Either transaction could not be written or committed (no space, an I/O error).
    pub fn probe(&self, bytes: usize) -> Result<(), StoreError> {
        let filler = vec![0u8; bytes];
        let tx = self.db.begin_write().map_err(redb_err)?;
        tx.open_table(PROBE)
            .map_err(redb_err)?
            .insert("space", filler.as_slice())
            .map_err(redb_err)?;
        tx.commit().map_err(redb_err)?;
        let tx = self.db.begin_write().map_err(redb_err)?;
        tx.open_table(PROBE)
            .map_err(redb_err)?
            .remove("space")
            .map_err(redb_err)?;
        tx.commit().map_err(redb_err)?;
        Ok(())
    }

    /// `channel`'s last offset and its unacked messages, oldest first, at most `limit`.
    ///
    /// # Errors
    /// The file could not be read.
    pub fn unacked(&self, channel: &str, limit: usize) -> Result<Unacked, StoreError> {
        let tx = self.db.begin_read().map_err(redb_err)?;
        let last = tx
            .open_table(LAST)
            .map_err(redb_err)?
            .get(channel)
            .map_err(redb_err)?
            .map_or(0, |v| v.value());
        let table = tx.open_table(MESSAGES).map_err(redb_err)?;
        let mut out = Unacked {
            last,
            ..Unacked::default()
        };
        for item in table
            .range((channel, 0)..=(channel, u64::MAX))
            .map_err(redb_err)?
        {
            if out.messages.len() >= limit {
                out.more += 1;
                continue;
            }
            let (k, v) = item.map_err(redb_err)?;
            out.messages.push((k.value().1, v.value().1.to_vec()));
        }
        Ok(out)
    }

    /// `channel`'s stored messages after offset `after`, oldest first, at most `limit`.
    ///
    /// # Errors
    /// The file could not be read.
    pub fn messages_after(
        &self,
        channel: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let tx = self.db.begin_read().map_err(redb_err)?;
        let table = tx.open_table(MESSAGES).map_err(redb_err)?;
        let mut out = Vec::new();
        for item in table
            .range((channel, after.saturating_add(1))..=(channel, u64::MAX))
            .map_err(redb_err)?
            .take(limit)
        {
            let (k, v) = item.map_err(redb_err)?;
            out.push((k.value().1, v.value().1.to_vec()));
        }
        Ok(out)
    }

    /// Deletes at most `budget` messages stored before unix second `cutoff` (retention);
    /// returns how many.
    ///
    /// # Errors
    /// The transaction could not be written or committed: nothing was deleted.
    pub fn expire(&self, cutoff: u64, budget: usize) -> Result<u64, StoreError> {
        let tx = self.db.begin_write().map_err(redb_err)?;
        let mut deleted = 0;
        {
            let mut messages = tx.open_table(MESSAGES).map_err(redb_err)?;
            let mut by_time = tx.open_table(BY_TIME).map_err(redb_err)?;
            let mut old: Vec<(u64, String, u64)> = Vec::new();
            for item in by_time
                .range((0, "", 0)..(cutoff, "", 0))
                .map_err(redb_err)?
                .take(budget)
            {
                let (k, _) = item.map_err(redb_err)?;
                let (at, channel, offset) = k.value();
                old.push((at, channel.to_string(), offset));
            }
            for (at, channel, offset) in &old {
                by_time
                    .remove((*at, channel.as_str(), *offset))
                    .map_err(redb_err)?;
                if messages
                    .remove((channel.as_str(), *offset))
                    .map_err(redb_err)?
                    .is_some()
                {
                    deleted += 1;
                }
            }
        }
        tx.commit().map_err(redb_err)?;
        Ok(deleted)
    }
}

fn redb_err(e: impl Into<redb::Error>) -> StoreError {
    StoreError::from_redb(&e.into())
}

/// A new store's epoch: wall-clock nanoseconds, so a store recreated after its file was
/// lost gets an epoch no client holds.
fn new_epoch() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(1, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX / 2))
}

/// fsyncs the directory holding `path`, so that a file just created there is found after
/// a crash.
fn sync_parent_dir(path: &Path) -> Result<(), StoreError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| {
            StoreError::from_io(&e).context(format!("syncing directory {}", dir.display()))
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inbox::ErrorKind;

    fn temp() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sub/inbox.redb");
        (dir, path)
    }

    fn append<'a>(channel: &'a str, payload: &'a [u8]) -> Op<'a> {
        Op::Append { channel, payload }
    }

    #[test]
    fn offsets_are_per_channel_and_survive_reopening() {
        let (_dir, path) = temp();
        let store = InboxStore::open(&path).unwrap();
        let epoch = store.epoch();
        let done = store
            .commit(
                &[
                    append("user:1", b"a"),
                    append("user:2", b"x"),
                    append("user:1", b"b"),
                ],
                100,
            )
            .unwrap();
        assert_eq!(
            done,
            [Done::Appended(1), Done::Appended(1), Done::Appended(2)]
        );
        drop(store);
        let store = InboxStore::open(&path).unwrap();
        assert_eq!(store.epoch(), epoch, "the epoch is persisted");
        let done = store.commit(&[append("user:1", b"c")], 101).unwrap();
        assert_eq!(done, [Done::Appended(3)]);
        let u = store.unacked("user:1", 100).unwrap();
        assert_eq!(u.last, 3);
        assert_eq!(
            u.messages,
            [(1, b"a".to_vec()), (2, b"b".to_vec()), (3, b"c".to_vec())]
        );
        assert_eq!(store.unacked("user:3", 100).unwrap(), Unacked::default());
    }

    #[test]
    fn acks_are_cumulative_and_keep_the_last_offset() {
        let (_dir, path) = temp();
        let store = InboxStore::open(&path).unwrap();
        let ops: Vec<Op> = (0..5).map(|_| append("user:1", b"m")).collect();
        store.commit(&ops, 1).unwrap();
        let done = store
            .commit(
                &[
                    Op::Ack {
                        channel: "user:1",
                        upto: 3,
                    },
                    Op::Ack {
                        channel: "user:1",
                        upto: 3,
                    },
                    Op::Ack {
                        channel: "user:1",
                        upto: 9,
                    },
                ],
                2,
            )
            .unwrap();
        assert_eq!(done, [Done::Acked(3), Done::Acked(0), Done::AckAhead(5)]);
        let u = store.unacked("user:1", 100).unwrap();
        assert_eq!(u.messages.iter().map(|m| m.0).collect::<Vec<_>>(), [4, 5]);
        store
            .commit(
                &[Op::Ack {
                    channel: "user:1",
                    upto: 5,
                }],
                3,
            )
            .unwrap();
        // Everything acked: the next message still continues the offsets.
        assert_eq!(
            store.commit(&[append("user:1", b"n")], 4).unwrap(),
            [Done::Appended(6)]
        );
        // An append and an ack of it in one batch.
        let done = store
            .commit(
                &[
                    append("user:9", b"p"),
                    Op::Ack {
                        channel: "user:9",
                        upto: 1,
                    },
                ],
                5,
            )
            .unwrap();
        assert_eq!(done, [Done::Appended(1), Done::Acked(1)]);
        assert!(store.unacked("user:9", 10).unwrap().messages.is_empty());
    }

    #[test]
    fn a_probe_writes_and_leaves_nothing_behind() {
        let (_dir, path) = temp();
        let store = InboxStore::open(&path).unwrap();
        store.commit(&[append("user:1", b"a")], 1).unwrap();
        store.probe(64 * 1024).unwrap();
        store.probe(64 * 1024).unwrap();
        let tx = store.db.begin_read().unwrap();
        assert!(redb::ReadableTableMetadata::is_empty(&tx.open_table(PROBE).unwrap()).unwrap());
        assert_eq!(store.unacked("user:1", 10).unwrap().messages.len(), 1);
        assert_eq!(
            store.commit(&[append("user:1", b"b")], 2).unwrap(),
            [Done::Appended(2)]
        );
    }

    #[test]
    fn unacked_is_limited_and_counts_the_rest() {
        let (_dir, path) = temp();
        let store = InboxStore::open(&path).unwrap();
        let ops: Vec<Op> = (0..10).map(|_| append("user:1", b"m")).collect();
        store.commit(&ops, 1).unwrap();
        let u = store.unacked("user:1", 4).unwrap();
        assert_eq!((u.last, u.messages.len(), u.more), (10, 4, 6));
        assert_eq!(u.messages[0].0, 1, "oldest first");
    }

    #[test]
    fn retention_deletes_only_old_messages_within_budget() {
        let (_dir, path) = temp();
        let store = InboxStore::open(&path).unwrap();
        store
            .commit(&[append("user:1", b"old"), append("user:2", b"old")], 100)
            .unwrap();
        store.commit(&[append("user:1", b"old2")], 150).unwrap();
        store.commit(&[append("user:1", b"new")], 200).unwrap();
        // Acked messages are gone from the index too: not counted again.
        store
            .commit(
                &[Op::Ack {
                    channel: "user:2",
                    upto: 1,
                }],
                200,
            )
            .unwrap();
        assert_eq!(store.expire(200, 1).unwrap(), 1);
        assert_eq!(store.expire(200, 100).unwrap(), 1);
        assert_eq!(store.expire(200, 100).unwrap(), 0);
        let u = store.unacked("user:1", 10).unwrap();
        assert_eq!(u.messages, [(3, b"new".to_vec())]);
        assert_eq!(u.last, 3);
        drop(store);
        let store = InboxStore::open(&path).unwrap();
        assert_eq!(store.unacked("user:1", 10).unwrap().messages.len(), 1);
    }

    #[test]
    fn open_errors_name_the_path_and_the_kind() {
        let dir = tempfile::tempdir().unwrap();
        let garbage = dir.path().join("not-a-db.redb");
        std::fs::write(&garbage, vec![7u8; 8192]).unwrap();
        let err = InboxStore::open(&garbage).unwrap_err();
        assert!(err.to_string().contains("not-a-db.redb"), "{err}");
        assert!(
            matches!(err.kind, ErrorKind::Corrupt | ErrorKind::Io),
            "{err:?}"
        );
        // A path under a regular file cannot be a directory.
        let under_file = garbage.join("inbox.redb");
        let err = InboxStore::open(&under_file).unwrap_err();
        assert!(err.to_string().contains("creating directory"), "{err}");
    }
}

//! The write-ahead log of pushed rows.
//!
//! Segments are files `<seq>.wal` of records `[u32 len][u32 crc32][payload]`. Appends are
//! group-committed: a writer that finds an fsync in progress waits for it and, if that one did
//! not cover its record, runs the next one for everybody who queued meanwhile. A segment is
//! deleted only after a Delta commit carrying its sequence number as the application
//! transaction version has landed; replay skips segments at or below that version, so a crash
//! between commit and delete never replays rows twice.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tokio::sync::Mutex;

use crate::{Error, Result};

const HEADER: &[u8; 8] = b"TALLYWL1";
const SUFFIX: &str = "wal";

fn io_err(path: &Path, source: std::io::Error) -> Error {
    Error::Wal {
        path: path.display().to_string(),
        source,
    }
}

#[derive(Debug)]
struct Active {
    seq: u64,
    file: Arc<File>,
    path: PathBuf,
    /// Records in the active segment.
    records: u64,
    /// Bytes written through this log since start, across segments.
    written: u64,
}

#[derive(Debug)]
pub(crate) struct Wal {
    dir: PathBuf,
    active: Mutex<Active>,
    /// Bytes known durable, in the same count as `Active::written`.
    synced: Mutex<u64>,
    poisoned: AtomicBool,
    live_bytes: AtomicU64,
}

/// A segment found at startup that still has to be replayed.
#[derive(Debug)]
pub(crate) struct Replay {
    pub seq: u64,
    pub records: Vec<Vec<u8>>,
    /// Bytes at the end that did not form a whole record (a write torn by a crash; such a
    /// record was never acknowledged).
    pub torn_bytes: u64,
}

fn segment_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("{seq:020}.{SUFFIX}"))
}

fn list_segments(dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| io_err(dir, e))? {
        let entry = entry.map_err(|e| io_err(dir, e))?;
        let path = entry.path();
        if path.extension().and_then(|e| e.to_str()) != Some(SUFFIX) {
            continue;
        }
        if let Some(seq) = path
            .file_stem()
            .and_then(|s| s.to_str())
            .and_then(|s| s.parse::<u64>().ok())
        {
            out.push((seq, path));
        }
    }
    out.sort();
    Ok(out)
}

fn read_segment(path: &Path) -> Result<(Vec<Vec<u8>>, u64)> {
    let mut data = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut data))
        .map_err(|e| io_err(path, e))?;
    if data.len() < HEADER.len() || &data[..HEADER.len()] != HEADER {
        // A crash while creating the file leaves it short; it holds nothing acknowledged.
        return Ok((Vec::new(), data.len() as u64));
    }
    let mut pos = HEADER.len();
    let mut records = Vec::new();
    while pos + 8 <= data.len() {
        let len = u32::from_le_bytes([data[pos], data[pos + 1], data[pos + 2], data[pos + 3]]);
        let crc = u32::from_le_bytes([data[pos + 4], data[pos + 5], data[pos + 6], data[pos + 7]]);
        let start = pos + 8;
        let end = start + len as usize;
        if end > data.len() || crc32fast::hash(&data[start..end]) != crc {
            break;
        }
        records.push(data[start..end].to_vec());
        pos = end;
    }
    Ok((records, (data.len() - pos) as u64))
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_err(dir, e))
}

fn create_segment(dir: &Path, seq: u64) -> Result<(File, PathBuf)> {
    let path = segment_path(dir, seq);
    let mut file = OpenOptions::new()
        .create_new(true)
        .append(true)
        .open(&path)
        .map_err(|e| io_err(&path, e))?;
    file.write_all(HEADER).map_err(|e| io_err(&path, e))?;
    file.sync_all().map_err(|e| io_err(&path, e))?;
    sync_dir(dir)?;
    Ok((file, path))
}

async fn fsync(file: Arc<File>, path: PathBuf) -> Result<()> {
    tokio::task::spawn_blocking(move || file.sync_data().map_err(|e| io_err(&path, e)))
        .await
        .map_err(|e| Error::Wal {
            path: "fsync task".into(),
            source: std::io::Error::other(e),
        })?
}

impl Wal {
    /// Opens the log in `dir`, deleting segments already committed (`<= committed`) and
    /// returning the others for replay. New records go to a fresh segment.
    pub(crate) fn open(dir: &Path, committed: Option<i64>) -> Result<(Self, Vec<Replay>)> {
        fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
        let committed = committed.and_then(|v| u64::try_from(v).ok()).unwrap_or(0);
        let mut replay = Vec::new();
        let mut live_bytes = 0;
        let mut max_seq = committed;
        for (seq, path) in list_segments(dir)? {
            max_seq = max_seq.max(seq);
            if seq <= committed {
                fs::remove_file(&path).map_err(|e| io_err(&path, e))?;
                continue;
            }
            let (records, torn_bytes) = read_segment(&path)?;
            live_bytes += fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            replay.push(Replay {
                seq,
                records,
                torn_bytes,
            });
        }
        let seq = max_seq + 1;
        let (file, path) = create_segment(dir, seq)?;
        let wal = Self {
            dir: dir.to_path_buf(),
            active: Mutex::new(Active {
                seq,
                file: Arc::new(file),
                path,
                records: 0,
                written: 0,
            }),
            synced: Mutex::new(0),
            poisoned: AtomicBool::new(false),
            live_bytes: AtomicU64::new(live_bytes + HEADER.len() as u64),
        };
        Ok((wal, replay))
    }

    pub(crate) fn live_bytes(&self) -> u64 {
        self.live_bytes.load(Ordering::Relaxed)
    }

    /// Appends one record and returns once it is on disk. `on_written` runs with the segment
    /// number while the log is still locked, so a rotation cannot slip between the record
    /// landing in a segment and the caller noting which one.
    #[cfg(test)]
    pub(crate) async fn append(&self, payload: &[u8], on_written: impl FnOnce(u64)) -> Result<()> {
        let end = self.write(payload, on_written).await?;
        self.sync_to(end).await
    }

    /// Writes one record without waiting for the disk; returns the log position to pass to
    /// [`Self::sync_to`] before acknowledging it. Splitting the two lets a caller release its
    /// own locks before the fsync, so concurrent writers share one.
    pub(crate) async fn write(&self, payload: &[u8], on_written: impl FnOnce(u64)) -> Result<u64> {
        if self.poisoned.load(Ordering::Acquire) {
            return Err(Error::WalPoisoned);
        }
        let len = u32::try_from(payload.len())
            .map_err(|_| Error::InvalidWrite("a single push must be under 4 GiB".into()))?;
        let mut frame = Vec::with_capacity(payload.len() + 8);
        frame.extend_from_slice(&len.to_le_bytes());
        frame.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
        frame.extend_from_slice(payload);

        let mut a = self.active.lock().await;
        let path = a.path.clone();
        (&*a.file).write_all(&frame).map_err(|e| {
            // A partial frame may be on disk; later frames would follow garbage.
            self.poisoned.store(true, Ordering::Release);
            io_err(&path, e)
        })?;
        a.written += frame.len() as u64;
        a.records += 1;
        self.live_bytes
            .fetch_add(frame.len() as u64, Ordering::Relaxed);
        on_written(a.seq);
        Ok(a.written)
    }

    /// The position after the last record written so far (of the active segment).
    pub(crate) async fn written(&self) -> u64 {
        self.active.lock().await.written
    }

    /// Returns once everything up to `end` is on disk, sharing one fsync among waiters.
    pub(crate) async fn sync_to(&self, end: u64) -> Result<()> {
        if self.poisoned.load(Ordering::Acquire) {
            return Err(Error::WalPoisoned);
        }
        let mut synced = self.synced.lock().await;
        if *synced >= end {
            return Ok(());
        }
        let (file, path, written) = {
            let a = self.active.lock().await;
            (Arc::clone(&a.file), a.path.clone(), a.written)
        };
        if let Err(e) = fsync(file, path).await {
            // After a failed fsync the kernel may have dropped dirty pages: nothing written
            // since the last good sync can be trusted, so refuse further writes.
            self.poisoned.store(true, Ordering::Release);
            return Err(e);
        }
        *synced = written;
        Ok(())
    }

    /// Closes the active segment (if it holds records) and starts a new one. Returns the
    /// highest sealed segment number: every record appended so far is in a segment `<=` it.
    pub(crate) async fn rotate(&self) -> Result<Option<u64>> {
        let mut synced = self.synced.lock().await;
        let mut a = self.active.lock().await;
        if a.records == 0 {
            return Ok(a.seq.checked_sub(1));
        }
        fsync(Arc::clone(&a.file), a.path.clone())
            .await
            .inspect_err(|_| {
                self.poisoned.store(true, Ordering::Release);
            })?;
        *synced = a.written;
        let sealed = a.seq;
        let (file, path) = create_segment(&self.dir, sealed + 1)?;
        self.live_bytes
            .fetch_add(HEADER.len() as u64, Ordering::Relaxed);
        a.seq = sealed + 1;
        a.file = Arc::new(file);
        a.path = path;
        a.records = 0;
        Ok(Some(sealed))
    }

    /// Deletes sealed segments `<= seq`, whose rows are committed to Delta.
    pub(crate) async fn truncate(&self, seq: u64) -> Result<()> {
        let active = self.active.lock().await.seq;
        for (s, path) in list_segments(&self.dir)? {
            if s <= seq && s < active {
                let len = fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
                fs::remove_file(&path).map_err(|e| io_err(&path, e))?;
                self.live_bytes
                    .fetch_sub(len.min(self.live_bytes()), Ordering::Relaxed);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn replays_unflushed_and_drops_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let (wal, replay) = Wal::open(dir.path(), None).unwrap();
        assert!(replay.is_empty());
        let mut seen = Vec::new();
        wal.append(b"one", |s| seen.push(s)).await.unwrap();
        wal.append(b"two", |s| seen.push(s)).await.unwrap();
        assert_eq!(seen, vec![1, 1]);
        assert_eq!(wal.rotate().await.unwrap(), Some(1));
        wal.append(b"three", |s| seen.push(s)).await.unwrap();
        drop(wal);

        // A torn write at the end of segment 2.
        let seg2 = segment_path(dir.path(), 2);
        let mut f = OpenOptions::new().append(true).open(&seg2).unwrap();
        f.write_all(&[9, 0, 0, 0, 1, 2]).unwrap();

        let (wal, replay) = Wal::open(dir.path(), Some(1)).unwrap();
        assert_eq!(replay.len(), 1);
        assert_eq!(replay[0].seq, 2);
        assert_eq!(replay[0].records, vec![b"three".to_vec()]);
        assert_eq!(replay[0].torn_bytes, 6);
        assert!(
            !segment_path(dir.path(), 1).exists(),
            "committed segment deleted"
        );
        // New records never land in a replayed segment.
        wal.append(b"four", |s| assert_eq!(s, 3)).await.unwrap();
    }

    #[tokio::test]
    async fn concurrent_appends_are_all_durable() {
        let dir = tempfile::tempdir().unwrap();
        let (wal, _) = Wal::open(dir.path(), None).unwrap();
        let wal = Arc::new(wal);
        let mut tasks = Vec::new();
        for i in 0..32u32 {
            let wal = Arc::clone(&wal);
            tasks.push(tokio::spawn(async move {
                wal.append(&i.to_le_bytes(), |_| {}).await.unwrap();
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        drop(wal);
        let (_, replay) = Wal::open(dir.path(), None).unwrap();
        let n: usize = replay.iter().map(|r| r.records.len()).sum();
        assert_eq!(n, 32);
    }
}

//! The reads: a batch of block references, planned under the prefaulter's lock
//! ([`super::plan`]), becomes read requests issued without it by a few threads.
//!
//! Each block is brought into the page cache with `posix_fadvise(WILLNEED)` or a `pread`
//! (`prefault_method`), by up to `prefault_concurrency` threads (no more than the CPUs for
//! `posix_fadvise`, which does not wait for the read). Blocks of one file closer than
//! `prefault_merge_bytes` are read with one request covering the gap (at most
//! [`MAX_REQUEST_BYTES`]): a request costs a system call and an I/O submission whatever
//! its size, a few extra blocks of sequential read cost less.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use walvault_protocol::net::config::{PrefaultMethod, PrefetchConfig};

use super::plan::{Lookup, Read, WarmTarget};
use super::{lock, Inner};

/// Largest single warming request after merging neighbouring blocks.
pub(crate) const MAX_REQUEST_BYTES: u64 = 1 << 20;

/// One read request: a byte range of an open file.
type Job = Read<Arc<File>>;

/// Plans `targets` and issues the reads they need; counters updated once the reads are
/// issued.
pub(super) fn warm(
    inner: &Mutex<Inner>,
    running: &AtomicBool,
    pgdata: &Path,
    cfg: &PrefetchConfig,
    targets: &[WarmTarget],
) {
    // Plan under the lock (skips, recent memory, file lengths), then do the I/O without it.
    let batch = {
        let mut guard = lock(inner);
        let inner = &mut *guard;
        let Some(control) = &inner.control else {
            return;
        };
        let layout = control.relation_layout();
        let bs = u64::from(layout.block_size);
        let files = &mut inner.files;
        let planned = inner
            .planner
            .plan(&layout, targets, &mut inner.counters, |loc| {
                if !running.load(Ordering::SeqCst) {
                    return Lookup::Stop;
                }
                match files.open(&pgdata.join(&loc.path), loc.offset + bs) {
                    Some(f) => Lookup::Open {
                        file: f.file,
                        len: f.len,
                    },
                    None => Lookup::Missing,
                }
            });
        match planned {
            Some(b) => b,
            None => return,
        }
    };
    let jobs = batch.reads;
    if jobs.is_empty() {
        return;
    }
    let blocks = jobs.len() as u64;
    let requests = merge_jobs(jobs, cfg.prefault_merge_bytes);
    let n_requests = requests.len() as u64;
    let method = cfg.prefault_method;
    let threads = warming_threads(method, cfg.prefault_concurrency).min(requests.len());
    std::thread::scope(|scope| {
        for part in requests.chunks(requests.len().div_ceil(threads)) {
            scope.spawn(move || read_ahead(method, running, part));
        }
    });
    let mut guard = lock(inner);
    // Counted together once the reads are issued: a status read meanwhile never shows
    // more blocks warmed for PostgreSQL's prefetch than blocks warmed.
    guard.counters.blocks_warmed += blocks;
    guard.counters.warmed_for_pg_prefetch += batch.for_pg_prefetch;
    guard.counters.io_requests += n_requests;
}

/// Threads that issue one batch of requests. A `pread` holds its thread until the data
/// is in, so threads are the reads in flight: `prefault_concurrency` of them. A
/// `posix_fadvise` only submits the read and returns; more threads than CPUs add CPU
/// time taken from replay (and thread start-ups per batch) without more reads in flight.
fn warming_threads(method: PrefaultMethod, concurrency: usize) -> usize {
    let concurrency = concurrency.max(1);
    match method {
        PrefaultMethod::Pread => concurrency,
        PrefaultMethod::Fadvise => concurrency.min(cpus()),
    }
}

/// CPUs this process may use, asked once (the answer reads cgroup files).
fn cpus() -> usize {
    static CPUS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *CPUS.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// Brings the requests' byte ranges into the page cache; stops when PostgreSQL stopped
/// (`running` false): its files are closed with the batch, not after all its reads.
fn read_ahead(method: PrefaultMethod, running: &AtomicBool, jobs: &[Job]) {
    let mut buf = Vec::new();
    for job in jobs {
        if !running.load(Ordering::Relaxed) {
            return;
        }
        match method {
            PrefaultMethod::Fadvise => {
                // SAFETY: fadvise on a descriptor we hold open.
                unsafe {
                    libc::posix_fadvise(
                        job.file.as_raw_fd(),
                        job.offset as i64,
                        job.len as i64,
                        libc::POSIX_FADV_WILLNEED,
                    );
                }
            }
            PrefaultMethod::Pread => {
                buf.resize(job.len as usize, 0);
                let _ = job.file.read_at(&mut buf, job.offset);
            }
        }
    }
}

/// Sorts requests by file and offset and merges those of one file whose gap is at most
/// `gap` bytes, up to [`MAX_REQUEST_BYTES`] per request.
fn merge_jobs(mut jobs: Vec<Job>, gap: u64) -> Vec<Job> {
    jobs.sort_by_key(|j| (Arc::as_ptr(&j.file) as usize, j.offset));
    let mut out: Vec<Job> = Vec::with_capacity(jobs.len());
    for j in jobs {
        if let Some(last) = out.last_mut() {
            let end = last.offset + last.len;
            if Arc::ptr_eq(&last.file, &j.file)
                && j.offset <= end + gap
                && (j.offset + j.len).max(end) - last.offset <= MAX_REQUEST_BYTES
            {
                last.len = (j.offset + j.len).max(end) - last.offset;
                continue;
            }
        }
        out.push(j);
    }
    out
}

#[cfg(test)]
mod tests {
    use walvault_protocol::core::pg::control::ControlFacts;
    use walvault_protocol::core::pg::wal::Lsn;
    use walvault_protocol::core::pg::waldecode::ForkNumber;

    use super::*;

    fn target(lsn: u64, block: u32) -> WarmTarget {
        WarmTarget {
            lsn: Lsn(lsn),
            spc: 1663,
            db: 5,
            rel: 16384,
            fork: ForkNumber::Main,
            block,
            fpw: false,
            will_init: false,
        }
    }

    /// preads wait for their data: one thread per read in flight. fadvise returns at
    /// submission: never more threads than CPUs, never fewer than one.
    #[test]
    fn warming_threads_by_method() {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert_eq!(warming_threads(PrefaultMethod::Pread, 16), 16);
        assert_eq!(warming_threads(PrefaultMethod::Pread, 0), 1);
        assert_eq!(warming_threads(PrefaultMethod::Fadvise, 1000), cpus);
        assert_eq!(warming_threads(PrefaultMethod::Fadvise, 1), 1);
        assert_eq!(warming_threads(PrefaultMethod::Fadvise, 0), 1);
    }

    /// Blocks 7, 8 and 9 (adjacent) and 12 (gap of two blocks) become one request with a
    /// 32 KiB merge distance; 40 is too far. Requests never exceed MAX_REQUEST_BYTES.
    #[test]
    fn neighbouring_blocks_are_read_with_one_request() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("base/5")).unwrap();
        std::fs::write(dir.path().join("base/5/16384"), vec![0u8; 64 * 8192]).unwrap();
        let mut inner = Inner::new();
        inner.control = Some(ControlFacts {
            block_size: 8192,
            relseg_blocks: 131072,
            catalog_version: 202209061,
            major: 15,
            system_identifier: 1,
            wal_block_size: 8192,
            wal_segment_size: 16 << 20,
            data_checksum_version: 0,
        });
        let inner = Mutex::new(inner);
        let targets = [
            target(1, 9),
            target(2, 7),
            target(3, 12),
            target(4, 8),
            target(5, 40),
        ];
        warm(
            &inner,
            &AtomicBool::new(true),
            dir.path(),
            &PrefetchConfig::default(),
            &targets,
        );
        let c = lock(&inner).counters.clone();
        assert_eq!((c.blocks_warmed, c.io_requests), (5, 2), "{c:?}");

        let f = Arc::new(File::open(dir.path().join("base/5/16384")).unwrap());
        let jobs = (0..300u64)
            .map(|b| Job {
                file: f.clone(),
                offset: b * 8192,
                len: 8192,
            })
            .collect();
        let merged = merge_jobs(jobs, 32 << 10);
        assert!(merged.iter().all(|j| j.len <= MAX_REQUEST_BYTES));
        assert_eq!(merged.iter().map(|j| j.len).sum::<u64>(), 300 * 8192);
        assert_eq!(merged.len(), 3);
    }
}

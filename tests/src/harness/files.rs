//! Temp dirs and file helpers: [`TestDir`] (world-traversable, kept for post-mortems
//! when `WALVAULT_KEEP_TMP` is set), log tails for failure messages, blake3 of files.

use std::fs;
use std::path::{Path, PathBuf};

use super::cmd::tail_str;
use super::users::chmod;

/// A temp dir under /tmp, mode 0755 so the `postgres` user can traverse it. Removed on
/// drop unless `WALVAULT_KEEP_TMP` is set.
pub struct TestDir {
    dir: Option<tempfile::TempDir>,
    path: PathBuf,
}

impl TestDir {
    /// Creates `/tmp/walvault-<label>-XXXXXX`.
    pub fn new(label: &str) -> TestDir {
        TestDir::new_in(label, Path::new("/tmp"))
    }

    /// Creates `<parent>/walvault-<label>-XXXXXX` (`/dev/shm` for tests that write tens
    /// of thousands of files: see [`fast_tmp`]).
    pub fn new_in(label: &str, parent: &Path) -> TestDir {
        let dir = tempfile::Builder::new()
            .prefix(&format!("walvault-{label}-"))
            .tempdir_in(parent)
            .unwrap_or_else(|e| panic!("cannot create a temp dir in {}: {e}", parent.display()));
        let path = dir.path().to_path_buf();
        chmod(&path, 0o755);
        TestDir {
            dir: Some(dir),
            path,
        }
    }

    /// The dir.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A path inside.
    pub fn join(&self, p: impl AsRef<Path>) -> PathBuf {
        self.path.join(p)
    }

    /// Creates a subdir (mode 0755) and returns it.
    pub fn subdir(&self, name: &str) -> PathBuf {
        let p = self.path.join(name);
        fs::create_dir_all(&p).unwrap_or_else(|e| panic!("mkdir {}: {e}", p.display()));
        chmod(&p, 0o755);
        p
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if std::env::var_os("WALVAULT_KEEP_TMP").is_some() {
            if let Some(d) = self.dir.take() {
                eprintln!("keeping {}", d.keep().display());
            }
        }
    }
}

/// A memory-backed temp dir parent (`/dev/shm`, where fsync costs nothing) when there is
/// one, else `/tmp`: for tests whose cost would be the disk's, not the code's.
pub fn fast_tmp() -> PathBuf {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        shm.to_path_buf()
    } else {
        PathBuf::from("/tmp")
    }
}

/// A file's content, lossily decoded; empty if it cannot be read.
pub fn read_lossy(path: &Path) -> String {
    fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

/// The last `lines` lines of a file (or a note that it cannot be read).
pub fn tail_file(path: &Path, lines: usize) -> String {
    match fs::read(path) {
        Ok(b) => tail_str(&String::from_utf8_lossy(&b), lines),
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

/// blake3 of some bytes, as hex.
pub fn b3(bytes: &[u8]) -> String {
    blake3::hash(bytes).to_hex().to_string()
}

/// blake3 of a file, read in pieces (for files too large to hold).
pub fn b3_file(path: &Path) -> blake3::Hash {
    let mut hasher = blake3::Hasher::new();
    hasher
        .update_reader(
            fs::File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display())),
        )
        .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    hasher.finalize()
}

/// What fills a [`synthetic_segment`] after its long page header.
#[derive(Clone, Copy, Debug)]
pub enum SegmentFill {
    /// Half the bits of each word vary: compressible like real WAL, not trivially.
    Compressible,
    /// Random words from this salt: incompressible (the stored object is as large as the
    /// segment); different salts give different contents.
    Random(u64),
    /// Zeros, as PostgreSQL leaves a segment it switched away from right after its first
    /// record (and `wal_init_zero` fills new ones): compresses to almost nothing, for tests
    /// that push tens of thousands of segments.
    Zero,
}

/// A WAL segment of `size` bytes whose long page header PostgreSQL 15 (and archived's
/// validation) accepts: magic, timeline, page address, system identifier, segment and
/// block size; the rest filled as `fill` says, the same for the same arguments.
pub fn synthetic_segment(
    size: usize,
    tli: u32,
    segno: u64,
    sysid: u64,
    fill: SegmentFill,
) -> Vec<u8> {
    let mut b = vec![0u8; size];
    let (mut x, mask) = match fill {
        SegmentFill::Compressible | SegmentFill::Zero => (
            segno.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ sysid,
            0x0000_FFFF_0000_00FF,
        ),
        SegmentFill::Random(salt) => (
            (segno.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ sysid ^ salt.rotate_left(17)) | 1,
            u64::MAX,
        ),
    };
    // Zeros need no filling (and the loop is slow in a debug build, 50 000 times).
    let words = if matches!(fill, SegmentFill::Zero) {
        0
    } else {
        size / 8
    };
    for chunk in b.chunks_mut(8).skip(8).take(words) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&(x & mask).to_le_bytes());
    }
    b[0..2].copy_from_slice(&0xD110u16.to_le_bytes());
    b[2..4].copy_from_slice(&2u16.to_le_bytes());
    b[4..8].copy_from_slice(&tli.to_le_bytes());
    b[8..16].copy_from_slice(&(segno * size as u64).to_le_bytes());
    b[16..24].fill(0);
    b[24..32].copy_from_slice(&sysid.to_le_bytes());
    b[32..36].copy_from_slice(&(size as u32).to_le_bytes());
    b[36..40].copy_from_slice(&8192u32.to_le_bytes());
    b
}

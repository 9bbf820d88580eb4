//! A push-style reader of the ustar archives PostgreSQL's BASE_BACKUP sends (pure code).
//!
//! PostgreSQL writes ustar headers (name up to 99 bytes, GNU base-256 for sizes over
//! 8 GiB), regular files, directories and symlinks only, some names prefixed with `./`,
//! and two zero blocks at the end of each archive. Anything else is refused with a typed
//! error, as are paths that could leave the directory they are restored into.

use serde::{Deserialize, Serialize};

/// Tar block size.
const BLOCK: usize = 512;

/// What a tar header describes (only what PostgreSQL writes).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TarEntry {
    /// Path, without a trailing `/`.
    pub path: String,
    /// Kind.
    pub kind: FileKind,
    /// Permission bits.
    pub mode: u32,
    /// Size of the content (0 for directories and symlinks).
    pub size: u64,
    /// Modification time, unix seconds.
    pub mtime: i64,
    /// Link target of a symlink.
    pub link: Option<String>,
}

/// An event of [`TarReader::feed`].
#[derive(Debug)]
pub enum TarEvent<'a> {
    /// A new entry begins.
    Entry(TarEntry),
    /// Content of the current entry.
    Data(&'a [u8]),
    /// The current entry's content is complete.
    EntryEnd,
}

/// Why a tar stream was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TarError {
    /// The header checksum is wrong.
    #[error("tar header checksum mismatch at byte {0}")]
    Checksum(u64),
    /// A numeric field is not a number.
    #[error("tar header at byte {0} has an invalid {1} field")]
    Field(u64, &'static str),
    /// An entry type PostgreSQL never writes.
    #[error("tar entry {path:?} has unsupported type {kind:?}")]
    Unsupported {
        /// Entry path.
        path: String,
        /// Type flag.
        kind: char,
    },
    /// The path is not usable.
    #[error("tar entry {0:?}: unusable path")]
    Path(String),
    /// The archive ended inside an entry.
    #[error("tar archive ended inside entry {0:?}")]
    Truncated(String),
    /// Data after the end-of-archive marker that is not zero padding.
    #[error("data after the end of the tar archive")]
    TrailingData,
    /// The archive ended between entries without its end-of-archive marker.
    #[error(
        "tar archive ended after {0} bytes without its end-of-archive marker (two zero blocks): cut short"
    )]
    Unterminated(u64),
}

#[derive(Debug)]
enum TarState {
    Header,
    Data {
        left: u64,
        pad: u64,
    },
    Pad {
        left: u64,
    },
    /// After the first zero block; `zeros` counts the zero bytes seen since it began.
    End {
        zeros: u64,
    },
}

/// A push-style ustar reader: feed it bytes as they arrive, in any split; it never
/// buffers more than one 512-byte header.
#[derive(Debug)]
pub struct TarReader {
    state: TarState,
    header: Vec<u8>,
    offset: u64,
    current: Option<String>,
}

impl Default for TarReader {
    fn default() -> Self {
        TarReader::new()
    }
}

impl TarReader {
    /// A reader at the start of an archive.
    pub fn new() -> TarReader {
        TarReader {
            state: TarState::Header,
            header: Vec::with_capacity(BLOCK),
            offset: 0,
            current: None,
        }
    }

    /// Consumes `input`, reporting entries and their content to `on_event`.
    pub fn feed<E: From<TarError>>(
        &mut self,
        mut input: &[u8],
        mut on_event: impl FnMut(TarEvent<'_>) -> Result<(), E>,
    ) -> Result<(), E> {
        while !input.is_empty() {
            match &mut self.state {
                TarState::Header => {
                    let take = (BLOCK - self.header.len()).min(input.len());
                    self.header.extend_from_slice(&input[..take]);
                    input = &input[take..];
                    if self.header.len() < BLOCK {
                        continue;
                    }
                    let at = self.offset;
                    self.offset += BLOCK as u64;
                    let block = std::mem::take(&mut self.header);
                    if block.iter().all(|b| *b == 0) {
                        self.state = TarState::End {
                            zeros: BLOCK as u64,
                        };
                        continue;
                    }
                    let entry = parse_header(&block, at)?;
                    let size = entry.size;
                    self.current = Some(entry.path.clone());
                    on_event(TarEvent::Entry(entry))?;
                    let pad = (BLOCK as u64 - size % BLOCK as u64) % BLOCK as u64;
                    if size == 0 {
                        self.current = None;
                        on_event(TarEvent::EntryEnd)?;
                        self.state = TarState::Header;
                    } else {
                        self.state = TarState::Data { left: size, pad };
                    }
                }
                TarState::Data { left, pad } => {
                    let take = (*left).min(input.len() as u64) as usize;
                    let (data, rest) = input.split_at(take);
                    input = rest;
                    *left -= take as u64;
                    self.offset += take as u64;
                    let (left, pad) = (*left, *pad);
                    on_event(TarEvent::Data(data))?;
                    if left == 0 {
                        self.current = None;
                        on_event(TarEvent::EntryEnd)?;
                        self.state = if pad > 0 {
                            TarState::Pad { left: pad }
                        } else {
                            TarState::Header
                        };
                    }
                }
                TarState::Pad { left } => {
                    let take = (*left).min(input.len() as u64);
                    input = &input[take as usize..];
                    *left -= take;
                    self.offset += take;
                    if *left == 0 {
                        self.state = TarState::Header;
                    }
                }
                TarState::End { zeros } => {
                    if input.iter().any(|b| *b != 0) {
                        return Err(TarError::TrailingData.into());
                    }
                    *zeros += input.len() as u64;
                    self.offset += input.len() as u64;
                    input = &[];
                }
            }
        }
        Ok(())
    }

    /// Checks that the archive is complete: not cut inside an entry, and ended by its
    /// end-of-archive marker (two zero blocks), so an archive cut between two entries is
    /// refused too.
    pub fn finish(&self) -> Result<(), TarError> {
        match (&self.state, &self.current) {
            (TarState::End { zeros }, _) if *zeros >= 2 * BLOCK as u64 => Ok(()),
            (TarState::Data { .. }, Some(path)) => Err(TarError::Truncated(path.clone())),
            (TarState::Header, _) if !self.header.is_empty() => {
                Err(TarError::Truncated("(header)".into()))
            }
            _ => Err(TarError::Unterminated(self.offset)),
        }
    }
}

fn cstr(field: &[u8]) -> String {
    let end = field.iter().position(|b| *b == 0).unwrap_or(field.len());
    String::from_utf8_lossy(&field[..end]).into_owned()
}

fn octal(field: &[u8], at: u64, name: &'static str) -> Result<u64, TarError> {
    if field.first().is_some_and(|b| b & 0x80 != 0) {
        // GNU base-256 (PostgreSQL writes sizes over 8 GiB this way).
        let mut v: u64 = u64::from(field[0] & 0x7f);
        for b in &field[1..] {
            v = v
                .checked_mul(256)
                .and_then(|v| v.checked_add(u64::from(*b)))
                .ok_or(TarError::Field(at, name))?;
        }
        return Ok(v);
    }
    let text = cstr(field);
    let text = text.trim_matches(|c: char| c == ' ' || c == '\0');
    if text.is_empty() {
        return Ok(0);
    }
    u64::from_str_radix(text, 8).map_err(|_| TarError::Field(at, name))
}

fn parse_header(b: &[u8], at: u64) -> Result<TarEntry, TarError> {
    let stored = octal(&b[148..156], at, "checksum")?;
    let sum: u64 = b
        .iter()
        .enumerate()
        .map(|(i, v)| {
            if (148..156).contains(&i) {
                u64::from(b' ')
            } else {
                u64::from(*v)
            }
        })
        .sum();
    if sum != stored {
        return Err(TarError::Checksum(at));
    }
    let mut path = cstr(&b[0..100]);
    if &b[257..262] == b"ustar" {
        let prefix = cstr(&b[345..500]);
        if !prefix.is_empty() {
            path = format!("{prefix}/{path}");
        }
    }
    let typeflag = b[156];
    // PostgreSQL names a few entries "./pg_wal", "./pg_wal/archive_status".
    let mut path = path.trim_end_matches('/');
    while let Some(rest) = path.strip_prefix("./") {
        path = rest;
    }
    let path = path.to_string();
    let kind = match typeflag {
        b'0' | 0 => FileKind::File,
        b'5' => FileKind::Directory,
        b'2' => FileKind::Symlink,
        other => {
            return Err(TarError::Unsupported {
                path,
                kind: other as char,
            })
        }
    };
    validate_relative_path(&path).map_err(|_| TarError::Path(path.clone()))?;
    let size = if kind == FileKind::File {
        octal(&b[124..136], at, "size")?
    } else {
        0
    };
    Ok(TarEntry {
        mode: (octal(&b[100..108], at, "mode")? & 0o7777) as u32,
        size,
        mtime: octal(&b[136..148], at, "mtime")? as i64,
        link: (kind == FileKind::Symlink).then(|| cstr(&b[157..257])),
        path,
        kind,
    })
}

/// Builds a ustar header (for tests of readers of PostgreSQL's format; not used by walvault itself).
#[doc(hidden)]
pub fn tar_header(path: &str, kind: FileKind, mode: u32, size: u64, link: &str) -> [u8; BLOCK] {
    let mut b = [0u8; BLOCK];
    let name = if kind == FileKind::Directory {
        format!("{path}/")
    } else {
        path.to_string()
    };
    let n = name.len().min(99);
    b[..n].copy_from_slice(&name.as_bytes()[..n]);
    let put = |b: &mut [u8; BLOCK], range: std::ops::Range<usize>, v: u64| {
        let width = range.len() - 1;
        let s = format!("{v:0width$o}");
        b[range.start..range.start + width].copy_from_slice(&s.as_bytes()[s.len() - width..]);
    };
    put(&mut b, 100..108, u64::from(mode));
    put(&mut b, 108..116, 0);
    put(&mut b, 116..124, 0);
    put(&mut b, 124..136, size);
    put(&mut b, 136..148, 1_700_000_000);
    b[156] = match kind {
        FileKind::File => b'0',
        FileKind::Directory => b'5',
        FileKind::Symlink => b'2',
    };
    let l = link.len().min(99);
    b[157..157 + l].copy_from_slice(&link.as_bytes()[..l]);
    b[257..263].copy_from_slice(b"ustar\0");
    b[263..265].copy_from_slice(b"00");
    b[148..156].fill(b' ');
    let sum: u64 = b.iter().map(|v| u64::from(*v)).sum();
    let s = format!("{sum:06o}\0 ");
    b[148..156].copy_from_slice(s.as_bytes());
    b
}

/// What a tar member is (the kinds PostgreSQL's base backup sends); a backup
/// manifest entry records it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FileKind {
    /// Regular file.
    File,
    /// Directory.
    Directory,
    /// Symbolic link (pg_tblspc entries).
    Symlink,
}

/// Paths inside a backup: relative, no `.`/`..`/empty components, no NUL.
pub fn validate_relative_path(path: &str) -> Result<(), String> {
    if path.is_empty() || path.starts_with('/') || path.contains('\0') || path.len() > 4096 {
        return Err("not a relative path".into());
    }
    if path
        .split('/')
        .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return Err("path has an empty, '.' or '..' component".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn archive() -> Vec<u8> {
        let mut t = Vec::new();
        t.extend_from_slice(&tar_header("base", FileKind::Directory, 0o700, 0, ""));
        let data: Vec<u8> = (0..1500u32).map(|i| i as u8).collect();
        t.extend_from_slice(&tar_header("base/1/123", FileKind::File, 0o600, 1500, ""));
        t.extend_from_slice(&data);
        t.resize(t.len() + (512 - 1500 % 512), 0);
        t.extend_from_slice(&tar_header("./empty", FileKind::File, 0o600, 0, ""));
        t.extend_from_slice(&tar_header(
            "pg_tblspc/16384",
            FileKind::Symlink,
            0o777,
            0,
            "/srv/ts",
        ));
        t.extend_from_slice(&[0u8; 1024]);
        t
    }

    #[derive(Debug, PartialEq)]
    enum Seen {
        Entry(TarEntry),
        Data(Vec<u8>),
        End,
    }

    fn read(bytes: &[u8], piece: usize) -> Result<Vec<Seen>, TarError> {
        let mut r = TarReader::new();
        let mut seen: Vec<Seen> = Vec::new();
        for c in bytes.chunks(piece.max(1)) {
            r.feed::<TarError>(c, |e| {
                match e {
                    TarEvent::Entry(e) => seen.push(Seen::Entry(e)),
                    TarEvent::Data(d) => match seen.last_mut() {
                        Some(Seen::Data(v)) => v.extend_from_slice(d),
                        _ => seen.push(Seen::Data(d.to_vec())),
                    },
                    TarEvent::EntryEnd => seen.push(Seen::End),
                }
                Ok(())
            })?;
        }
        r.finish()?;
        Ok(seen)
    }

    #[test]
    fn reads_postgres_style_archive_in_any_split() {
        let whole = read(&archive(), usize::MAX).unwrap();
        assert_eq!(whole.len(), 9, "{whole:?}");
        match &whole[0] {
            Seen::Entry(e) => {
                assert_eq!(e.path, "base");
                assert_eq!(e.kind, FileKind::Directory);
                assert_eq!(e.mode, 0o700);
            }
            other => panic!("{other:?}"),
        }
        match &whole[3] {
            Seen::Data(d) => assert_eq!(d.len(), 1500),
            other => panic!("{other:?}"),
        }
        match &whole[5] {
            Seen::Entry(e) => assert_eq!(e.path, "empty"),
            other => panic!("{other:?}"),
        }
        match &whole[7] {
            Seen::Entry(e) => assert_eq!(e.link.as_deref(), Some("/srv/ts")),
            other => panic!("{other:?}"),
        }
        for piece in [1, 7, 511, 512, 513, 4096] {
            assert_eq!(read(&archive(), piece).unwrap(), whole, "piece {piece}");
        }
    }

    #[test]
    fn bad_archives_are_refused() {
        let mut a = archive();
        a[10] ^= 1;
        assert!(matches!(read(&a, 100), Err(TarError::Checksum(0))));
        let a = archive();
        assert!(matches!(read(&a[..1200], 100), Err(TarError::Truncated(_))));
        let mut evil = Vec::new();
        evil.extend_from_slice(&tar_header("../etc/passwd", FileKind::File, 0o600, 0, ""));
        assert!(matches!(read(&evil, 512), Err(TarError::Path(_))));
        let mut trailing = archive();
        trailing.push(1);
        assert!(matches!(read(&trailing, 512), Err(TarError::TrailingData)));
    }

    #[test]
    fn an_archive_cut_between_entries_is_refused() {
        let whole = archive();
        // Cut right after the symlink's header (the last entry), after the first zero
        // block, and inside the second: each ends between entries, none is complete.
        let last_header_end = whole.len() - 1024;
        for cut in [last_header_end, last_header_end + 512, whole.len() - 1] {
            for piece in [1, 512, usize::MAX] {
                assert!(
                    matches!(read(&whole[..cut], piece), Err(TarError::Unterminated(_))),
                    "cut at {cut}, piece {piece}: {:?}",
                    read(&whole[..cut], piece)
                );
            }
        }
        // Cut after the first entry (a directory: no data) and before any entry.
        assert!(matches!(
            read(&whole[..512], 512),
            Err(TarError::Unterminated(512))
        ));
        assert!(matches!(read(&[], 512), Err(TarError::Unterminated(0))));
        // Inside the padding after a file's data, and inside the data itself.
        assert!(matches!(
            read(&whole[..1024 + 1510], 512),
            Err(TarError::Unterminated(_))
        ));
        assert!(matches!(
            read(&whole[..1024 + 100], 512),
            Err(TarError::Truncated(_))
        ));
        // Extra zero blocks after the marker are fine (tar pads to its record size).
        let mut padded = whole.clone();
        padded.resize(whole.len() + 8192, 0);
        assert!(read(&padded, 700).is_ok());
    }

    proptest! {
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..3000), piece in 1usize..700) {
            let _ = read(&bytes, piece);
        }
    }
}

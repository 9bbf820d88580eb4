//! PostgreSQL's own `backup_manifest` (what BASE_BACKUP sends after the archives), parsed
//! and used as the oracle of the tar stream while a backup is taken (pure code).
//!
//! The format (PostgreSQL 13+, version 1; version 2 from 17 adds `System-Identifier`) is
//! JSON written one entry a line:
//!
//! ```text
//! { "PostgreSQL-Backup-Manifest-Version": 1,
//! "Files": [
//! { "Path": "backup_label", "Size": 225, "Last-Modified": "...", "Checksum-Algorithm": "CRC32C", "Checksum": "a1b2c3d4" },
//! ...
//! ],
//! "WAL-Ranges": [
//! { "Timeline": 1, "Start-LSN": "0/2000028", "End-LSN": "0/2000100" }
//! ],
//! "Manifest-Checksum": "<SHA-256, hex>"}
//! ```
//!
//! - `Manifest-Checksum` is the SHA-256 of the text up to and including the last newline
//!   before the final line (PostgreSQL's own verifier, `parse_manifest.c`, cuts it there).
//! - A path that is not UTF-8 is given as `Encoded-Path` (hex) instead of `Path`. Files of
//!   a tablespace are named `pg_tblspc/<oid>/<path in that tablespace's tar>`.
//! - Every regular file of the tar streams has an entry, and only those: directories and
//!   symlinks have none. `Size` is the number of bytes sent.
//! - The CRC32C checksum is the hex of the finished CRC's four bytes in the *server's*
//!   memory order (PostgreSQL `memcpy`s the `uint32`): little-endian on every machine
//!   PostgreSQL is commonly run on. [`crc32c_matches`] accepts either order, so a
//!   big-endian server is not refused (the cost is one bit of the 32).
//!
//! [`PgBackupManifest::check`] compares what the tar streams carried ([`FileDigest`]s,
//! computed on the way in) with the manifest: every file with its size and CRC32C, no file
//! missing, none extra.

use std::collections::BTreeMap;
use std::fmt;

use serde::Deserialize;
use sha2::{Digest, Sha256};

/// What the tar streams carried of one regular file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileDigest {
    /// The path as the manifest names it (`pg_tblspc/<oid>/...` for a tablespace's file).
    pub path: String,
    /// Bytes of content.
    pub size: u64,
    /// CRC32C of the content (Castagnoli, as PostgreSQL's `pg_crc32c`).
    pub crc32c: u32,
}

/// One file of the manifest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ManifestFile {
    /// Size in bytes.
    pub size: u64,
    /// The CRC32C as the manifest spells it (8 hex digits).
    pub crc32c: [u8; 4],
}

/// PostgreSQL's backup manifest, its own checksum verified.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PgBackupManifest {
    /// Manifest version (1, or 2 from PostgreSQL 17).
    pub version: u32,
    /// Files by path.
    pub files: BTreeMap<String, ManifestFile>,
}

/// Why a manifest text is not a PostgreSQL backup manifest walvault can check against.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    /// Not the JSON of a manifest.
    #[error("PostgreSQL's backup manifest is not valid: {0}")]
    Invalid(String),
    /// `Manifest-Checksum` does not match the text.
    #[error(
        "PostgreSQL's backup manifest is damaged: its Manifest-Checksum is {stated}, the SHA-256 \
         of its text is {computed}"
    )]
    Checksum {
        /// As the manifest states it.
        stated: String,
        /// Of the text received.
        computed: String,
    },
    /// A file's checksum is not CRC32C (the command asks for CRC32C).
    #[error("PostgreSQL's backup manifest gives file {path:?} a {algorithm} checksum, not the CRC32C asked for")]
    Algorithm {
        /// File.
        path: String,
        /// Algorithm named.
        algorithm: String,
    },
}

/// A difference between the tar streams and the manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mismatch {
    /// Sizes differ.
    Size {
        /// File.
        path: String,
        /// Per the manifest.
        manifest: u64,
        /// In the tar stream.
        tar: u64,
    },
    /// CRC32C differs.
    Crc {
        /// File.
        path: String,
        /// Per the manifest (hex, as spelt there).
        manifest: String,
        /// Of the bytes received (hex, little-endian as PostgreSQL writes it).
        tar: String,
    },
    /// In the manifest, not in any tar stream.
    Missing {
        /// File.
        path: String,
    },
    /// In a tar stream, not in the manifest (or twice in the tar streams).
    Extra {
        /// File.
        path: String,
    },
}

impl Mismatch {
    /// The file it is about.
    pub fn path(&self) -> &str {
        match self {
            Mismatch::Size { path, .. }
            | Mismatch::Crc { path, .. }
            | Mismatch::Missing { path }
            | Mismatch::Extra { path } => path,
        }
    }
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Mismatch::Size {
                path,
                manifest,
                tar,
            } => write!(
                f,
                "file {path}: {tar} bytes received, PostgreSQL's manifest says {manifest}"
            ),
            Mismatch::Crc {
                path,
                manifest,
                tar,
            } => write!(
                f,
                "file {path}: CRC32C {tar} of the bytes received, PostgreSQL's manifest says {manifest} \
                 (damaged between PostgreSQL and pushclient)"
            ),
            Mismatch::Missing { path } => write!(
                f,
                "file {path} is in PostgreSQL's manifest but was not in the backup's tar stream"
            ),
            Mismatch::Extra { path } => write!(
                f,
                "file {path} was in the backup's tar stream but is not in PostgreSQL's manifest"
            ),
        }
    }
}

/// The tar streams do not match the manifest: the first mismatches (by path) and how many
/// there are in all.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct Mismatches {
    /// The first few, sorted by path.
    pub first: Vec<Mismatch>,
    /// How many in all.
    pub total: usize,
}

impl fmt::Display for Mismatches {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the backup does not match PostgreSQL's backup_manifest: "
        )?;
        for (i, m) in self.first.iter().enumerate() {
            if i > 0 {
                write!(f, "; ")?;
            }
            write!(f, "{m}")?;
        }
        if self.total > self.first.len() {
            write!(f, "; and {} more", self.total - self.first.len())?;
        }
        Ok(())
    }
}

/// How many mismatches an error lists.
const LISTED: usize = 5;

#[derive(Deserialize)]
struct RawManifest {
    #[serde(rename = "PostgreSQL-Backup-Manifest-Version")]
    version: u32,
    #[serde(rename = "Files")]
    files: Vec<RawFile>,
    #[serde(rename = "Manifest-Checksum")]
    checksum: String,
}

#[derive(Deserialize)]
struct RawFile {
    #[serde(rename = "Path")]
    path: Option<String>,
    #[serde(rename = "Encoded-Path")]
    encoded_path: Option<String>,
    #[serde(rename = "Size")]
    size: u64,
    #[serde(rename = "Checksum-Algorithm")]
    algorithm: Option<String>,
    #[serde(rename = "Checksum")]
    checksum: Option<String>,
}

/// Whether `crc` is what the manifest spells as `stated` (either byte order, see the
/// module header).
pub fn crc32c_matches(stated: &[u8; 4], crc: u32) -> bool {
    *stated == crc.to_le_bytes() || *stated == crc.to_be_bytes()
}

impl PgBackupManifest {
    /// Parses the manifest text and verifies its `Manifest-Checksum`.
    pub fn parse(text: &[u8]) -> Result<PgBackupManifest, ManifestError> {
        let raw: RawManifest =
            serde_json::from_slice(text).map_err(|e| ManifestError::Invalid(e.to_string()))?;
        if !(1..=2).contains(&raw.version) {
            return Err(ManifestError::Invalid(format!(
                "manifest version {} (walvault reads versions 1 and 2)",
                raw.version
            )));
        }
        let newlines: Vec<usize> = text
            .iter()
            .enumerate()
            .filter(|(_, b)| **b == b'\n')
            .map(|(i, _)| i)
            .collect();
        let covered = match newlines.len() {
            0 | 1 => {
                return Err(ManifestError::Invalid(
                    "fewer than two lines: no text for Manifest-Checksum to cover".into(),
                ))
            }
            n => newlines[n - 2] + 1,
        };
        let computed = hex::encode(Sha256::digest(&text[..covered]));
        if !computed.eq_ignore_ascii_case(&raw.checksum) {
            return Err(ManifestError::Checksum {
                stated: raw.checksum,
                computed,
            });
        }
        let mut files = BTreeMap::new();
        for f in raw.files {
            let path = match (f.path, f.encoded_path) {
                (Some(p), None) => p,
                (None, Some(e)) => {
                    let bytes = hex::decode(&e).map_err(|_| {
                        ManifestError::Invalid(format!("Encoded-Path {e:?} is not hex"))
                    })?;
                    String::from_utf8_lossy(&bytes).into_owned()
                }
                _ => {
                    return Err(ManifestError::Invalid(
                        "a file entry has neither or both of Path and Encoded-Path".into(),
                    ))
                }
            };
            let algorithm = f.algorithm.unwrap_or_else(|| "NONE".into());
            if !algorithm.eq_ignore_ascii_case("CRC32C") {
                return Err(ManifestError::Algorithm { path, algorithm });
            }
            let crc32c = f
                .checksum
                .as_deref()
                .and_then(|c| hex::decode(c).ok())
                .and_then(|b| <[u8; 4]>::try_from(b).ok())
                .ok_or_else(|| {
                    ManifestError::Invalid(format!("file {path:?} has no 8-digit CRC32C checksum"))
                })?;
            if files
                .insert(
                    path.clone(),
                    ManifestFile {
                        size: f.size,
                        crc32c,
                    },
                )
                .is_some()
            {
                return Err(ManifestError::Invalid(format!(
                    "file {path:?} is listed twice"
                )));
            }
        }
        Ok(PgBackupManifest {
            version: raw.version,
            files,
        })
    }

    /// Checks what the tar streams carried against the manifest; the number of files
    /// checked when every file matches.
    pub fn check<'a>(
        &self,
        received: impl IntoIterator<Item = &'a FileDigest>,
    ) -> Result<usize, Mismatches> {
        let mut all: Vec<Mismatch> = Vec::new();
        let mut seen: BTreeMap<&str, ()> = BTreeMap::new();
        for d in received {
            if seen.insert(d.path.as_str(), ()).is_some() {
                all.push(Mismatch::Extra {
                    path: d.path.clone(),
                });
                continue;
            }
            match self.files.get(&d.path) {
                None => all.push(Mismatch::Extra {
                    path: d.path.clone(),
                }),
                Some(m) if m.size != d.size => all.push(Mismatch::Size {
                    path: d.path.clone(),
                    manifest: m.size,
                    tar: d.size,
                }),
                Some(m) if !crc32c_matches(&m.crc32c, d.crc32c) => all.push(Mismatch::Crc {
                    path: d.path.clone(),
                    manifest: hex::encode(m.crc32c),
                    tar: hex::encode(d.crc32c.to_le_bytes()),
                }),
                Some(_) => {}
            }
        }
        for path in self.files.keys() {
            if !seen.contains_key(path.as_str()) {
                all.push(Mismatch::Missing { path: path.clone() });
            }
        }
        if all.is_empty() {
            return Ok(seen.len());
        }
        all.sort_by(|a, b| a.path().cmp(b.path()));
        let total = all.len();
        all.truncate(LISTED);
        Err(Mismatches { first: all, total })
    }
}

/// Builds a manifest text as PostgreSQL writes it, its checksum included (for tests of
/// the checker; not used by walvault itself).
#[doc(hidden)]
pub fn manifest_text(files: &[(&str, u64, u32)]) -> String {
    let mut t = String::from("{ \"PostgreSQL-Backup-Manifest-Version\": 1,\n\"Files\": [\n");
    for (i, (path, size, crc)) in files.iter().enumerate() {
        t.push_str(&format!(
            "{{ \"Path\": {}, \"Size\": {size}, \"Last-Modified\": \"2026-12-02 07:00:00 GMT\", \
             \"Checksum-Algorithm\": \"CRC32C\", \"Checksum\": \"{}\" }}{}\n",
            serde_json::Value::String(path.to_string()),
            hex::encode(crc.to_le_bytes()),
            if i + 1 < files.len() { "," } else { "" }
        ));
    }
    t.push_str("],\n\"WAL-Ranges\": [\n{ \"Timeline\": 1, \"Start-LSN\": \"0/2000028\", \"End-LSN\": \"0/2000100\" }\n],\n");
    let sum = hex::encode(Sha256::digest(t.as_bytes()));
    t.push_str(&format!("\"Manifest-Checksum\": \"{sum}\"}}\n"));
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(path: &str, data: &[u8]) -> FileDigest {
        FileDigest {
            path: path.into(),
            size: data.len() as u64,
            crc32c: crc32c::crc32c(data),
        }
    }

    fn files() -> Vec<FileDigest> {
        vec![
            digest("backup_label", b"START WAL LOCATION: 0/2000028\n"),
            digest("base/5/16384", &[7u8; 8192]),
            digest("pg_tblspc/16400/PG_15_202209061/5/16401", &[1u8; 100]),
            digest("global/pg_control", &[0u8; 8192]),
        ]
    }

    fn text_of(d: &[FileDigest]) -> String {
        let v: Vec<(&str, u64, u32)> = d
            .iter()
            .map(|f| (f.path.as_str(), f.size, f.crc32c))
            .collect();
        manifest_text(&v)
    }

    /// A changed manifest text with its checksum made right again.
    fn resign(text: &str) -> String {
        let body_end = text.find("\"Manifest-Checksum\"").unwrap();
        let sum = hex::encode(Sha256::digest(&text.as_bytes()[..body_end]));
        format!("{}\"Manifest-Checksum\": \"{sum}\"}}\n", &text[..body_end])
    }

    #[test]
    fn a_matching_backup_passes_and_crc32c_is_postgres_crc() {
        // PostgreSQL's pg_crc32c of "123456789" (the CRC-32C check value) is e3069283,
        // which its manifests spell "839206e3" (little-endian memory order).
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
        assert!(crc32c_matches(&[0x83, 0x92, 0x06, 0xe3], 0xe306_9283));
        let d = files();
        let m = PgBackupManifest::parse(text_of(&d).as_bytes()).unwrap();
        assert_eq!(m.version, 1);
        assert_eq!(m.check(&d), Ok(4));
    }

    #[test]
    fn mismatches_name_the_file() {
        let d = files();
        let m = PgBackupManifest::parse(text_of(&d).as_bytes()).unwrap();

        let mut size = d.clone();
        size[1].size += 1;
        let e = m.check(&size).unwrap_err();
        assert_eq!(
            e.first,
            vec![Mismatch::Size {
                path: "base/5/16384".into(),
                manifest: 8192,
                tar: 8193
            }]
        );
        assert!(e.to_string().contains("file base/5/16384"), "{e}");

        let mut crc = d.clone();
        crc[2].crc32c ^= 1 << 9;
        let e = m.check(&crc).unwrap_err();
        assert!(
            matches!(&e.first[..], [Mismatch::Crc { path, .. }] if path == "pg_tblspc/16400/PG_15_202209061/5/16401"),
            "{e:?}"
        );

        let missing = &d[..3];
        let e = m.check(missing).unwrap_err();
        assert_eq!(
            e.first,
            vec![Mismatch::Missing {
                path: "global/pg_control".into()
            }]
        );

        let mut extra = d.clone();
        extra.push(digest("base/5/99999", b"x"));
        let e = m.check(&extra).unwrap_err();
        assert_eq!(
            e.first,
            vec![Mismatch::Extra {
                path: "base/5/99999".into()
            }]
        );
        let mut twice = d.clone();
        twice.push(d[0].clone());
        assert!(matches!(
            &m.check(&twice).unwrap_err().first[..],
            [Mismatch::Extra { .. }]
        ));

        // Many at once: the first few are listed, the count is exact.
        let many: Vec<FileDigest> = (0..20)
            .map(|i| digest(&format!("x/{i:02}"), b"y"))
            .collect();
        let e = m.check(&many).unwrap_err();
        assert_eq!((e.first.len(), e.total), (LISTED, 24));
        assert!(e.to_string().contains("and 19 more"), "{e}");
    }

    #[test]
    fn a_wrong_manifest_checksum_is_refused() {
        let text = text_of(&files());
        // One byte of a size changed: the text no longer matches its checksum.
        let damaged = text.replacen("\"Size\": 8192", "\"Size\": 8193", 1);
        assert_ne!(damaged, text);
        assert!(matches!(
            PgBackupManifest::parse(damaged.as_bytes()),
            Err(ManifestError::Checksum { .. })
        ));
        // The checksum itself changed.
        let at = text.find("\"Manifest-Checksum\": \"").unwrap() + 22;
        let mut bad = text.clone().into_bytes();
        bad[at] = if bad[at] == b'0' { b'1' } else { b'0' };
        assert!(matches!(
            PgBackupManifest::parse(&bad),
            Err(ManifestError::Checksum { .. })
        ));
        assert!(matches!(
            PgBackupManifest::parse(b"{\"a\": 1}"),
            Err(ManifestError::Invalid(_))
        ));
        let sha = resign(&text.replacen("\"CRC32C\"", "\"SHA256\"", 1));
        assert!(matches!(
            PgBackupManifest::parse(sha.as_bytes()),
            Err(ManifestError::Algorithm { .. })
        ));
    }

    #[test]
    fn encoded_paths_are_decoded() {
        let text = text_of(&files()[..1]);
        let encoded = text.replacen(
            "\"Path\": \"backup_label\"",
            &format!("\"Encoded-Path\": \"{}\"", hex::encode("backup_label")),
            1,
        );
        let m = PgBackupManifest::parse(resign(&encoded).as_bytes()).unwrap();
        assert!(m.files.contains_key("backup_label"));
    }
}

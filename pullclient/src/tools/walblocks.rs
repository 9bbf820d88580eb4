//! `pullclient wal-blocks FILE...`: every block reference of the WAL in consecutive
//! segment files, one line each, in WAL order: the blocks replay will touch, which is
//! what the prefetcher warms. Needs no configuration and no archive.
//!
//! ```text
//! 0/0071E898 16384/5/16390 main 0 -
//! 0/00717B30 1663/5/16385 main 0 fpw
//! ```
//!
//! Fields: the record's LSN as pg_waldump prints it (`%X/%08X`), the relation
//! (tablespace/database/relfilenode), the fork (`main`, `fsm`, `vm`, `init`), the block
//! number, and `fpw` when the record carries a full-page image of the block (`-` if not).
//!
//! The files are read in the order given, each after the previous: records spanning them
//! decode. Every file but the last must be a whole segment. Exit 0 when the input or the
//! WAL in it ends (a torn or zeroed tail is the end of the WAL, said on stderr); 1 when a
//! file cannot be read, is not WAL, or the WAL is corrupt (valid WAL after damage): the
//! lines printed before stay valid.

use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use walvault_protocol::core::pg::wal::{LongPageHeader, LONG_PAGE_HEADER_LEN};
use walvault_protocol::core::pg::waldecode::{DecodedRecord, Next, WalDecoder, WaldumpLsn};

/// Bytes read from a file at a time (memory stays near this, whatever the segment size).
const READ_CHUNK: usize = 1 << 20;

/// Runs the command (a reader that went away early is not a failure).
pub(crate) fn run(files: &[PathBuf]) -> Result<()> {
    let stdout = io::stdout();
    let mut out = BufWriter::new(stdout.lock());
    match dump(files, &mut out).and_then(|()| Ok(out.flush()?)) {
        Err(e) if is_broken_pipe(&e) => Ok(()),
        Err(e) => {
            let _ = out.flush();
            Err(e)
        }
        Ok(()) => Ok(()),
    }
}

/// A reader of the output went away (`| head`): not an error of ours.
fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.downcast_ref::<io::Error>()
        .is_some_and(|io| io.kind() == io::ErrorKind::BrokenPipe)
}

fn dump(files: &[PathBuf], out: &mut impl Write) -> Result<()> {
    if files.is_empty() {
        bail!("no WAL files given");
    }
    let mut decoder: Option<(WalDecoder, u64)> = None;
    let mut chunk = vec![0u8; READ_CHUNK];
    for (i, path) in files.iter().enumerate() {
        let mut file =
            File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        let (decoder, segment_size) = match &mut decoder {
            Some(d) => d,
            None => {
                let (header, raw) = read_header(&mut file, path)?;
                let mut d = WalDecoder::new(header.page_address)?;
                d.feed(&raw);
                decoder.insert((d, header.segment_size as u64))
            }
        };
        let mut len = if i == 0 {
            LONG_PAGE_HEADER_LEN as u64
        } else {
            0
        };
        loop {
            let n = match file.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
            };
            len += n as u64;
            if len > *segment_size {
                bail!(
                    "{}: longer than a segment ({segment_size} bytes)",
                    path.display()
                );
            }
            decoder.feed(&chunk[..n]);
            if drain(decoder, out)? {
                return Ok(());
            }
        }
        if len != *segment_size && i + 1 < files.len() {
            bail!(
                "{}: {len} bytes, but segments are {segment_size} bytes; only the last file may be partial",
                path.display()
            );
        }
    }
    if let Some((decoder, _)) = &mut decoder {
        decoder.finish();
        drain(decoder, out)?;
    }
    Ok(())
}

/// The long page header that opens the first file: where the WAL starts, its geometry.
fn read_header(
    file: &mut File,
    path: &Path,
) -> Result<(LongPageHeader, [u8; LONG_PAGE_HEADER_LEN])> {
    let mut raw = [0u8; LONG_PAGE_HEADER_LEN];
    file.read_exact(&mut raw)
        .with_context(|| format!("cannot read the page header of {}", path.display()))?;
    let header = LongPageHeader::parse(&raw)
        .with_context(|| format!("{} is not a WAL segment", path.display()))?;
    Ok((header, raw))
}

/// Prints the records decodable so far. `Ok(true)` once the WAL has ended.
fn drain(decoder: &mut WalDecoder, out: &mut impl Write) -> Result<bool> {
    loop {
        match decoder.next_record()? {
            Next::Record(record) => print_blocks(&record, out)?,
            Next::NeedInput => return Ok(false),
            Next::End(end) => {
                tracing::info!("{end}");
                return Ok(true);
            }
        }
    }
}

fn print_blocks(record: &DecodedRecord, out: &mut impl Write) -> io::Result<()> {
    for block in &record.blocks {
        let image = if block.has_image() { "fpw" } else { "-" };
        writeln!(
            out,
            "{} {} {} {} {image}",
            WaldumpLsn(record.lsn),
            block.rel,
            block.fork,
            block.block
        )?;
    }
    Ok(())
}

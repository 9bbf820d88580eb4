//! Paged listings (pure code): how a page of the WAL listing is built from index
//! entries, how the client merges pages back into one listing, and the page bounds that
//! keep every answer far below [`super::MAX_FRAME_LEN`].
//!
//! A paged request names a cursor, `after`: the last WAL file name (or backup id) of
//! the previous page, `None` for the first page. The archive answers the entries that
//! sort after it, at most a page of them, and `next`: the cursor of the following page,
//! `None` on the last page. Entries are in name order, which for WAL is timeline order
//! and, within a timeline, LSN order (names are fixed-width upper-case hex).
//!
//! A WAL page summarizes its own entries only ([`wal_listing_page`]): per timeline, its
//! segments, bytes, first and last segment, the gaps *between its own segments*, and its
//! partials; and the history and backup history files among its entries. A gap that
//! spans a page boundary is found when pages are merged ([`WalListing::merge_page`]):
//! the merge knows the last segment of each timeline so far and the first of the next
//! page, whatever kind of file the cursor named (a page may end on a backup history
//! file, or hold no segment at all). Merging every page of a listing in order gives the
//! listing built in one page, whatever the page size (property-tested below).

use std::collections::BTreeMap;

use crate::core::pg::wal::{Lsn, SegmentName, TimelineId, WalFileName};

use super::{TimelineListing, WalListing};

/// Index entries (WAL files of any kind) per page of a WAL listing.
///
/// Worst case per entry, in the page's JSON: an entry that opens a timeline of its own
/// (a partial segment of a timeline nothing else of the page is on) costs one
/// [`TimelineListing`]: `{"timeline":4294967295,"segments":1,"first":null,"last":null,
/// "gaps":[],"partials":["<32 chars>"],"raw_bytes":<≤20 digits>,"stored_bytes":<≤20
/// digits>},` ≈ 200 bytes, below 256. Every other kind costs less: a segment after a
/// missing one (every other segment missing) adds one gap `["<24>","<24>"],` = 56 bytes, a
/// backup history file 43, a history file 19. So a page is at most 2048 × 256 bytes =
/// 512 KiB plus the cluster name and binding (< 200 bytes): half the frame limit
/// (tested below with the worst case).
pub const WAL_PAGE_FILES: usize = 2048;

/// Backups per page of a backup listing, at most.
///
/// A summary is ≈ 600 bytes of JSON plus its label (id ≤ 64, LSNs, times, sizes of ≤ 20
/// digits): 256 of them with labels of the 1024 bytes `PutBackup` accepts (escaped up
/// to 6 bytes each for control characters; and a catalog rebuilt from older manifests
/// may hold longer ones) would pass the limit, so a page also ends once it holds
/// [`BACKUP_PAGE_BYTES`] of JSON.
pub const BACKUP_PAGE_ENTRIES: usize = 256;

/// JSON bytes of backup summaries after which a backup page ends (the summary that
/// passes it is the page's last): half the frame limit, so one summary of up to another
/// half still fits.
pub const BACKUP_PAGE_BYTES: usize = 512 << 10;

/// Segment size gaps are computed with while no segment bound the cluster (PostgreSQL's
/// default).
pub const DEFAULT_SEGMENT_SIZE: u32 = 16 << 20;

/// One WAL file of the index as a listing counts it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WalFileEntry {
    /// Its name.
    pub name: WalFileName,
    /// Raw size.
    pub raw_bytes: u64,
    /// Stored size (header and zstd frame).
    pub stored_bytes: u64,
}

/// The listing of `files` (in name order): one page, or a whole listing when `files`
/// are all of the cluster's. `binding` is the cluster's (system identifier, segment
/// size); `next` the page's cursor.
pub fn wal_listing_page(
    cluster: &str,
    binding: Option<(u64, u32)>,
    files: impl IntoIterator<Item = WalFileEntry>,
    next: Option<String>,
) -> WalListing {
    let seg_size = binding.map(|b| b.1).unwrap_or(DEFAULT_SEGMENT_SIZE);
    let mut listing = WalListing {
        cluster: cluster.to_string(),
        system_identifier: binding.map(|b| b.0),
        segment_size: binding.map(|b| b.1),
        next,
        ..Default::default()
    };
    let mut per_tli: BTreeMap<TimelineId, (Vec<SegmentName>, TimelineListing)> = BTreeMap::new();
    for f in files {
        let tli = f.name.timeline();
        let slot = per_tli
            .entry(tli)
            .or_insert_with(|| (Vec::new(), empty_timeline(tli)));
        match f.name {
            WalFileName::Segment(s) => slot.0.push(s),
            WalFileName::Partial(_) => slot.1.partials.push(f.name.to_string()),
            WalFileName::History(_) => {
                listing.history_files.push(f.name.to_string());
                continue;
            }
            WalFileName::BackupHistory(..) => {
                listing.backup_history_files.push(f.name.to_string());
                continue;
            }
        }
        slot.1.raw_bytes += f.raw_bytes;
        slot.1.stored_bytes += f.stored_bytes;
    }
    for (_, (mut segs, mut tl)) in per_tli {
        segs.sort();
        tl.segments = segs.len() as u64;
        tl.first = segs.first().map(|s| s.to_string());
        tl.last = segs.last().map(|s| s.to_string());
        for pair in segs.windows(2) {
            if let Some(gap) = gap_between(&pair[0], &pair[1], seg_size) {
                tl.gaps.push(gap);
            }
        }
        if tl.segments > 0 || !tl.partials.is_empty() {
            listing.timelines.push(tl);
        }
    }
    listing
}

fn empty_timeline(timeline: TimelineId) -> TimelineListing {
    TimelineListing {
        timeline,
        segments: 0,
        first: None,
        last: None,
        gaps: Vec::new(),
        partials: Vec::new(),
        raw_bytes: 0,
        stored_bytes: 0,
    }
}

/// The missing segments strictly between `a` and `b` (same timeline, `a` before `b`), as
/// (first missing, last missing).
fn gap_between(a: &SegmentName, b: &SegmentName, seg_size: u32) -> Option<(String, String)> {
    let (na, nb) = (a.segno(seg_size), b.segno(seg_size));
    if nb <= na + 1 {
        return None;
    }
    let last_missing =
        SegmentName::containing(a.timeline, Lsn((nb - 1) * seg_size as u64), seg_size);
    Some((a.next(seg_size).to_string(), last_missing.to_string()))
}

fn segment_of(name: Option<&String>) -> Option<SegmentName> {
    match name?.parse::<WalFileName>().ok()? {
        WalFileName::Segment(s) => Some(s),
        _ => None,
    }
}

impl WalListing {
    /// Appends the next page of this listing: per timeline, segments and bytes summed,
    /// `first` kept from the first page that has one and `last` taken from the latest,
    /// gaps and partials concatenated, with the gap between the last segment so far and
    /// the page's first inserted between them; history and backup history files
    /// concatenated. The binding is the first page's, or a later one's when the cluster
    /// was bound meanwhile. `next` becomes the page's.
    pub fn merge_page(&mut self, page: WalListing) {
        if self.cluster.is_empty() {
            self.cluster = page.cluster;
        }
        self.system_identifier = self.system_identifier.or(page.system_identifier);
        self.segment_size = self.segment_size.or(page.segment_size);
        let seg_size = self.segment_size.unwrap_or(DEFAULT_SEGMENT_SIZE);
        for tl in page.timelines {
            let at = self.timelines.partition_point(|t| t.timeline < tl.timeline);
            match self.timelines.get_mut(at) {
                Some(have) if have.timeline == tl.timeline => {
                    let boundary = match (
                        segment_of(have.last.as_ref()),
                        segment_of(tl.first.as_ref()),
                    ) {
                        (Some(a), Some(b)) => gap_between(&a, &b, seg_size),
                        _ => None,
                    };
                    have.gaps.extend(boundary);
                    have.gaps.extend(tl.gaps);
                    have.partials.extend(tl.partials);
                    have.segments += tl.segments;
                    have.raw_bytes += tl.raw_bytes;
                    have.stored_bytes += tl.stored_bytes;
                    if have.first.is_none() {
                        have.first = tl.first;
                    }
                    if tl.last.is_some() {
                        have.last = tl.last;
                    }
                }
                _ => self.timelines.insert(at, tl),
            }
        }
        self.history_files.extend(page.history_files);
        self.backup_history_files.extend(page.backup_history_files);
        self.streamed.extend(page.streamed);
        self.next = page.next;
    }
}

/// The pages of one listing, in order, merged into one ([`WalListing::merge_page`]).
pub fn merge_wal_pages(pages: impl IntoIterator<Item = WalListing>) -> WalListing {
    let mut merged = WalListing::default();
    for page in pages {
        merged.merge_page(page);
    }
    merged.next = None;
    merged
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::wire::{encode_frame, Response, MAX_FRAME_LEN};
    use proptest::prelude::*;

    fn seg(tli: u32, segno: u64, seg_size: u32) -> SegmentName {
        SegmentName::containing(TimelineId(tli), Lsn(segno * seg_size as u64), seg_size)
    }

    fn entry(name: WalFileName) -> WalFileEntry {
        let raw_bytes = match name {
            WalFileName::Segment(_) | WalFileName::Partial(_) => 1 << 20,
            _ => 300,
        };
        WalFileEntry {
            name,
            raw_bytes,
            stored_bytes: raw_bytes / 3 + 64,
        }
    }

    /// The pages an archive answers for `files` (sorted by name), `per_page` at a time:
    /// one page at least, an empty one for an empty archive.
    fn paged(files: &[WalFileEntry], per_page: usize, binding: (u64, u32)) -> Vec<WalListing> {
        let mut chunks: Vec<&[WalFileEntry]> = files.chunks(per_page.max(1)).collect();
        if chunks.is_empty() {
            chunks.push(&[]);
        }
        let n = chunks.len();
        chunks
            .into_iter()
            .enumerate()
            .map(|(i, c)| {
                let next = (i + 1 < n).then(|| c.last().unwrap().name.to_string());
                wal_listing_page("main", Some(binding), c.iter().cloned(), next)
            })
            .collect()
    }

    #[test]
    fn a_gap_across_a_page_boundary_is_found_whatever_the_page_ends_on() {
        let s = 1 << 20;
        let files: Vec<WalFileEntry> = [
            WalFileName::Segment(seg(1, 1, s)),
            WalFileName::BackupHistory(seg(1, 1, s), 0x28),
            // the page boundary falls here: 2..=4 missing
            WalFileName::BackupHistory(seg(1, 3, s), 0x28),
            WalFileName::Segment(seg(1, 5, s)),
        ]
        .into_iter()
        .map(entry)
        .collect();
        let merged = merge_wal_pages(paged(&files, 2, (7, s)));
        assert_eq!(
            merged.timelines[0].gaps,
            [(seg(1, 2, s).to_string(), seg(1, 4, s).to_string())]
        );
        assert_eq!(merged, wal_listing_page("main", Some((7, s)), files, None));
    }

    /// The bound of [`WAL_PAGE_FILES`]: a page of its worst entries stays under half the
    /// frame limit.
    #[test]
    fn a_worst_case_wal_page_is_under_half_the_frame_limit() {
        let s = 16 << 20;
        // Each entry a partial of a timeline of its own, of the largest numbers.
        let own_timelines = (0..WAL_PAGE_FILES as u32).map(|i| WalFileEntry {
            name: WalFileName::Partial(SegmentName {
                timeline: TimelineId(u32::MAX - i),
                log: u32::MAX,
                seg: 0xFF,
            }),
            raw_bytes: u64::MAX / 4096,
            stored_bytes: u64::MAX / 4096,
        });
        // Every other segment missing: one gap per entry.
        let gaps = (0..WAL_PAGE_FILES as u64)
            .map(|i| entry(WalFileName::Segment(seg(u32::MAX, 2 * i, s))));
        let cluster = "c".repeat(63);
        for files in [own_timelines.collect::<Vec<_>>(), gaps.collect()] {
            let next = Some(files.last().unwrap().name.to_string());
            let page = wal_listing_page(&cluster, Some((u64::MAX, s)), files, next);
            let frame = encode_frame(&Response::WalList(page)).unwrap();
            assert!(
                frame.len() < MAX_FRAME_LEN as usize / 2,
                "a worst-case page takes {} bytes",
                frame.len()
            );
        }
    }

    /// A WAL file name of a small random archive: a few timelines, segment numbers
    /// crossing a 4 GiB "log" boundary, every kind of file.
    fn any_name(seg_size: u32) -> impl Strategy<Value = WalFileName> {
        let per_log = crate::core::pg::wal::segments_per_log(seg_size);
        let segno = (per_log - 40)..(per_log + 40);
        (1u32..4, segno, 0u8..10, any::<u32>()).prop_map(move |(tli, n, kind, off)| {
            let s = seg(tli, n, seg_size);
            match kind {
                0 => WalFileName::Partial(s),
                1 | 2 => WalFileName::BackupHistory(s, off),
                3 => WalFileName::History(TimelineId(tli)),
                _ => WalFileName::Segment(s),
            }
        })
    }

    proptest! {
        /// Merging the pages of a listing, of any size, gives the listing built in one
        /// page: counts, bytes, first and last, gaps (those spanning a boundary too),
        /// partials and history files.
        #[test]
        fn pages_of_any_size_merge_into_the_listing_of_one_page(
            big in any::<bool>(),
            names in proptest::collection::btree_set(any_name(16 << 20), 0..120),
            names_1mib in proptest::collection::btree_set(any_name(1 << 20), 0..120),
            per_page in 1usize..40,
        ) {
            let (names, s) = if big { (names, 16 << 20) } else { (names_1mib, 1 << 20) };
            // Name order, as the index holds them.
            let mut files: Vec<WalFileEntry> = names.into_iter().map(entry).collect();
            files.sort_by_key(|f| f.name.to_string());
            let whole = wal_listing_page("main", Some((7, s)), files.clone(), None);
            let pages = paged(&files, per_page, (7, s));
            prop_assert_eq!(merge_wal_pages(pages), whole);
        }
    }
}

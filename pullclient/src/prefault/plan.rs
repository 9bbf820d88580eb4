//! Which blocks to warm, and which to leave alone: a model of what replay will read.
//! Pure: no files, no clocks; the caller answers "is this file there, how long is it".
//!
//! A block reference is warmed unless:
//! - the record carries a full-page image of it (replay overwrites the page unread),
//! - it is WILL_INIT (replay initializes the page unread),
//! - it lies past the end of its file (replay extends the file),
//! - it was warmed recently, or an earlier record of the window carried its image,
//!   initialized it or extended its file (a bounded memory of recent blocks: replay has
//!   such a block in memory when it gets to the later record).
//!
//! One exception: when PostgreSQL's own `recovery_prefetch` is on, its prefetcher looks
//! `4 x maintenance_io_concurrency` block references ahead of replay and calls
//! `posix_fadvise` for every block not yet in shared buffers, including blocks whose image
//! is in a record it has decoded but replay has not applied yet. Those blocks (a later
//! reference within that distance of the image or initialization, main fork only) are
//! warmed too, so PostgreSQL's call finds them in the page cache.
//!
//! The window: the block references of decoded segments, by segment, and how far (by
//! LSN) they have been handed out; a batch is at most [`BLOCKS_PER_STEP`] references,
//! nearest to replay first, never splitting one record's references.

use std::collections::{BTreeMap, HashMap, VecDeque};

use walvault_protocol::core::pg::relpath::{BlockLocation, RelationLayout};
use walvault_protocol::core::pg::wal::{LongPageHeader, Lsn, SegmentName};
use walvault_protocol::core::pg::waldecode::{self, ForkNumber, RelFileLocator};

use super::PrefaultCounters;

/// Blocks remembered as recently warmed.
const RECENT_BLOCKS: usize = 1 << 16;
/// Blocks handled per batch (a step runs batches up to the horizon).
pub(super) const BLOCKS_PER_STEP: usize = 8192;
/// PostgreSQL's `XLOGPREFETCHER_DISTANCE_MULTIPLIER`: its prefetcher looks this many times
/// `maintenance_io_concurrency` block references ahead of replay.
const PG_DISTANCE_MULTIPLIER: u64 = 4;
/// `maintenance_io_concurrency`'s default.
const PG_DEFAULT_IO_CONCURRENCY: u64 = 10;

/// One block a record references, reduced to what prefaulting needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct WarmTarget {
    /// LSN of the referencing record.
    pub(crate) lsn: Lsn,
    /// Tablespace OID.
    pub(crate) spc: u32,
    /// Database OID.
    pub(crate) db: u32,
    /// relfilenode.
    pub(crate) rel: u32,
    /// Fork.
    pub(crate) fork: ForkNumber,
    /// Block number.
    pub(crate) block: u32,
    /// The record restores a full-page image of the block.
    pub(crate) fpw: bool,
    /// The record initializes the block.
    pub(crate) will_init: bool,
}

/// The block references of one segment's records (records continued from the previous
/// segment are skipped; their blocks were handled with that segment when it was spooled).
pub(crate) fn warm_targets(bytes: &[u8]) -> Result<Vec<WarmTarget>, String> {
    // Records are turned into targets one at a time and dropped: memory stays at the
    // segment plus its targets, never a segment's worth of decoded records.
    let start = LongPageHeader::parse(bytes)
        .map_err(|e| e.to_string())?
        .page_address;
    let mut decoder = waldecode::WalDecoder::new(start).map_err(|e| e.to_string())?;
    decoder.feed(bytes);
    decoder.finish();
    let mut targets = Vec::new();
    loop {
        match decoder.next_record() {
            Ok(waldecode::Next::Record(r)) => targets.extend(r.blocks.iter().map(|b| WarmTarget {
                lsn: r.lsn,
                spc: b.rel.spc,
                db: b.rel.db,
                rel: b.rel.rel,
                fork: b.fork,
                block: b.block,
                fpw: b.image.is_some_and(|i| i.apply),
                will_init: b.will_init,
            })),
            Ok(_) => return Ok(targets),
            // Corruption mid-segment: what came before it is still worth warming.
            Err(e) if !targets.is_empty() => {
                tracing::warn!(error = %e, "decoding stopped early; warming what was decoded");
                return Ok(targets);
            }
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// The decoded segments and how far their references have been handed out.
pub(super) struct Window {
    decoded: BTreeMap<SegmentName, Vec<WarmTarget>>,
    /// The LSN up to which references have been handed out.
    done_up_to: Lsn,
}

impl Default for Window {
    fn default() -> Window {
        Window {
            decoded: BTreeMap::new(),
            done_up_to: Lsn(0),
        }
    }
}

impl Window {
    /// Whether `seg` was decoded (successfully or not).
    pub(super) fn contains(&self, seg: &SegmentName) -> bool {
        self.decoded.contains_key(seg)
    }

    /// Records what `seg` references (nothing, when it failed to decode).
    pub(super) fn insert(&mut self, seg: SegmentName, targets: Vec<WarmTarget>) {
        self.decoded.insert(seg, targets);
    }

    /// Forgets the segments before `requested` (replay has left them).
    pub(super) fn forget_before(&mut self, requested: SegmentName) {
        self.decoded.retain(|s, _| *s >= requested);
    }

    /// Drops what was decoded of a segment that left the spool, unless the window is
    /// small (the segment replay is in may still have blocks ahead).
    pub(super) fn forget(&mut self, seg: &SegmentName) {
        if self.decoded.len() > 64 {
            self.decoded.remove(seg);
        }
    }

    /// References with `replay < lsn <= horizon` not handed out yet, at most
    /// [`BLOCKS_PER_STEP`] (more only to finish a record); the LSN reached, if any.
    pub(super) fn pick(&mut self, replay: Lsn, horizon: Lsn) -> (Vec<WarmTarget>, Option<Lsn>) {
        let from = self.done_up_to.max(replay);
        let mut out = Vec::new();
        let mut reached = from;
        'segments: for targets in self.decoded.values() {
            for t in targets {
                if t.lsn <= from || t.lsn > horizon {
                    continue;
                }
                if out.len() >= BLOCKS_PER_STEP && t.lsn > reached {
                    break 'segments;
                }
                reached = reached.max(t.lsn);
                out.push(*t);
            }
        }
        if out.is_empty() {
            return (out, None);
        }
        self.done_up_to = reached;
        (out, Some(reached))
    }
}

type BlockKey = (u32, u32, u32, ForkNumber, u32);

/// Why a block is remembered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mark {
    /// Warmed by the prefaulter, or past the end of its file (replay extends the file
    /// with it): later references need no read.
    Handled,
    /// Imaged or initialized by the record of this block-reference ordinal: replay writes
    /// it without reading it.
    Written(u64),
}

/// What the daemon knows of PostgreSQL's own recovery prefetch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct PgPrefetch {
    /// It runs (`recovery_prefetch` not off, `maintenance_io_concurrency` > 0).
    pub(super) on: bool,
    /// How many block references it looks ahead of replay.
    lookahead_refs: u64,
}

impl PgPrefetch {
    /// From the two settings (None: PostgreSQL's default).
    pub(super) fn from_settings(
        recovery_prefetch: Option<&str>,
        io_concurrency: Option<&str>,
    ) -> PgPrefetch {
        let off = recovery_prefetch.is_some_and(|v| {
            matches!(
                v.trim().to_ascii_lowercase().as_str(),
                "off" | "false" | "no" | "0" | "of" | "f" | "n"
            )
        });
        let mic = io_concurrency
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(PG_DEFAULT_IO_CONCURRENCY);
        PgPrefetch {
            on: !off && mic > 0,
            lookahead_refs: mic * PG_DISTANCE_MULTIPLIER,
        }
    }
}

/// What the caller found for a block that needs a read.
pub(super) enum Lookup<F> {
    /// Its file is open, `len` bytes long.
    Open {
        /// The caller's handle of the file.
        file: F,
        /// Length of the file.
        len: u64,
    },
    /// The file does not exist (yet).
    Missing,
    /// Stop: the batch is abandoned (PostgreSQL stopped).
    Stop,
}

/// A block to bring into the page cache.
pub(super) struct Read<F> {
    /// The caller's handle of the file.
    pub(super) file: F,
    /// Byte offset in the file.
    pub(super) offset: u64,
    /// Bytes.
    pub(super) len: u64,
}

/// The reads a batch of references needs.
pub(super) struct Batch<F> {
    /// One per block, in reference order.
    pub(super) reads: Vec<Read<F>>,
    /// Of those, blocks read only because PostgreSQL's own prefetch would read them.
    pub(super) for_pg_prefetch: u64,
}

/// The memory of recent blocks and the model of PostgreSQL's prefetch distance.
pub(super) struct Planner {
    recent: HashMap<BlockKey, Mark>,
    recent_order: VecDeque<BlockKey>,
    /// Ordinal of the last block reference handled.
    ref_seq: u64,
    pub(super) pg_prefetch: PgPrefetch,
}

impl Planner {
    pub(super) fn new() -> Planner {
        Planner {
            recent: HashMap::new(),
            recent_order: VecDeque::new(),
            ref_seq: 0,
            // Read from the settings when PostgreSQL is first seen running (nothing is
            // warmed before that).
            pg_prefetch: PgPrefetch::from_settings(Some("off"), None),
        }
    }

    /// Forgets every block remembered (their files were replaced).
    pub(super) fn forget_blocks(&mut self) {
        self.recent.clear();
        self.recent_order.clear();
    }

    fn remember(&mut self, key: BlockKey, mark: Mark) {
        if self.recent.insert(key, mark).is_none() {
            self.recent_order.push_back(key);
            if self.recent_order.len() > RECENT_BLOCKS {
                if let Some(old) = self.recent_order.pop_front() {
                    self.recent.remove(&old);
                }
            }
        }
    }

    /// The reads `targets` need, in order; skips are counted in `counters`. `lookup` is
    /// asked about a block's file only when the block may need a read; `None` when it
    /// said stop.
    pub(super) fn plan<F>(
        &mut self,
        layout: &RelationLayout,
        targets: &[WarmTarget],
        counters: &mut PrefaultCounters,
        mut lookup: impl FnMut(&BlockLocation) -> Lookup<F>,
    ) -> Option<Batch<F>> {
        let bs = u64::from(layout.block_size);
        let mut batch = Batch {
            reads: Vec::new(),
            for_pg_prefetch: 0,
        };
        for t in targets {
            self.ref_seq += 1;
            let seq = self.ref_seq;
            let key = (t.spc, t.db, t.rel, t.fork, t.block);
            // A block replay overwrites or initializes unread is in memory for the
            // records after it: remembered, so their references are not read either.
            if t.fpw || t.will_init {
                if t.fpw {
                    counters.skipped_fpw += 1;
                } else {
                    counters.skipped_will_init += 1;
                }
                self.remember(key, Mark::Written(seq));
                continue;
            }
            let mut for_pg = false;
            match self.recent.get(&key).copied() {
                // ... unless PostgreSQL's prefetcher will see this reference before replay
                // applies the earlier record, and read the block itself.
                Some(Mark::Written(at))
                    if self.pg_prefetch.on
                        && t.fork == ForkNumber::Main
                        && seq - at <= self.pg_prefetch.lookahead_refs =>
                {
                    for_pg = true;
                }
                Some(_) => {
                    counters.skipped_recent += 1;
                    continue;
                }
                None => {}
            }
            let location = layout.locate(
                RelFileLocator {
                    spc: t.spc,
                    db: t.db,
                    rel: t.rel,
                },
                t.fork,
                t.block,
            );
            let (file, len) = match lookup(&location) {
                Lookup::Open { file, len } => (file, len),
                Lookup::Missing => {
                    counters.skipped_no_file += 1;
                    continue;
                }
                Lookup::Stop => return None,
            };
            // Replay extends the file with this block: later records find it in memory.
            if len < location.offset + bs {
                counters.skipped_past_eof += 1;
                self.remember(key, Mark::Handled);
                continue;
            }
            self.remember(key, Mark::Handled);
            batch.for_pg_prefetch += u64::from(for_pg);
            batch.reads.push(Read {
                file,
                offset: location.offset,
                len: bs,
            });
        }
        Some(batch)
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use walvault_protocol::core::pg::wal::TimelineId;

    use super::*;

    fn layout() -> RelationLayout {
        RelationLayout {
            block_size: 8192,
            relseg_blocks: 131072,
            major: 15,
            catalog_version: 202209061,
        }
    }

    fn target(lsn: u64, block: u32, fpw: bool) -> WarmTarget {
        WarmTarget {
            lsn: Lsn(lsn),
            spc: 1663,
            db: 5,
            rel: 16384,
            fork: ForkNumber::Main,
            block,
            fpw,
            will_init: false,
        }
    }

    /// A planner with PostgreSQL's recovery_prefetch as given (maintenance_io_concurrency
    /// 1: 4 references ahead).
    fn planner(pg_prefetch: &str) -> Planner {
        let mut p = Planner::new();
        p.pg_prefetch = PgPrefetch::from_settings(Some(pg_prefetch), Some("1"));
        p
    }

    /// Plans `targets` against one relation file `base/5/16384` of `blocks` blocks: the
    /// blocks read, and the counters.
    fn plan(
        p: &mut Planner,
        blocks: u64,
        targets: &[WarmTarget],
    ) -> (Vec<u64>, u64, PrefaultCounters) {
        let mut c = PrefaultCounters::default();
        let batch = p
            .plan(&layout(), targets, &mut c, |loc| {
                if loc.path == Path::new("base/5/16384") {
                    Lookup::Open {
                        file: (),
                        len: blocks * 8192,
                    }
                } else {
                    Lookup::Missing
                }
            })
            .unwrap();
        let read = batch.reads.iter().map(|r| r.offset / 8192).collect();
        (read, batch.for_pg_prefetch, c)
    }

    /// Only block 2 is read: block 0's first reference carries its image and block 1's
    /// initializes it (so their later references find them in memory), block 9 lies past
    /// the end of the file (replay extends it) and is remembered the same way.
    #[test]
    fn blocks_replay_writes_unread_are_not_read_later() {
        let t = |lsn, block, fpw, will_init| WarmTarget {
            will_init,
            ..target(lsn, block, fpw)
        };
        let targets = [
            t(1, 0, true, false),
            t(2, 0, false, false),
            t(3, 1, false, true),
            t(4, 1, false, false),
            t(5, 2, false, false),
            t(6, 9, false, false),
            t(7, 9, false, false),
            t(8, 2, false, false),
        ];
        let (read, _, c) = plan(&mut planner("off"), 3, &targets);
        assert_eq!(read, [2], "{c:?}");
        assert_eq!(c.skipped_fpw, 1, "{c:?}");
        assert_eq!(c.skipped_will_init, 1, "{c:?}");
        assert_eq!(c.skipped_past_eof, 1, "{c:?}");
        assert_eq!(c.skipped_recent, 4, "{c:?}");
    }

    /// With PostgreSQL's prefetch on (maintenance_io_concurrency 1: 4 references ahead),
    /// a later reference to an imaged block is read when it lies within that distance of
    /// the image (PostgreSQL would read the block itself), not when it lies further.
    #[test]
    fn blocks_postgres_prefetch_would_read_are_warmed_first() {
        let targets = [
            target(1, 0, true),
            target(2, 1, true),
            target(3, 0, false), // 2 references after block 0's image: PostgreSQL reads it
            target(4, 7, false),
            target(5, 8, false),
            target(6, 9, false),
            target(7, 1, false), // 5 after block 1's image: in shared buffers by then
            target(8, 0, false), // warmed already
        ];
        let (read, for_pg, c) = plan(&mut planner("try"), 64, &targets);
        assert_eq!(read, [0, 7, 8, 9], "{c:?}");
        assert_eq!(for_pg, 1);
        assert_eq!(c.skipped_recent, 2, "{c:?}");
        // The same WAL with PostgreSQL's prefetch off: only never-touched blocks.
        let (read, for_pg, c) = plan(&mut planner("off"), 64, &targets);
        assert_eq!(read, [7, 8, 9], "{c:?}");
        assert_eq!(for_pg, 0);
        assert_eq!(c.skipped_recent, 3, "{c:?}");
    }

    /// A block whose file is missing is counted and asked about again next time; a stop
    /// abandons the batch.
    #[test]
    fn missing_files_and_stop() {
        let mut p = planner("off");
        let mut c = PrefaultCounters::default();
        let other = WarmTarget {
            rel: 99,
            ..target(1, 0, false)
        };
        let batch = p
            .plan(&layout(), &[other, other], &mut c, |_| {
                Lookup::<()>::Missing
            })
            .unwrap();
        assert!(batch.reads.is_empty());
        assert_eq!(c.skipped_no_file, 2);
        assert!(p
            .plan(&layout(), &[target(2, 0, false)], &mut c, |_| {
                Lookup::<()>::Stop
            })
            .is_none());
    }

    #[test]
    fn postgres_prefetch_settings() {
        let p = |rp: Option<&str>, mic: Option<&str>| PgPrefetch::from_settings(rp, mic);
        assert!(p(None, None).on);
        assert_eq!(p(None, None).lookahead_refs, 40);
        assert!(p(Some("try"), Some("20")).on);
        assert_eq!(p(Some("on"), Some("20")).lookahead_refs, 80);
        assert!(!p(Some("off"), None).on);
        assert!(!p(Some("OFF"), None).on);
        assert!(!p(Some("false"), None).on);
        assert!(!p(Some("try"), Some("0")).on);
    }

    /// The window hands out references past replay, nearest first, in batches that never
    /// split a record, and never the same reference twice.
    #[test]
    fn window_hands_out_each_reference_once_in_order() {
        let seg = |n| SegmentName {
            timeline: TimelineId(1),
            log: 0,
            seg: n,
        };
        let mut w = Window::default();
        let many: Vec<WarmTarget> = (1..=BLOCKS_PER_STEP as u64 + 10)
            .map(|i| target(100 + i.div_ceil(2), i as u32, false))
            .collect();
        w.insert(seg(2), many.clone());
        w.insert(seg(1), vec![target(10, 0, false), target(20, 1, false)]);
        let (first, reached) = w.pick(Lsn(10), Lsn(u64::MAX));
        // LSN 10 is replay's: not ahead. The rest in LSN order, whole records only.
        assert_eq!(first[0], target(20, 1, false));
        assert_eq!(first.len(), BLOCKS_PER_STEP + 1);
        assert_eq!(reached, Some(first.last().unwrap().lsn));
        let (second, _) = w.pick(Lsn(10), Lsn(u64::MAX));
        assert_eq!(first.len() + second.len(), many.len() + 1);
        assert!(second.iter().all(|t| t.lsn > first.last().unwrap().lsn));
        assert_eq!(w.pick(Lsn(10), Lsn(u64::MAX)), (Vec::new(), None));
        // A horizon bounds the window.
        let mut w = Window::default();
        w.insert(seg(1), vec![target(10, 0, false), target(20, 1, false)]);
        assert_eq!(w.pick(Lsn(0), Lsn(15)).0, [target(10, 0, false)]);
        w.forget_before(seg(2));
        assert!(!w.contains(&seg(1)));
    }
}

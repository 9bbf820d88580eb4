//! Where the receiver starts streaming: pure code over what the archive holds and the
//! server's timeline history.
//!
//! Contract ([`archive_position`], [`start_at`]):
//!
//! - The archive's position is the end of the newest WAL it holds **on the server's
//!   history**: for each timeline of the path (the server's current timeline and its
//!   ancestors, each ending at its switchpoint), the newest complete segment that starts
//!   before the timeline ends counts up to its end or the switchpoint, whichever is first;
//!   a streamed (unfinished) segment counts from its start, since the receiver streams it
//!   again from its first byte (START_REPLICATION starts at a segment boundary, and the
//!   archive accepts bytes it already holds when they are identical). WAL the archive
//!   holds past a switchpoint (the old primary of a failover, or the history before a
//!   PITR of the server) is not on the path and is ignored: the receiver re-bases to the
//!   fork by itself.
//! - The start is that position rounded down to a segment boundary, on the timeline of
//!   the path that holds the position (the next timeline when the position is exactly a
//!   switchpoint): the walsender reads the segment holding a switchpoint from the new
//!   timeline's file, which begins with the old timeline's bytes.
//! - When the archive holds nothing on the path, the caller starts at the slot's restart
//!   LSN instead ([`start_at`] with the slot's position); never at the server's current
//!   position, which would leave a gap.

use walvault_protocol::core::pg::wal::{Lsn, TimelineId};

/// One timeline of the server's history, oldest first; `end` is its switchpoint (`None`
/// for the server's current timeline, which has not ended).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct PathStep {
    pub(crate) timeline: TimelineId,
    pub(crate) end: Option<Lsn>,
}

/// What the archive holds of one timeline, as segment numbers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct HeldTimeline {
    pub(crate) timeline: TimelineId,
    /// Complete segments, as inclusive ranges of segment numbers (any order).
    pub(crate) complete: Vec<(u64, u64)>,
    /// Segments the receiver streamed and has not completed.
    pub(crate) streamed: Vec<u64>,
}

/// A place to start streaming: a segment boundary on a timeline of the path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Start {
    pub(crate) lsn: Lsn,
    pub(crate) timeline: TimelineId,
}

/// Where to resume after what the archive holds on the path (module header), or `None`
/// when it holds nothing on it. Of two candidates at the same position the later
/// timeline wins (its copy of a switch segment holds the old timeline's bytes too).
pub(crate) fn archive_start(
    path: &[PathStep],
    held: &[HeldTimeline],
    segment_size: u32,
) -> Option<Start> {
    let size = u64::from(segment_size);
    let mut best: Option<(u64, TimelineId)> = None;
    let mut consider = |lsn: u64, timeline: TimelineId| {
        if best.is_none_or(|b| (lsn, timeline) > b) {
            best = Some((lsn, timeline));
        }
    };
    for step in path {
        let end = step.end.map_or(u64::MAX, |l| l.0);
        for h in held.iter().filter(|h| h.timeline == step.timeline) {
            // The newest complete segment that starts before the timeline ends counts up
            // to its end or the switchpoint; the position's timeline is the path's.
            let limit = end.div_ceil(size);
            let newest_complete = h
                .complete
                .iter()
                .filter_map(|&(first, last)| {
                    let (first, last) = (first.min(last), first.max(last));
                    (first < limit).then(|| last.min(limit - 1))
                })
                .max();
            if let Some(s) = newest_complete {
                let lsn = s.saturating_add(1).saturating_mul(size).min(end);
                if let Some(t) = timeline_holding(path, Lsn(lsn)) {
                    consider(lsn, t);
                }
            }
            // A streamed segment is streamed again from its start, on its own timeline.
            if let Some(start) = h
                .streamed
                .iter()
                .map(|&s| s.saturating_mul(size))
                .filter(|&start| start < end)
                .max()
            {
                consider(start, step.timeline);
            }
        }
    }
    best.map(|(lsn, timeline)| Start {
        lsn: Lsn(lsn / size * size),
        timeline,
    })
}

/// The timeline of the path that holds `lsn`: the first whose end lies after it (a
/// switchpoint belongs to the next timeline), else the last.
pub(crate) fn timeline_holding(path: &[PathStep], lsn: Lsn) -> Option<TimelineId> {
    path.iter()
        .find(|s| s.end.is_none_or(|end| lsn < end))
        .or(path.last())
        .map(|s| s.timeline)
}

/// Where to start for a position (the archive's, or the slot's): rounded down to its
/// segment, on the timeline of the path holding it.
pub(crate) fn start_at(path: &[PathStep], position: Lsn, segment_size: u32) -> Option<Start> {
    let timeline = timeline_holding(path, position)?;
    let size = u64::from(segment_size);
    Some(Start {
        lsn: Lsn(position.0 / size * size),
        timeline,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use walvault_protocol::core::pg::wal::SegmentName;

    const SEG: u32 = 16 << 20;

    fn tli(t: u32) -> TimelineId {
        TimelineId(t)
    }

    fn seg(n: u64) -> u64 {
        n * u64::from(SEG)
    }

    fn path(steps: &[(u32, Option<u64>)]) -> Vec<PathStep> {
        steps
            .iter()
            .map(|&(t, end)| PathStep {
                timeline: tli(t),
                end: end.map(Lsn),
            })
            .collect()
    }

    fn held(t: u32, complete: &[(u64, u64)], streamed: &[u64]) -> HeldTimeline {
        HeldTimeline {
            timeline: tli(t),
            complete: complete.to_vec(),
            streamed: streamed.to_vec(),
        }
    }

    #[test]
    fn resumes_after_the_newest_complete_segment_or_at_a_streamed_one() {
        let p = path(&[(1, None)]);
        assert_eq!(archive_start(&p, &[], SEG), None);
        let h = [held(1, &[(1, 4), (6, 9)], &[])];
        assert_eq!(archive_start(&p, &h, SEG).unwrap().lsn, Lsn(seg(10)));
        // The receiver's unfinished segment 10 is streamed again from its start.
        let h = [held(1, &[(1, 9)], &[10])];
        let start = archive_start(&p, &h, SEG).unwrap();
        assert_eq!(start.lsn, Lsn(seg(10)));
        assert_eq!(start.timeline, tli(1));
        assert_eq!(
            SegmentName::containing(start.timeline, start.lsn, SEG).to_string(),
            "00000001000000000000000A"
        );
    }

    #[test]
    fn after_a_promotion_resumes_on_the_new_timeline_at_the_switch_segment() {
        // Timeline 1 ended in segment 5; the archive holds 1..4 complete on timeline 1
        // and the old timeline's streamed segment 5.
        let switch = seg(5) + 0x1234;
        let p = path(&[(1, Some(switch)), (2, None)]);
        let h = [held(1, &[(1, 4)], &[5])];
        let start = archive_start(&p, &h, SEG).unwrap();
        // Segment 5 of timeline 1 again (the walsender sends timeline 1 up to the switch,
        // then says where timeline 2 starts).
        assert_eq!((start.lsn, start.timeline), (Lsn(seg(5)), tli(1)));
        // With segment 5 of timeline 2 streamed, resume there on timeline 2.
        let h = [held(1, &[(1, 4)], &[5]), held(2, &[], &[5])];
        let start = archive_start(&p, &h, SEG).unwrap();
        assert_eq!((start.lsn, start.timeline), (Lsn(seg(5)), tli(2)));
    }

    #[test]
    fn wal_past_a_switchpoint_is_not_on_the_path_and_the_start_is_the_fork() {
        // The server was restored to a point in segment 5 of timeline 1 and promoted to
        // timeline 2; the archive holds timeline 1 up to 20 from before.
        let switch = seg(5) + 0x800;
        let p = path(&[(1, Some(switch)), (2, None)]);
        let h = [held(1, &[(1, 20)], &[21])];
        let start = archive_start(&p, &h, SEG).unwrap();
        // The switch segment, from its start, on the new timeline.
        assert_eq!((start.lsn, start.timeline), (Lsn(seg(5)), tli(2)));
    }

    #[test]
    fn a_switchpoint_on_a_segment_boundary_belongs_to_the_next_timeline() {
        let p = path(&[(1, Some(seg(8))), (2, Some(seg(12) + 40)), (3, None)]);
        assert_eq!(timeline_holding(&p, Lsn(seg(8) - 1)), Some(tli(1)));
        assert_eq!(timeline_holding(&p, Lsn(seg(8))), Some(tli(2)));
        assert_eq!(timeline_holding(&p, Lsn(seg(12) + 40)), Some(tli(3)));
        // Timeline 1's segment 8 starts at the switch: not on timeline 1's part of the path.
        let h = [held(1, &[(1, 8)], &[])];
        let start = archive_start(&p, &h, SEG).unwrap();
        assert_eq!((start.lsn, start.timeline), (Lsn(seg(8)), tli(2)));
    }

    #[test]
    fn timelines_off_the_path_are_ignored() {
        let p = path(&[(1, Some(seg(3) + 8)), (3, None)]);
        let h = [held(2, &[(3, 50)], &[51]), held(3, &[(3, 6)], &[])];
        assert_eq!(archive_start(&p, &h, SEG).unwrap().lsn, Lsn(seg(7)));
    }

    proptest! {
        /// Whatever the archive holds, the start is a segment boundary on a timeline of
        /// the path, never past what the archive holds on that path, and never before
        /// the newest complete segment on the current timeline.
        #[test]
        fn the_start_is_a_segment_boundary_on_the_path(
            switches in proptest::collection::vec(1u64..(1 << 40), 0..4),
            held_ranges in proptest::collection::vec((1u32..6, 0u64..4000, 0u64..50, proptest::option::of(0u64..4000)), 0..8),
        ) {
            let mut ends: Vec<u64> = switches;
            ends.sort_unstable();
            ends.dedup();
            let mut p: Vec<PathStep> = ends.iter().enumerate().map(|(i, &e)| PathStep {
                timeline: tli(i as u32 + 1), end: Some(Lsn(e)),
            }).collect();
            p.push(PathStep { timeline: tli(ends.len() as u32 + 1), end: None });
            let h: Vec<HeldTimeline> = held_ranges.iter().map(|&(t, first, len, streamed)| {
                held(t, &[(first, first + len)], &streamed.into_iter().collect::<Vec<_>>())
            }).collect();
            if let Some(start) = archive_start(&p, &h, SEG) {
                prop_assert_eq!(start.lsn.0 % u64::from(SEG), 0);
                let step = p.iter().find(|s| s.timeline == start.timeline);
                prop_assert!(step.is_some(), "{:?} is not on the path", start.timeline);
                // The start segment begins before its timeline ends.
                prop_assert!(step.unwrap().end.is_none_or(|e| start.lsn < e));
                // Never past the end of a complete segment held on the current timeline
                // (rounded down, the end is the next segment's start).
                let current = p.last().unwrap().timeline;
                for hh in h.iter().filter(|hh| hh.timeline == current) {
                    for &(first, last) in &hh.complete {
                        prop_assert!(start.lsn.0 >= seg(first.max(last) + 1), "{} before the end of {}..{}", start.lsn, first, last);
                    }
                }
            }
        }
    }
}

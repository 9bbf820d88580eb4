//! Timeline history files (`NNNNNNNN.history`), pure.
//!
//! PostgreSQL writes one per timeline after the first, when a server is promoted: one
//! line per ancestor timeline, oldest first, `parentTLI<TAB>switchpoint<TAB>reason`, the
//! switchpoint being where that ancestor ended and its child began. Blank lines and lines
//! starting with `#` are ignored (readTimeLineHistory). The file of timeline N lists the
//! timelines before N; N itself, the current one, has no line.
//!
//! Contract of [`TimelineHistory::parse`]: ancestors strictly increasing in timeline and
//! never decreasing in switchpoint, every line complete, or a typed error; never a panic.

use std::fmt;

use super::wal::{Lsn, TimelineId};

/// One ancestor timeline and where it ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HistoryEntry {
    /// The ancestor timeline.
    pub timeline: TimelineId,
    /// Its end: the first LSN of the next timeline.
    pub switchpoint: Lsn,
    /// PostgreSQL's reason text ("no recovery target specified", ...).
    pub reason: String,
}

/// The ancestors of a timeline, oldest first.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TimelineHistory {
    /// One entry per ancestor.
    pub entries: Vec<HistoryEntry>,
}

/// A history file that is not one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("timeline history line {line}: {what}")]
pub struct HistoryError {
    /// 1-based line number.
    pub line: usize,
    /// What is wrong.
    pub what: String,
}

impl TimelineHistory {
    /// Parses a history file's text.
    pub fn parse(text: &str) -> Result<TimelineHistory, HistoryError> {
        let mut entries: Vec<HistoryEntry> = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            let line = raw.trim_start();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let err = |what: String| HistoryError { line: i + 1, what };
            let mut fields = line.splitn(3, ['\t', ' ']);
            let tli = fields.next().unwrap_or_default();
            let tli: u32 = tli
                .parse()
                .map_err(|_| err(format!("{tli:?} is not a timeline")))?;
            if tli == 0 {
                return Err(err("timeline 0 does not exist".into()));
            }
            let rest = fields.next().ok_or_else(|| err("no switchpoint".into()))?;
            let switchpoint: Lsn = rest
                .trim()
                .parse()
                .map_err(|_| err(format!("{rest:?} is not a WAL position")))?;
            let reason = fields.next().unwrap_or_default().trim().to_string();
            if let Some(prev) = entries.last() {
                if tli <= prev.timeline.0 {
                    return Err(err(format!(
                        "timeline {tli} does not follow timeline {}",
                        prev.timeline.0
                    )));
                }
                if switchpoint < prev.switchpoint {
                    return Err(err(format!(
                        "switchpoint {switchpoint} is before the previous one, {}",
                        prev.switchpoint
                    )));
                }
            }
            entries.push(HistoryEntry {
                timeline: TimelineId(tli),
                switchpoint,
                reason,
            });
        }
        Ok(TimelineHistory { entries })
    }

    /// The timeline that holds `lsn` on the way to `current`: the first ancestor whose
    /// switchpoint lies after it (a switchpoint belongs to the next timeline), else
    /// `current`.
    pub fn timeline_of(&self, lsn: Lsn, current: TimelineId) -> TimelineId {
        self.entries
            .iter()
            .find(|e| lsn < e.switchpoint)
            .map_or(current, |e| e.timeline)
    }

    /// Where `tli` ends on the way to the current timeline; `None` when it is not an
    /// ancestor (the current timeline, which has not ended, or a timeline off the path).
    pub fn end_of(&self, tli: TimelineId) -> Option<Lsn> {
        self.entries
            .iter()
            .find(|e| e.timeline == tli)
            .map(|e| e.switchpoint)
    }
}

impl fmt::Display for TimelineHistory {
    /// The file as PostgreSQL writes it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for e in &self.entries {
            writeln!(f, "{}\t{}\t{}", e.timeline.0, e.switchpoint, e.reason)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// 00000003.history as PostgreSQL 15 wrote it after two promotions.
    const REAL: &str =
        "1\t0/3000158\tno recovery target specified\n\n2\t0/50000A0\tat restore point \"fork\"\n";

    #[test]
    fn reads_what_postgresql_writes() {
        let h = TimelineHistory::parse(REAL).unwrap();
        assert_eq!(h.entries.len(), 2);
        assert_eq!(h.entries[0].timeline, TimelineId(1));
        assert_eq!(h.entries[0].switchpoint, Lsn(0x3000158));
        assert_eq!(h.entries[1].reason, "at restore point \"fork\"");
        assert_eq!(h.timeline_of(Lsn(0x3000157), TimelineId(3)), TimelineId(1));
        assert_eq!(h.timeline_of(Lsn(0x3000158), TimelineId(3)), TimelineId(2));
        assert_eq!(h.timeline_of(Lsn(0x50000A0), TimelineId(3)), TimelineId(3));
        assert_eq!(h.end_of(TimelineId(2)), Some(Lsn(0x50000A0)));
        assert_eq!(h.end_of(TimelineId(3)), None);
        assert_eq!(
            TimelineHistory::parse(&h.to_string()).unwrap(),
            h,
            "format and parse round-trip"
        );
        // Comments are ignored.
        let commented = format!("# written by hand\n{REAL}");
        assert_eq!(TimelineHistory::parse(&commented).unwrap(), h);
    }

    #[test]
    fn every_malformed_line_is_a_typed_error() {
        for bad in [
            "x\t0/1\treason",
            "0\t0/1\treason",
            "1",
            "1\tnot-an-lsn\treason",
            "2\t0/5\ta\n1\t0/9\tb",
            "1\t0/9\ta\n2\t0/5\tb",
        ] {
            assert!(TimelineHistory::parse(bad).is_err(), "{bad:?}");
        }
        assert_eq!(TimelineHistory::parse("").unwrap().entries.len(), 0);
    }

    proptest! {
        #[test]
        fn parsing_never_panics(text in "\\PC{0,200}") {
            let _ = TimelineHistory::parse(&text);
        }

        #[test]
        fn formatted_histories_parse_back(steps in proptest::collection::vec((1u32..1000, 0u64..(1 << 40), "[a-z ]{0,20}"), 0..6)) {
            let mut tli = 0;
            let mut lsn = 0;
            let entries: Vec<HistoryEntry> = steps.into_iter().map(|(dt, dl, reason)| {
                tli += dt;
                lsn += dl;
                HistoryEntry { timeline: TimelineId(tli), switchpoint: Lsn(lsn), reason: reason.trim().to_string() }
            }).collect();
            let h = TimelineHistory { entries };
            prop_assert_eq!(TimelineHistory::parse(&h.to_string()).unwrap(), h);
        }
    }
}

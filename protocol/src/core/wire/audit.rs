//! The audit trail's records: one JSON object per step of a WAL file's life in the
//! archive (`archived wal history`, `archived audit`; archived's `audit` module keeps
//! them).
//!
//! A record names its cluster, the WAL file (absent for records of a whole cluster: a
//! verify run), the step, the client request that caused it (its id, which the client
//! logs too) and the peer certificate (role, cluster and serial number, as `openssl x509
//! -noout -serial` prints it). Ids sort in the order the archive recorded the steps.
//! Fields added later have serde defaults, so a record written by an older archived
//! still reads.

use serde::{Deserialize, Serialize};

/// Records in one answer to `WalHistory` or `Audit`: well under the frame limit even
/// with long refusal messages.
pub const AUDIT_PAGE_RECORDS: usize = 1000;

/// One step of a WAL file's life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    /// The whole body arrived and matched what the request announced (size, blake3,
    /// WAL header).
    Received,
    /// The push was refused (the detail says why); nothing of it was stored.
    Refused,
    /// The object is durably in the store (or already was, with the same bytes).
    Stored,
    /// The archive answered "stored": recorded before the answer was sent.
    Acknowledged,
    /// Sent to a client (restore, check).
    Served,
    /// Sent to a replica's prefetch daemon.
    Prefetched,
    /// Removed by retention; the record summarizes the file's earlier records.
    Expired,
    /// An `archived verify` run read the cluster's WAL back (a cluster record).
    Verified,
}

impl Step {
    /// The name as it appears in JSON and tables.
    pub fn as_str(self) -> &'static str {
        match self {
            Step::Received => "received",
            Step::Refused => "refused",
            Step::Stored => "stored",
            Step::Acknowledged => "acknowledged",
            Step::Served => "served",
            Step::Prefetched => "prefetched",
            Step::Expired => "expired",
            Step::Verified => "verified",
        }
    }
}

/// Why a client fetches a WAL file (`GetWal`), for the trail.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FetchPurpose {
    /// `restore_command` (archive-get) or a restore.
    #[default]
    Restore,
    /// A replica's prefetch daemon filling its spool.
    Prefetch,
    /// `pushclient check` / `pullclient check` confirming a file is there.
    Check,
    /// A purpose this archived does not know (a newer client).
    #[serde(other)]
    Other,
}

impl FetchPurpose {
    /// The name as it appears in records.
    pub fn as_str(self) -> &'static str {
        match self {
            FetchPurpose::Restore => "restore",
            FetchPurpose::Prefetch => "prefetch",
            FetchPurpose::Check => "check",
            FetchPurpose::Other => "other",
        }
    }
}

/// One record of the trail.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// Unique, and sorts in recording order: 16 hex digits of `at_us`, then 16 of a
    /// sequence number.
    pub id: String,
    /// When, in microseconds since the Unix epoch (the archive's clock).
    pub at_us: i64,
    /// The same instant, RFC 3339 (UTC), for people.
    pub time: String,
    /// Cluster name.
    pub cluster: String,
    /// The WAL file; absent for a record of the whole cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    /// What happened.
    pub step: Step,
    /// The client request's id (the client logs it too).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<String>,
    /// The peer certificate: "ROLE:CLUSTER serial HEX".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
    /// Raw size of the file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    /// blake3 of the raw file, hex.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blake3: Option<String>,
    /// How long the step took (receiving the body; sending it), microseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_us: Option<u64>,
    /// What else there is to say: why a push was refused, a fetch's purpose, ...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// For `expired`: the file's earlier records, summarized.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<ExpiredSummary>,
}

/// What an `expired` record keeps of the records it replaces.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExpiredSummary {
    /// How many records it replaces.
    pub records: u64,
    /// The first `stored` step: when, by whom, in which request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stored_at_us: Option<i64>,
    /// Its peer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stored_by: Option<String>,
    /// Its request id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stored_request: Option<String>,
    /// `served` steps.
    pub served: u64,
    /// `prefetched` steps.
    pub prefetched: u64,
    /// `refused` steps.
    pub refused: u64,
    /// The last step that sent the file (served or prefetched): when and to whom.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_sent_at_us: Option<i64>,
    /// Its peer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_sent_to: Option<String>,
    /// Every peer the file was sent to (at most [`SUMMARY_PEERS`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sent_to: Vec<String>,
}

/// How many distinct peers an [`ExpiredSummary`] names.
pub const SUMMARY_PEERS: usize = 8;

impl ExpiredSummary {
    /// Summarizes `records` (of one file, in order).
    pub fn of(records: &[AuditRecord]) -> ExpiredSummary {
        let mut s = ExpiredSummary {
            records: records.len() as u64,
            ..Default::default()
        };
        for r in records {
            match r.step {
                Step::Stored if s.stored_at_us.is_none() => {
                    s.stored_at_us = Some(r.at_us);
                    s.stored_by = r.peer.clone();
                    s.stored_request = r.request.clone();
                }
                Step::Served | Step::Prefetched => {
                    if r.step == Step::Served {
                        s.served += 1;
                    } else {
                        s.prefetched += 1;
                    }
                    s.last_sent_at_us = Some(r.at_us);
                    s.last_sent_to = r.peer.clone();
                    if let Some(p) = &r.peer {
                        if !s.sent_to.contains(p) && s.sent_to.len() < SUMMARY_PEERS {
                            s.sent_to.push(p.clone());
                        }
                    }
                }
                Step::Refused => s.refused += 1,
                // An earlier summary (a file expired, stored again, expired again).
                Step::Expired => {
                    if let Some(e) = &r.summary {
                        s.served += e.served;
                        s.prefetched += e.prefetched;
                        s.refused += e.refused;
                        s.records += e.records;
                        if s.stored_at_us.is_none() {
                            s.stored_at_us = e.stored_at_us;
                            s.stored_by = e.stored_by.clone();
                            s.stored_request = e.stored_request.clone();
                        }
                    }
                }
                _ => {}
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(step: Step, at: i64, peer: &str) -> AuditRecord {
        AuditRecord {
            id: format!("{at:016x}{:016x}", 0),
            at_us: at,
            time: String::new(),
            cluster: "main".into(),
            file: Some("000000010000000000000001".into()),
            step,
            request: Some(format!("r{at}")),
            peer: Some(peer.into()),
            size: None,
            blake3: None,
            duration_us: None,
            detail: None,
            summary: None,
        }
    }

    #[test]
    fn a_summary_keeps_who_stored_and_who_fetched() {
        let records = vec![
            rec(Step::Received, 1, "push:main serial 01"),
            rec(Step::Stored, 2, "push:main serial 01"),
            rec(Step::Acknowledged, 3, "push:main serial 01"),
            rec(Step::Prefetched, 4, "pull:main serial 02"),
            rec(Step::Served, 5, "pull:main serial 03"),
            rec(Step::Served, 6, "pull:main serial 03"),
        ];
        let s = ExpiredSummary::of(&records);
        assert_eq!(s.records, 6);
        assert_eq!(s.stored_at_us, Some(2));
        assert_eq!(s.stored_by.as_deref(), Some("push:main serial 01"));
        assert_eq!(s.stored_request.as_deref(), Some("r2"));
        assert_eq!((s.served, s.prefetched, s.refused), (2, 1, 0));
        assert_eq!(s.last_sent_at_us, Some(6));
        assert_eq!(
            s.sent_to,
            vec!["pull:main serial 02", "pull:main serial 03"]
        );
    }

    #[test]
    fn records_round_trip_and_an_unknown_purpose_still_reads() {
        let r = rec(Step::Served, 7, "pull:main serial 02");
        let text = serde_json::to_string(&r).unwrap();
        assert!(!text.contains("summary"), "{text}");
        assert_eq!(serde_json::from_str::<AuditRecord>(&text).unwrap(), r);
        let p: FetchPurpose = serde_json::from_str("\"replay_later\"").unwrap();
        assert_eq!(p, FetchPurpose::Other);
    }
}
